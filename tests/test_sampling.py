"""Tests of gradjax.sampling: determinism for a key, monotone ascent on a concave toy, Langevin's stationary
variance (the ascent sign), denoising, and boundary errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax import sampling as S

M = jnp.array([0.2, 0.5, 0.8])


def concave(a=4.0):
    """f_i(x) = -a/2 ||x - m_i||^2: concave, maximum at m_i inside the [0, 1] box."""
    def f(x):
        z = x.reshape(x.shape[0], 1, -1)
        return -0.5 * a * jnp.sum((z - M[None, :, None]) ** 2, axis=-1)
    return f


F = concave()
Y = jnp.array([0, 1, 2, 2])
SHAPE = (4, 3, 3, 1)


def test_sampling_is_deterministic_for_a_key():
    run = jax.jit(lambda k, t: S.sample_from_noise(F, Y, k, SHAPE, steps=10, step_size=0.05, temperature=t).samples,
                  static_argnums=1)
    for t in (0.0, 1.0):
        a, b = run(jax.random.PRNGKey(0), t), run(jax.random.PRNGKey(0), t)
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(a), np.asarray(run(jax.random.PRNGKey(1), t)))
    den = jax.jit(lambda k: S.denoise(F, jnp.full(SHAPE, 0.5), Y, k, steps=5))
    d1, d2, d3 = den(jax.random.PRNGKey(3)), den(jax.random.PRNGKey(3)), den(jax.random.PRNGKey(4))
    assert np.array_equal(np.asarray(d1.samples), np.asarray(d2.samples))
    assert np.array_equal(np.asarray(d1.start), np.asarray(d2.start))
    assert not np.array_equal(np.asarray(d1.start), np.asarray(d3.start))


def test_ascent_and_denoising_increase_the_log_density_monotonically_on_a_concave_toy():
    r = S.sample_from_noise(F, Y, jax.random.PRNGKey(0), SHAPE, steps=50, step_size=0.05)
    ld = np.asarray(r.log_density)  # [51, B]
    assert ld.shape == (51, 4) and np.all(np.diff(ld, axis=0) >= 0) and np.all(ld[-1] > ld[0])
    # converges to the class mean m_y (geometric rate (1 - a eta)^t = 0.8^50)
    np.testing.assert_allclose(r.samples, np.broadcast_to(np.asarray(M[Y])[:, None, None, None], SHAPE), atol=1e-4)
    x = jnp.broadcast_to(M[Y][:, None, None, None], SHAPE)
    d = S.denoise(F, x, Y, jax.random.PRNGKey(1), noise_std=0.1, steps=20, step_size=0.01)
    ld = np.asarray(d.log_density)
    assert np.all(np.diff(ld, axis=0) >= 0)
    assert np.all(np.abs(np.asarray(d.samples) - np.asarray(x)).max(axis=(1, 2, 3))
                  < np.abs(np.asarray(d.start) - np.asarray(x)).max(axis=(1, 2, 3)))  # closer to the clean image


def test_temperature_zero_langevin_is_activity_maximization_and_jit_agrees():
    x0 = jax.random.uniform(jax.random.PRNGKey(0), SHAPE)
    am = S.activity_maximization(F, x0, Y, steps=7, step_size=0.1, weight_decay=1e-2)
    lz = S.langevin(F, x0, Y, jax.random.PRNGKey(5), steps=7, step_size=0.1, temperature=0.0, weight_decay=1e-2)
    np.testing.assert_allclose(am.samples, lz.samples, rtol=1e-6)
    jitted = jax.jit(lambda z: S.activity_maximization(F, z, Y, steps=7, step_size=0.1, weight_decay=1e-2).samples)
    np.testing.assert_allclose(jitted(x0), am.samples, rtol=1e-6, atol=1e-7)


def test_authors_update_by_hand():
    """One step of the authors' update x <- clip(x + lr (grad f_y - wd (x - 0.5)), 0, 1) on f = <w, x>."""
    w = jnp.array([[[[1.0], [-20.0]], [[0.5], [0.0]]]])
    f = lambda x: jnp.sum((x * w).reshape(x.shape[0], -1), 1)[:, None]
    x0 = jnp.array([[[[0.2], [0.4]], [[0.9], [0.7]]]])
    r = S.activity_maximization(f, x0, jnp.array([0]), steps=1, step_size=0.1, weight_decay=0.5, center=0.5)
    hand = np.clip(np.asarray(x0) + 0.1 * (np.asarray(w) - 0.5 * (np.asarray(x0) - 0.5)), 0, 1)
    np.testing.assert_allclose(r.samples, hand, rtol=1e-6)
    np.testing.assert_allclose(r.log_density[:, 0], [float(jnp.sum(x0 * w)), float(jnp.sum(hand * w))], rtol=1e-6)


def test_langevin_samples_the_density_not_its_inverse():
    """f = -a/2 (x - 0.5)^2 per pixel, no clip: ULA's stationary variance is 1 / (a (1 - eta a / 2)) (ascent sign);
    a descent sign would diverge."""
    a, eta = 4.0, 0.02
    f = lambda x: -0.5 * a * jnp.sum(((x - 0.5) ** 2).reshape(x.shape[0], -1), 1)[:, None]
    x0 = jnp.full((512, 4, 4, 1), 0.5)
    r = jax.jit(lambda k: S.langevin(f, x0, jnp.zeros(512, jnp.int32), k, steps=300, step_size=eta,
                                     clip=None).samples)(jax.random.PRNGKey(0))
    v = float(np.var(np.asarray(r)))
    assert v == pytest.approx(1 / (a * (1 - eta * a / 2)), rel=0.05)
    assert abs(float(np.mean(np.asarray(r))) - 0.5) < 0.02


def test_boundary_errors():
    x0 = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="key"):
        S.langevin(F, x0, Y, None, steps=2, step_size=0.1)
    with pytest.raises(ValueError, match="step_size"):
        S.activity_maximization(F, x0, Y, steps=2, step_size=-0.1)
    with pytest.raises(ValueError, match="steps"):
        S.activity_maximization(F, x0, Y, steps=2.5, step_size=0.1)
    with pytest.raises(ValueError, match="clip"):
        S.activity_maximization(F, x0, Y, steps=2, step_size=0.1, clip=(1.0, 0.0))
    with pytest.raises(ValueError, match="labels"):
        S.activity_maximization(F, x0, Y[:2], steps=2, step_size=0.1)
    with pytest.raises(ValueError, match="noise_std"):
        S.denoise(F, x0, Y, jax.random.PRNGKey(0), noise_std=-1.0)


def test_gaussian_init_mean_std_and_blur():
    k = jax.random.PRNGKey(0)
    x = np.asarray(S.gaussian_init(k, (256, 8, 8, 1), 0.3, 0.1, clip=None))
    assert abs(x.mean() - 0.3) < 2e-3 and abs(x.std() - 0.1) < 2e-3
    np.testing.assert_array_equal(x, np.asarray(S.gaussian_init(k, (256, 8, 8, 1), 0.3, 0.1, clip=None)))
    # an image mean broadcasts, and the clip keeps the box
    m = jnp.linspace(0, 1, 64).reshape(8, 8, 1)
    xc = np.asarray(S.gaussian_init(k, (256, 8, 8, 1), m, 0.5))
    assert xc.min() >= 0 and xc.max() <= 1 and abs(xc[:, 0, 0].mean() - 0.2) < 0.05  # clipped N(0, .5²) at 0
    # blur 1.5 px: unit variance kept away from the border, neighbours correlated exp(-1 / (4 sigma^2)) ~ 0.895
    b = np.asarray(S.gaussian_init(k, (512, 16, 16, 1), 0.0, 1.0, blur=1.5, clip=None))
    assert abs(b[:, 5:11, 5:11].std() - 1.0) < 0.03
    c = np.corrcoef(b[:, 8, 8, 0], b[:, 8, 9, 0])[0, 1]
    assert c == pytest.approx(np.exp(-1 / (4 * 1.5 ** 2)), abs=0.03)
    with pytest.raises(ValueError, match="std"):
        S.gaussian_init(k, (2, 4, 4, 1), 0.5, -0.1)
    with pytest.raises(ValueError, match="shape"):
        S.gaussian_init(k, (2, 16), 0.5, 0.1)


def test_sample_from_noise_gaussian_start_and_an_image_center():
    """init='gaussian' starts at gaussian_init(first split of the key); with a prior around an image c the ascent on
    f = -a/2 ||x - m_y||^2 converges per pixel to (a m_y + lam c) / (a + lam)."""
    k = jax.random.PRNGKey(3)
    c = jnp.linspace(0.1, 0.9, 9).reshape(3, 3, 1)
    r = S.sample_from_noise(F, Y, k, SHAPE, steps=200, step_size=0.05, weight_decay=2.0, center=c,
                            init="gaussian", init_mean=c, init_std=0.05)
    np.testing.assert_allclose(r.start, S.gaussian_init(jax.random.split(k)[0], SHAPE, c, 0.05), rtol=1e-6)
    fixed = (4.0 * np.asarray(M[Y])[:, None, None, None] + 2.0 * np.asarray(c)[None]) / 6.0
    np.testing.assert_allclose(r.samples, fixed, atol=1e-4)
    with pytest.raises(ValueError, match="init"):
        S.sample_from_noise(F, Y, k, SHAPE, steps=1, step_size=0.1, init="normal")


def test_sample_statistics_by_hand():
    s = jnp.array([[[[0.0], [1.0]], [[0.5], [0.5]]], [[[1.0], [1.0]], [[1.0], [0.995]]]])
    ref = jnp.array([[[[0.0], [1.0]], [[0.5], [0.0]]], [[[1.0], [1.0]], [[1.0], [1.0]]]])
    st = S.sample_statistics(s, ref)
    np.testing.assert_allclose(st.mean, [0.5, 3.995 / 4], rtol=1e-6)
    np.testing.assert_allclose(st.frac_low, [0.25, 0.0])
    np.testing.assert_allclose(st.frac_high, [0.25, 1.0])  # 0.995 >= 1 - 0.01
    np.testing.assert_allclose(st.nn_distance, [0.5, 0.005], atol=1e-3)
    with pytest.raises(ValueError, match="image shape"):
        S.sample_statistics(s, ref[:, :1])
