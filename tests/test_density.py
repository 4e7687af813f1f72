"""Tests of gradjax.density (log-density, density ratios, GAN-test) and gradjax.discriminative (discriminative pixel
perturbation, thesis §5.5.2) against hand computations and closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax import density as D
from gradjax import discriminative as P

pytestmark = pytest.mark.usefixtures("fast_compilation")


def quadratic(a, m):
    """f_i(x) = -a_i/2 ||x - m_i||^2 per class: a concave log-density with tr H = -a_i D."""
    a, m = jnp.asarray(a, jnp.float32), jnp.asarray(m, jnp.float32)

    def f(x):
        z = x.reshape(x.shape[0], 1, -1)
        return -0.5 * a[None] * jnp.sum((z - m[None, :, None]) ** 2, axis=-1)
    return f


def mlp_fn(seed=0, d=12, k=3):
    r = np.random.RandomState(seed)
    W1, W2 = jnp.asarray(r.randn(d, 16), jnp.float32), jnp.asarray(r.randn(16, k), jnp.float32)
    return lambda x: jax.nn.softplus(x.reshape(x.shape[0], -1) @ W1) @ W2


X = jnp.asarray(np.random.RandomState(1).rand(4, 2, 2, 3), jnp.float32)
Y = jnp.array([0, 1, 2, 1])


def test_log_density_is_the_label_logit():
    f = mlp_fn()
    np.testing.assert_allclose(D.log_density(f, X, Y), f(X)[np.arange(4), np.asarray(Y)], rtol=1e-6)
    assert D.log_density(f, X).shape == (4, 3)
    with pytest.raises(ValueError, match="labels"):
        D.log_density(f, X, jnp.array([0, 1, 5, 0]))


def test_density_ratio_is_exactly_one_at_zero_noise():
    r = D.density_ratios(mlp_fn(), X, Y, jax.random.PRNGKey(0), noise_stds=[0.0, 0.1, 0.3], num_draws=2)
    assert r.log_ratio.shape == (3, 2, 4)
    assert np.all(np.asarray(r.ratio[0]) == 1.0) and float(r.mean_ratio[0]) == 1.0
    assert np.all(np.asarray(r.log_ratio[1:]) != 0.0)  # and not trivially 1 elsewhere


def test_density_ratio_matches_hand_computed_linear_case():
    """f_i(x) = <w_i, x>: log-ratio = s <w_y, ε> with ε = normal(key, (N, *x.shape)) as documented."""
    W = jnp.asarray(np.random.RandomState(2).randn(12, 3), jnp.float32)
    f = lambda x: x.reshape(x.shape[0], -1) @ W
    key, stds = jax.random.PRNGKey(3), [0.0, 0.2, 0.5]
    r = D.density_ratios(f, X, Y, key, noise_stds=stds, num_draws=2)
    eps = np.asarray(jax.random.normal(key, (2, *X.shape), jnp.float32)).reshape(2, 4, 12)
    w_y = np.asarray(W).T[np.asarray(Y)]  # [B, 12]
    hand = np.array([[s * np.sum(eps[n] * w_y, axis=1) for n in range(2)] for s in stds])
    np.testing.assert_allclose(r.log_ratio, hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.ratio, np.exp(hand), rtol=1e-5)


def test_density_ratio_matches_gaussian_closed_form_and_slope():
    """f(x) = -a/2 ||x||^2 in one dimension: E exp(f(x+sε)-f(x)) = (1+as^2)^(-1/2) exp(a^2 s^2 x^2 / (2(1+as^2)))
    and E[log-ratio] = -a s^2 / 2 - a s x ε-term(0); the fitted slope of the mean log-ratio is ½ tr H = -a/2."""
    a, x = 2.0, jnp.array([[[[0.3]]]])
    f = quadratic([a], [0.0])
    stds = np.array([0.0, 0.1, 0.2, 0.3])
    r = D.density_ratios(f, x, jnp.array([0]), jax.random.PRNGKey(0), noise_stds=stds, num_draws=200_000)
    closed = (1 + a * stds ** 2) ** -0.5 * np.exp(a ** 2 * stds ** 2 * 0.09 / (2 * (1 + a * stds ** 2)))
    np.testing.assert_allclose(r.mean_ratio, closed, rtol=3e-3)
    np.testing.assert_allclose(r.mean_log_ratio, -a * stds ** 2 / 2, atol=3e-3)
    # exact slope on exact expectations; the Monte Carlo one within its error
    assert D.log_ratio_slope(stds, -a * stds ** 2 / 2) == pytest.approx(-a / 2)
    assert D.log_ratio_slope(stds, r.mean_log_ratio) == pytest.approx(-a / 2, abs=0.03)


def test_density_ratios_jit_clip_and_errors():
    f = mlp_fn()
    fn = jax.jit(lambda x, k: D.density_ratios(f, x, Y, k, noise_stds=[0.0, 5.0], clip=(0.0, 1.0)).log_ratio)
    out = fn(X, jax.random.PRNGKey(0))
    eager = D.density_ratios(f, X, Y, jax.random.PRNGKey(0), noise_stds=[0.0, 5.0], clip=(0.0, 1.0)).log_ratio
    np.testing.assert_allclose(out, eager, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="noise_stds"):
        D.density_ratios(f, X, Y, jax.random.PRNGKey(0), noise_stds=[-0.1])
    with pytest.raises(ValueError, match="key"):
        D.density_ratios(f, X, Y, None)
    with pytest.raises(ValueError, match="nonzero"):
        D.log_ratio_slope([0.0], [0.0])


def test_gan_test_accuracy_by_hand():
    judge = lambda x: jnp.stack([x[:, 0, 0, 0], x[:, 0, 0, 1], x[:, 0, 0, 2]], axis=1)  # argmax of pixel (0,0)
    s = np.zeros((4, 2, 2, 3), np.float32)
    s[0, 0, 0, 0] = s[1, 0, 0, 1] = s[2, 0, 0, 0] = s[3, 0, 0, 2] = 1.0  # predicted 0, 1, 0, 2
    assert float(D.gan_test(judge, jnp.asarray(s), jnp.array([0, 1, 2, 2]))) == pytest.approx(0.75)
    assert float(jax.jit(lambda z: D.gan_test(judge, z, jnp.array([1, 1, 1, 1])))(jnp.asarray(s))) == 0.25
    with pytest.raises(ValueError, match="labels"):
        D.gan_test(judge, jnp.asarray(s), jnp.array([0, 1, 2]))


def test_judge_must_be_independent_of_the_generator():
    r = np.random.RandomState(0)
    gen = {"dense0": {"kernel": r.randn(64, 32), "bias": np.zeros(32)}, "dense1": {"kernel": r.randn(32, 10),
                                                                                 "bias": np.zeros(10)}}
    judge = {"conv0": {"kernel": r.randn(3, 3, 1, 8), "bias": np.zeros(8)}, "head": {"kernel": r.randn(8, 10),
                                                                                     "bias": np.zeros(10)}}
    D.check_independent_judge(judge, gen)  # another architecture, own parameters (zero biases alike): fine
    with pytest.raises(ValueError, match="architecture"):
        D.check_independent_judge(gen, gen)
    same_arch = jax.tree.map(lambda a: a + 1.0, gen)  # retrained copy of the generator's architecture
    with pytest.raises(ValueError, match="architecture"):
        D.check_independent_judge(same_arch, gen)
    leaked = {"judge": judge, "copied": gen["dense1"]["kernel"]}  # a judge that saw one generator array
    with pytest.raises(ValueError, match="shares a parameter"):
        D.check_independent_judge(leaked, gen)


# ----------------------------------------------------------------------------- discriminative pixel perturbation
def two_class_linear(w):
    """f_0 = <w, x>, f_1 = 1 (constant): class 0 wins iff <w, x> > 1; grad f_0 = w."""
    w = jnp.asarray(w, jnp.float32)
    return lambda x: jnp.stack([jnp.sum((x * w).reshape(x.shape[0], -1), 1), jnp.ones(x.shape[0])], axis=1)


def test_discriminative_pixel_perturbation_by_hand():
    # one 2x2 one-channel image [[1, 1], [1, 0]], mean 0.75; weights [[4, 3], [2, 1]] -> f_0 = 9 > 1.
    x = jnp.array([[[[1.0], [1.0]], [[1.0], [0.0]]]])
    w = jnp.array([[[[4.0], [3.0]], [[2.0], [1.0]]]])
    f = two_class_linear(w)
    # least relevant first: 1 (pixel d), 2 (c), 3 (b), 4 (a). Removing k pixels fills them with 0.75:
    # k=1: d=0.75 -> 4+3+2+0.75 = 9.75 ; k=2: +c -> 4+3+1.5+0.75 = 9.25 ; k=3: 4+2.25+1.5+.75 = 8.5 ; k=4: 7.5
    curve = P.discriminative_pixel_perturbation(f, x, jnp.array([0]), fractions=[0.0, 0.25, 0.5, 0.75, 1.0])
    assert np.asarray(curve.accuracy).tolist() == [1.0] * 5
    # against label 1 every removal keeps class 0 winning: accuracy 0 throughout
    assert np.asarray(P.discriminative_pixel_perturbation(f, x, jnp.array([1]), fractions=[0.5]).accuracy) == 0.0
    # Fig. 5.3b: one evaluation model g, gradients from other models. g: f_0 = 10 a - 8.5, f_1 = 1 -> f_0(x) = 1.5,
    # class 0; with pixel a replaced by the mean 0.75: f_0 = -1 -> class 1.
    g = lambda z: two_class_linear(jnp.array([[[[10.0], [0.0]], [[0.0], [0.0]]]]))(z) - jnp.array([8.5, 0.0])
    own = P.discriminative_pixel_perturbation(g, x, jnp.array([0]), fractions=[0.25])
    assert float(own.accuracy[0]) == 1.0  # own gradient: a most relevant; the tie b=c=d removes b (position order)
    by_f = P.discriminative_pixel_perturbation(g, x, jnp.array([0]), gradient_fn=f, fractions=[0.25])
    assert float(by_f.accuracy[0]) == 1.0  # f's gradients remove d first
    h = two_class_linear(jnp.array([[[[1.0], [5.0]], [[5.0], [5.0]]]]))
    by_h = P.discriminative_pixel_perturbation(g, x, jnp.array([0]), gradient_fn=h, fractions=[0.25])
    assert float(by_h.accuracy[0]) == 0.0  # h's gradients rank a least relevant: removing it (k = 1) flips g


def test_removes_exactly_k_pixels_and_fill_options():
    # 2x2 image, evaluation model = pixel count of value 9: detect how many pixels were replaced by the fill
    x = jnp.full((1, 2, 2, 1), 9.0)
    count = lambda z: jnp.stack([jnp.sum(jnp.isclose(z, 9.0).reshape(1, -1), 1).astype(jnp.float32),
                                 jnp.full((1,), 2.5)], axis=1)  # class 0 iff more than 2.5 pixels survive
    w = jnp.array([[[[1.0], [2.0]], [[3.0], [4.0]]]])
    c = P.discriminative_pixel_perturbation(count, x, jnp.array([0]), gradient_fn=two_class_linear(w),
                                            fractions=[0.25, 0.5], fill=0.5)
    assert np.asarray(c.accuracy).tolist() == [1.0, 0.0]  # k = 1 leaves 3 > 2.5; k = 2 leaves 2 (not k - 1 = 1)
    # the authors' channel-std relevance is all zero on one-channel images
    g = jnp.asarray(np.random.RandomState(0).randn(2, 3, 3, 1), jnp.float32)
    assert np.all(np.asarray(P.relevance_map(g, "channel_std")) == 0.0)
    np.testing.assert_allclose(P.relevance_map(g, "abs_sum"), np.abs(np.asarray(g))[..., 0])
    g3 = jnp.asarray(np.random.RandomState(1).randn(2, 3, 3, 3), jnp.float32)
    np.testing.assert_allclose(P.relevance_map(g3, "channel_std"), np.std(np.asarray(g3), -1), rtol=1e-5)
    with pytest.raises(ValueError, match="relevance"):
        P.relevance_map(g, "max")
    assert len(P.AUTHORS["fractions"]) == 25 and P.THESIS["fractions"][0] == 0.1
