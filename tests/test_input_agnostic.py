"""Input-agnostic saliency (seed 003 reconstruction): each stage (nudge, integrate/project, scale, refine, radius
curve) against a hand computation or the property its docstring promises, the whole method pinned to the values
of the single-function implementation it was split from, batched vs per-class equality, determinism, options
validation. Tiny hand-made models so that everything compiles in seconds."""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax import input_agnostic as ia
from gradjax.model import ModelHandle

pytestmark = pytest.mark.usefixtures("fast_compilation")

SHAPE = (8, 8, 1)
K = 4
TROJAN = 2


def _weights():
    k1, k2 = jax.random.split(jax.random.PRNGKey(42))
    w = jax.random.normal(k1, (int(np.prod(SHAPE)), K)) * 0.3
    return w - jnp.mean(w, axis=0), jax.random.normal(k2, (K,)) * 0.1  # no class gains from a uniform shift


def trojaned_logits(x, w=None):
    """A linear classifier plus a planted backdoor: a bright 2x2 bottom-right patch adds +8 to class TROJAN."""
    w, b = _weights() if w is None else w
    logits = x.reshape(x.shape[0], -1) @ w + b
    patch = jnp.mean(x[:, -2:, -2:, 0], axis=(1, 2))
    return logits.at[:, TROJAN].add(8.0 * jax.nn.sigmoid(25.0 * (patch - 0.6)))


def linear_logits(x):
    """Linear logits ``x.flat @ W + b`` (CE input-gradients by hand: ``W (softmax - onehot)``)."""
    w, b = _weights()
    return x.reshape(x.shape[0], -1) @ w + b


PATCH = (slice(2, 4), slice(5, 7))  # rows 2-3, columns 5-6


def patch_logits(x):
    """Two classes; class 1's logit is a planted linear response to the 2x2 patch PATCH only (class 0's is 0)."""
    s = jnp.mean(x[:, PATCH[0], PATCH[1], 0], axis=(1, 2))
    return jnp.stack([jnp.zeros_like(s), 6.0 * (s - 0.5)], axis=-1)


OPTS = ia.InputAgnosticOptions(low=0.0, high=1.0, distribution="uniform", steps=30, samples=8, chunk=4,
                               fidelity_samples=64, curve_fractions=(0.5, 0.25), curve_steps=5, refine_steps=3,
                               refine_sigma=1.0, tolerance=0.05)


@functools.lru_cache(maxsize=None)
def _compiled(single: bool, model=trojaned_logits, **extra):
    """One compiled program per option set (shared by the tests); the class, the key and the radius are traced."""
    opts = dataclasses.replace(OPTS, **dict(extra))
    if single:
        return jax.jit(lambda k, c, r: ia.input_agnostic(model, SHAPE, c, key=k,
                                                         options=dataclasses.replace(opts, radius=r)))
    return jax.jit(lambda k, r: ia.input_agnostic(model, SHAPE, "all", key=k,
                                                  options=dataclasses.replace(opts, radius=r)))


def _run(target, key=0, radius=2.0, **extra):
    k, r = jax.random.PRNGKey(key), jnp.float32(radius)
    if isinstance(target, str):
        return _compiled(False, **extra)(k, r)
    return _compiled(True, **extra)(k, jnp.int32(target), r)


def _l2(a):
    return float(jnp.linalg.norm(jnp.ravel(a)))


def _linf(a):
    return float(jnp.max(jnp.abs(a)))


NORM_FNS = {"l2": _l2, "linf": _linf}


# ---------------------------------------------------------------------------------------------- nudge (IA.1)
def test_nudge_is_the_mean_cross_entropy_gradient_by_hand():
    """For linear logits, grad_x CE(x, c) = W (softmax(x W + b) - e_c): nudge must equal its mean over the samples
    ``draw_samples(key, S)`` (the same keys), at rho = 0 and at a rho that saturates some pixels (clip: zero grad)."""
    w, b = (np.asarray(a, np.float64) for a in _weights())
    opts = dataclasses.replace(OPTS, samples=6, chunk=4)  # a full chunk and a rest of 2
    key = jax.random.PRNGKey(5)
    x = np.asarray(ia.draw_samples(key, 6, SHAPE, distribution="uniform"), np.float64)
    nudge = jax.jit(lambda rho: ia.nudge(linear_logits, rho, 3, key=key, options=opts))
    for rho in (np.zeros(SHAPE, np.float32), np.full(SHAPE, 0.5, np.float32)):
        z = x + rho
        inside = ((z > 0) & (z < 1)).reshape(6, -1)
        zc = np.clip(z, 0, 1).reshape(6, -1)
        logits = zc @ w + b
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ce = -np.log(p[:, 3])
        g = ((p - np.eye(K)[3]) @ w.T) * inside
        loss, grad = nudge(jnp.asarray(rho))
        chex.assert_trees_all_close((loss, grad), (np.float32(ce.mean()), g.mean(0).reshape(SHAPE).astype(np.float32)),
                                    rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- integrate and project (IA.2, IA.3)
@pytest.mark.parametrize("norm", ia.NORMS)
def test_projection_lands_on_the_ball_and_is_identity_inside(norm):
    radius = 0.7
    big = jax.random.normal(jax.random.PRNGKey(0), SHAPE) * 5
    on = ia.project(big, radius, norm)
    assert NORM_FNS[norm](on) == pytest.approx(radius, rel=1e-5)  # outside: lands on the sphere
    # the closed forms: l2 rescales, l_inf clips
    want = big * radius / _l2(big) if norm == "l2" else jnp.clip(big, -radius, radius)
    chex.assert_trees_all_close(on, want, rtol=1e-5, atol=1e-7)
    small = big * (0.5 * radius / NORM_FNS[norm](big))
    chex.assert_trees_all_close(ia.project(small, radius, norm), small, rtol=1e-6)  # inside: unchanged
    chex.assert_trees_all_close(ia.project(on, radius, norm), on, rtol=1e-6)  # idempotent
    with pytest.raises(ValueError, match="norm"):
        ia.project(big, radius, "l1")


@pytest.mark.parametrize("norm,radius", [("l2", 1.5), ("linf", 0.3)])
def test_method_keeps_every_map_in_its_ball(norm, radius):
    r = _run(1, radius=radius, **({} if norm == "l2" else {"norm": norm}))
    p = NORM_FNS[norm]
    assert p(r.map) <= radius * (1 + 1e-5)
    for rad, m in zip(np.asarray(r.radii), np.asarray(r.curve_maps)):
        assert p(jnp.asarray(m)) <= rad * (1 + 1e-5)
    chex.assert_trees_all_close(r.radii, radius * np.array([1.0, 0.5, 0.25], np.float32), rtol=1e-6)
    # the optimizer actually uses the ball: the unrefined map and every continuation map sit on its boundary
    for rad, m in zip(np.asarray(r.radii), np.asarray(r.curve_maps)):
        assert p(jnp.asarray(m)) >= 0.99 * rad


def test_first_steps_follow_the_moment_normalized_rule_by_hand():
    """Eq. IA.2-3 for two steps of "global" normalization with b1 = 0.5, from rho = 0, inside the ball:
    m^_1 = g_1, m^_2 = (b1 (1 - b1) g_1 + (1 - b1) g_2) / (1 - b1^2), rho_t = rho_{t-1} - lr m^_t / ||m^_t||."""
    opts = dataclasses.replace(OPTS, momentum=0.5, learning_rate=0.1, radius=5.0).resolve(SHAPE)
    key = jax.random.PRNGKey(2)

    @jax.jit
    def method_and_hand():
        rho0 = jnp.zeros(SHAPE)
        rho, _, loss = ia.integrate(linear_logits, rho0, ia.optimizer(opts, SHAPE).init(rho0), 1, key=key,
                                    ball_radius=5.0, steps=2, options=opts)
        k1, k2 = jax.random.split(key, 2)
        l1, g1 = ia.nudge(linear_logits, rho0, 1, key=k1, options=opts)
        rho1 = -0.1 * g1 / jnp.linalg.norm(g1)
        l2, g2 = ia.nudge(linear_logits, rho1, 1, key=k2, options=opts)
        m2 = (0.25 * g1 + 0.5 * g2) / 0.75
        return (rho, loss), (rho1 - 0.1 * m2 / jnp.linalg.norm(m2), jnp.stack([l1, l2]))

    got, want = method_and_hand()
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("normalization", ia.NORMALIZATIONS)
def test_step_scaling_at_smaller_radii(normalization):
    """Eq. IA.3: on a ball of radius r < eta the step is scaled by r / eta. One step from rho = 0 (far inside the
    ball): a "global" step has l2 length lr * r / eta; a first Adam ("coordinate") step moves every pixel with a
    non-zero gradient by lr * r / eta. Through radius_curve (eq. IA.6) the continuation takes the same scaled step."""
    eta, lr = 4.0, 0.2
    opts = dataclasses.replace(OPTS, norm="l2", radius=eta, learning_rate=lr, normalization=normalization,
                               curve_steps=1)
    size = _l2 if normalization == "global" else _linf
    fracs = (1.0, 0.5, 0.1)

    @jax.jit
    def steps_and_curve():
        rho0 = jnp.zeros(SHAPE)
        state = ia.optimizer(opts, SHAPE).init(rho0)
        one = [ia.integrate(linear_logits, rho0, state, 0, key=jax.random.PRNGKey(1), ball_radius=eta * f, steps=1,
                            options=opts)[0] for f in fracs]
        curve = ia.radius_curve(linear_logits, rho0, state, 0, key=jax.random.PRNGKey(1),
                                fidelity_key=jax.random.PRNGKey(9),
                                options=dataclasses.replace(opts, curve_fractions=(0.25,)))
        return one, curve

    one, curve = steps_and_curve()
    assert [size(r) for r in one] == pytest.approx([lr * f for f in fracs], rel=1e-3)
    chex.assert_trees_all_close(curve.radii, np.array([eta, 0.25 * eta], np.float32))
    assert size(curve.maps[1]) == pytest.approx(lr * 0.25, rel=1e-3)


# ---------------------------------------------------------------------------------------------- scale (IA.4)
def test_scale_is_one_global_min_max_and_channel_abs_sum():
    rho = jnp.array([[[-1.0, 3.0], [1.0, 0.0]]])  # [1, 2, 2]
    display, heat = ia.scale(rho)
    chex.assert_trees_all_close(display, jnp.array([[[0.0, 1.0], [0.5, 0.25]]]))
    chex.assert_trees_all_close(heat, jnp.array([[4.0, 1.0]]))
    chex.assert_trees_all_close(ia.scale_to_unit(jnp.full((2, 2, 1), 3.0)), jnp.zeros((2, 2, 1)))


# ---------------------------------------------------------------------------------------------- refine (IA.5)
def spike_logits(x):
    """Class 1 iff the pixel (4, 4) exceeds 0.9: a one-pixel spike of height 1 always triggers it, a blurred one
    rarely."""
    return jnp.stack([jnp.zeros(x.shape[0]), 20.0 * (x[:, 4, 4, 0] - 0.9)], axis=-1)


def test_refine_rejects_a_step_that_costs_fidelity_and_stops():
    spike = jnp.zeros(SHAPE).at[4, 4, 0].set(1.0)
    opts = dataclasses.replace(OPTS, radius=2.0, refine_steps=3, tolerance=0.1)
    key = jax.random.PRNGKey(0)
    cand = ia.project(ia.gaussian_blur(spike, opts.refine_sigma), 2.0, "l2")

    @jax.jit
    def refinements():
        return (ia.refine(spike_logits, spike, 1, key=key, options=opts),
                ia.fidelity(spike_logits, cand, 1, key=key, options=opts),
                ia.refine(spike_logits, spike, 1, key=key, options=dataclasses.replace(opts, tolerance=1.0)),
                ia.refine(spike_logits, spike, 1, key=key, options=dataclasses.replace(opts, refine_steps=0)))

    ref, f_cand, loose, off = refinements()
    assert float(ref.fidelity_unrefined) == 1.0 and int(ref.accepted) == 0
    chex.assert_trees_all_close((ref.map, ref.fidelity), (spike, ref.fidelity_unrefined))
    # the blurred spike does lose fidelity beyond the tolerance (what made the step rejected)
    assert float(f_cand) < 0.9
    # tolerance 1 accepts every step: the map is the blur iterated refine_steps times (each projected)
    want = spike
    for _ in range(3):
        want = ia.project(ia.gaussian_blur(want, opts.refine_sigma), 2.0, "l2")
    assert int(loose.accepted) == 3
    chex.assert_trees_all_close(loose.map, want, rtol=1e-5, atol=1e-7)
    assert int(off.accepted) == 0
    chex.assert_trees_all_close(off.map, spike)


def test_refinement_never_lowers_fidelity_beyond_tolerance():
    tolerance = OPTS.tolerance
    for key in range(3):
        r = _run("all", key=key, radius=2.0)
        assert np.all(np.asarray(r.fidelity) >= np.asarray(r.fidelity_unrefined) - tolerance - 1e-7)
        assert np.all((0 <= np.asarray(r.refine_accepted)) & (np.asarray(r.refine_accepted) <= 3))


def test_reported_fidelity_is_the_success_rate_on_the_fidelity_set():
    r = _run(TROJAN, radius=2.0)
    k_fid = jax.random.split(jax.random.PRNGKey(0), 3)[1]
    f = ia.fidelity(trojaned_logits, r.map, TROJAN, key=k_fid, options=OPTS)
    assert float(f) == pytest.approx(float(r.fidelity))
    # and by hand: the fraction of the fidelity samples the perturbed model classifies as TROJAN
    x = ia.draw_samples(k_fid, OPTS.fidelity_samples, SHAPE, distribution="uniform")
    hand = np.mean(np.asarray(jnp.argmax(trojaned_logits(jnp.clip(x + r.map, 0, 1)), -1)) == TROJAN)
    assert float(f) == pytest.approx(hand)


# ---------------------------------------------------------------------------------------------- whole method
def test_planted_linear_response_gives_a_map_on_the_patch():
    """Class 1 responds linearly to PATCH only: its gradient is zero elsewhere, so the unrefined map is exactly
    zero off the patch, positive on it, and (global steps of length lr = 0.05 eta, 30 steps) on the l2 sphere."""
    r = _compiled(True, model=patch_logits, refine_steps=0, curve_fractions=())(jax.random.PRNGKey(0), jnp.int32(1),
                                                                               jnp.float32(1.0))
    inside = np.zeros(SHAPE, bool)
    inside[PATCH[0], PATCH[1], 0] = True
    m = np.asarray(r.map)
    assert np.all(m[~inside] == 0.0) and np.all(m[inside] > 0.2)
    assert _l2(m) == pytest.approx(1.0, rel=1e-5)
    top4 = np.argsort(np.asarray(r.heatmap).ravel())[-4:]
    assert set(top4.tolist()) == set(np.flatnonzero(inside[..., 0]).tolist())
    assert float(r.fidelity) > 0.9  # the patch perturbation drives random inputs to class 1


def test_all_classes_batched_equals_per_class_calls():
    batched = _run("all", radius=2.0)
    assert batched.map.shape == (K,) + SHAPE and batched.success.shape == (K, 3)
    for c in range(K):
        single = _run(c, radius=2.0)
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[c], batched), single, rtol=1e-4, atol=1e-5)
        for name in ("fidelity", "fidelity_unrefined", "success", "refine_accepted"):
            np.testing.assert_array_equal(np.asarray(getattr(batched, name)[c]), np.asarray(getattr(single, name)))
    opts = dataclasses.replace(OPTS, radius=2.0, steps=3, curve_fractions=(), refine_steps=0)
    subset = ia.input_agnostic(trojaned_logits, SHAPE, jnp.array([3, 1]), key=jax.random.PRNGKey(0), options=opts)
    again = [ia.input_agnostic(trojaned_logits, SHAPE, c, key=jax.random.PRNGKey(0), options=opts).map for c in (3, 1)]
    chex.assert_trees_all_close(subset.map, jnp.stack(again), rtol=1e-4, atol=1e-5)


def test_same_key_same_map_and_different_key_differs():
    a, b, c = _run(0, key=7, radius=2.0), _run(0, key=7, radius=2.0), _run(0, key=8, radius=2.0)
    np.testing.assert_array_equal(np.asarray(a.map), np.asarray(b.map))
    assert not np.allclose(np.asarray(a.map), np.asarray(c.map))


def test_chunk_and_memory_budget_do_not_change_the_samples():
    """All classes (vmapped): chunks of 4 vs chunks of 1 (a 1-byte budget). The default ``chunk=None`` (auto) is
    exercised by test_model_handle_eager_equals_jitted_logits_fn."""
    short = dict(steps=6, curve_fractions=(0.5,), curve_steps=2, refine_steps=1)
    a = _run("all", radius=2.0, **short)
    chex.assert_trees_all_close(_run("all", radius=2.0, **short, chunk=None, memory_budget=1), a, rtol=1e-4, atol=1e-5)


def test_trojan_class_needs_the_smallest_radius_and_display_is_scaled():
    r = _run("all", radius=2.0)
    assert float(r.fidelity[TROJAN]) > 0.9
    # the trojaned class keeps its success at the smallest radius, the others lose it
    assert float(r.success[TROJAN, -1]) > 0.9
    assert float(jnp.max(jnp.delete(r.success[:, -1], TROJAN))) < 0.85
    d = np.asarray(r.display)
    assert d.min() == pytest.approx(0.0) and d.max() == pytest.approx(1.0)
    chex.assert_trees_all_close(r.heatmap, jnp.sum(jnp.abs(r.map), -1), rtol=1e-6)


def test_default_radius_learning_rate_and_normalization():
    """The documented defaults: l2 radius 0.15 sqrt(HWC) (high - low), lr 0.05 radius, "global"; l_inf radius
    0.3 (high - low), lr 0.02 (high - low), "coordinate"; an explicit value is kept."""
    l2 = ia.InputAgnosticOptions(low=-1.0, high=1.0).resolve(SHAPE)
    assert (float(l2.radius), float(l2.learning_rate), l2.normalization) == pytest.approx((2.4, 0.12, "global"))
    li = ia.InputAgnosticOptions(low=-1.0, high=1.0, norm="linf").resolve(SHAPE)
    assert (float(li.radius), float(li.learning_rate), li.normalization) == pytest.approx((0.6, 0.04, "coordinate"))
    mine = ia.InputAgnosticOptions(radius=3.0, learning_rate=0.5, normalization="coordinate").resolve(SHAPE)
    assert (mine.radius, mine.learning_rate, mine.normalization) == (3.0, 0.5, "coordinate")


def test_normalization_option_changes_the_map_as_documented():
    """"coordinate" (Adam) moves every pixel at the same rate: its map is spread (near-uniform |rho| where the
    gradient is non-zero); "global" keeps the gradient's magnitude profile (more concentrated)."""
    glob = _run(0, radius=2.0, refine_steps=0, curve_fractions=())
    coord = _run(0, radius=2.0, refine_steps=0, curve_fractions=(), normalization="coordinate")
    conc = lambda m: float(jnp.max(jnp.abs(m)) / jnp.mean(jnp.abs(m)))  # noqa: E731
    assert conc(glob.map) > 1.3 * conc(coord.map)


def test_sample_distributions():
    key = jax.random.PRNGKey(0)
    for dist in ia.DISTRIBUTIONS:
        x = ia.draw_samples(key, 16, (16, 16, 3), low=-1.0, high=2.0, distribution=dist)
        assert x.shape == (16, 16, 16, 3) and float(x.min()) >= -1.0 and float(x.max()) <= 2.0
    u = ia.draw_samples(key, 64, (16, 16, 1), distribution="uniform")
    lf = ia.draw_samples(key, 64, (16, 16, 1), distribution="lowfreq")
    rough = lambda a: float(jnp.mean(jnp.abs(jnp.diff(a, axis=1))))  # noqa: E731
    assert rough(lf) < 0.5 * rough(u)  # low-frequency noise is smoother
    # each sample from its own key: the first draws of a larger set are the draws of a smaller one
    chex.assert_trees_all_close(ia.draw_samples(key, 4, SHAPE), ia.draw_samples(key, 7, SHAPE)[:4])


def test_gaussian_blur_preserves_mass_and_does_not_grow_norm():
    x = jnp.zeros((9, 9, 2)).at[4, 4, :].set(1.0)
    y = ia.gaussian_blur(x, 1.0)
    # by hand: a delta blurs into the outer product of the 1-D kernel exp(-t^2 / 2 sigma^2), |t| <= ceil(2 sigma)
    k = np.exp(-0.5 * np.arange(-2.0, 3.0) ** 2)
    k /= k.sum()
    want = np.zeros((9, 9, 2), np.float32)
    want[2:7, 2:7, :] = np.outer(k, k)[..., None]
    chex.assert_trees_all_close(y, want, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(y.sum((0, 1)), jnp.array([1.0, 1.0]), rtol=1e-5)
    assert float(jnp.linalg.norm(y)) <= float(jnp.linalg.norm(x))


def test_model_handle_eager_equals_jitted_logits_fn():
    """A ModelHandle called eagerly gives the map of the plain logits_fn under jit (same key, same options)."""
    w = _weights()
    handle = ModelHandle(lambda variables, x, train=False: trojaned_logits(x, variables["params"]), {"params": w})
    opts = dataclasses.replace(OPTS, radius=2.0, steps=3, curve_fractions=(), refine_steps=0, chunk=None)
    eager = ia.input_agnostic(handle, SHAPE, 0, key=jax.random.PRNGKey(0), options=opts)
    jitted = jax.jit(lambda k: ia.input_agnostic(trojaned_logits, SHAPE, 0, key=k, options=opts))(jax.random.PRNGKey(0))
    chex.assert_trees_all_close(eager, jitted, rtol=1e-4, atol=1e-6)
    assert _l2(eager.map) > 0  # three steps moved the map


@pytest.mark.parametrize("bad,match", [
    (dict(radius=0.0), "radius"), (dict(radius=-1.0), "radius"), (dict(norm="l1"), "norm"),
    (dict(distribution="gauss"), "distribution"), (dict(curve_fractions=(1.5,)), "curve_fractions"),
    (dict(steps=0), "steps"), (dict(samples=2.5), "samples"), (dict(tolerance=-0.1), "tolerance"),
    (dict(low=1.0, high=0.0), "high must exceed low"), (dict(chunk=0), "chunk"),
    (dict(memory_budget=0), "memory_budget"),
    (dict(normalization="adam"), "normalization"), (dict(momentum=1.0), "momentum"),
    (dict(learning_rate=0.0), "learning_rate"), (dict(refine_sigma=0.0), "refine_sigma")])
def test_bad_options_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        ia.InputAgnosticOptions(**bad)
    with pytest.raises(ValueError, match=match):  # dataclasses.replace validates again
        dataclasses.replace(OPTS, **bad)


@pytest.mark.parametrize("bad,match", [
    (dict(target_class=K), r"\[0, 4\)"), (dict(target_class=-1), r"\[0, 4\)"),
    (dict(input_shape=(8, 8)), "input_shape"),
    (dict(target_class="some"), "target_class"), (dict(options=dict(steps=3)), "InputAgnosticOptions")])
def test_bad_call_raises(bad, match):
    kw = {"input_shape": SHAPE, "target_class": 0, "options": OPTS, **bad}
    with pytest.raises(ValueError, match=match):
        ia.input_agnostic(trojaned_logits, kw["input_shape"], kw["target_class"], key=jax.random.PRNGKey(0),
                          options=kw["options"])


# ---------------------------------------------------------------------------------------------- pinned output
# Values computed with the single-function implementation before it was split into stages (the commit that added
# this test), eagerly, with ``jax_disable_most_optimizations`` (this module's fixture): the stages must reproduce them.
PSHAPE, PK = (4, 4, 2), 3


def pin_logits(x):
    w = jnp.sin(jnp.arange(np.prod(PSHAPE) * PK, dtype=jnp.float32)).reshape(-1, PK) * 0.5
    z = x.reshape(x.shape[0], -1)
    return jnp.tanh(z @ w) * 3.0 + jnp.array([0.1, -0.2, 0.05])


PIN_CASES = {  # `chunk` was spelled `chunk_size` when the values were pinned
    "l2": dict(low=0.0, high=1.0, distribution="uniform", norm="l2", radius=1.0, steps=6, samples=5, chunk=2,
               fidelity_samples=20, curve_fractions=(0.5, 0.2), curve_steps=3, refine_steps=2, refine_sigma=0.7,
               tolerance=0.1),
    "linf": dict(low=-1.0, high=1.0, distribution="mixed", lowfreq_factor=2, norm="linf", radius=0.4, steps=5,
                 samples=4, chunk=3, learning_rate=0.05, momentum=0.8, fidelity_samples=16, curve_fractions=(0.6,),
                 curve_steps=2, refine_steps=1, refine_sigma=0.5, tolerance=0.2),
}
PINNED = {
    "l2": dict(
        map=[
            0.007126227, -0.003239583, 0.004163987, 0.001610528, -0.003950857, 0.009755856, -0.007256918,
            0.01110423, -0.01197565, 0.01619191, -0.02264461, 0.02841036, -0.02991886, 0.03492501, -0.02487421,
            0.02761984, -0.0301218, 0.03083715, -0.04257842, 0.04280305, -0.04173081, 0.04064945, -0.02855752,
            0.02695526, -0.02332386, 0.02137798, -0.02921899, 0.02586084, -0.02358444, 0.01946414, -0.0133154,
            0.0100654],
        loss=[1.90921, 1.556839, 1.103619, 1.179018, 1.329605, 1.036146],
        success=[0.25, 0.25, 0.15],
        fidelity=[0.15],
        fidelity_unrefined=[0.25],
        refine_accepted=[2],
        curve_last=[
            0.04361153, -0.03847763, 0.03257316, -0.02579549, 0.01849018, -0.01086183, 0.002960306, 0.004431876,
            -0.01286115, 0.02078637, -0.02663338, 0.03395991, -0.03671544, 0.0453614, -0.04941648, 0.05168847,
            -0.05479693, 0.05607487, -0.05345391, 0.0530003, -0.05283682, 0.04897993, -0.04475562, 0.03905535,
            -0.03394847, 0.02675444, -0.01995023, 0.01232419, -0.004451477, -0.003510328, 0.01156788,
            -0.01751039],
    ),
    "linf": dict(
        map=[
            0.1211391, -0.1119076, 0.1353174, -0.1257161, 0.1287379, -0.1020807, 0.08056966, 0.06643593,
            -0.1140252, 0.1253728, -0.140583, 0.1457214, -0.1419297, 0.1521993, -0.1371593, 0.1583336, -0.1680415,
            0.1700535, -0.1895773, 0.1869476, -0.1844915, 0.1639679, -0.1426242, 0.1380022, -0.155145, 0.1569758,
            -0.1704696, 0.1459355, -0.1218678, -0.03834755, 0.06630481, -0.09788667],
        loss=[2.546108, 2.086551, 1.009806, 0.9659094, 1.062393],
        success=[0.0625, 0.0625],
        fidelity=[0.0625],
        fidelity_unrefined=[0.0625],
        refine_accepted=[1],
        curve_last=[
            0.2304014, -0.2165496, 0.2348176, -0.2224202, 0.2354963, -0.2283912, 0.1714369, 0.08590127, -0.165991,
            0.2080319, -0.2044361, 0.2099045, -0.2028576, 0.217549, -0.219506, 0.2207426, -0.2222892, 0.223677,
            -0.22275, 0.2240339, -0.2274741, 0.2287652, -0.2297767, 0.2298982, -0.2332461, 0.238821, -0.2358091,
            0.2313415, -0.1997761, -0.07871174, 0.1621687, -0.1899341],
    ),
}


@pytest.mark.parametrize("case", sorted(PIN_CASES))
def test_output_pinned_to_the_single_function_implementation(case):
    opts = ia.InputAgnosticOptions(**PIN_CASES[case])
    r = jax.jit(lambda k: ia.input_agnostic(pin_logits, PSHAPE, 1, key=k, options=opts))(jax.random.PRNGKey(3))
    got = dict(map=r.map, loss=r.loss, success=r.success, fidelity=r.fidelity, fidelity_unrefined=r.fidelity_unrefined,
               refine_accepted=r.refine_accepted, curve_last=r.curve_maps[-1])
    want = {k: np.asarray(v, np.float32) for k, v in PINNED[case].items()}
    chex.assert_trees_all_close({k: np.asarray(v, np.float32).ravel() for k, v in got.items()}, want,
                                rtol=1e-4, atol=1e-6)
