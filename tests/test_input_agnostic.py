"""Input-agnostic saliency (seed 003 reconstruction): ball projection, refinement fidelity guarantee, batched vs
per-class equality, determinism, validation. Tiny hand-made models so that everything compiles in seconds."""
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


OPTS = dict(input_shape=SHAPE, low=0.0, high=1.0, distribution="uniform", steps=30, samples=8, chunk_size=4, fidelity_samples=64,
            curve_fractions=(0.5, 0.25), curve_steps=5, refine_steps=3, refine_sigma=1.0, tolerance=0.05)


@functools.lru_cache(maxsize=None)
def _compiled(single: bool, **extra):
    """One compiled program per option set; the class, the key and the radius are traced arguments."""
    opts = {**OPTS, **dict(extra)}
    if single:
        return jax.jit(lambda k, c, r: ia.input_agnostic(trojaned_logits, c, key=k, radius=r, **opts))
    return jax.jit(lambda k, r: ia.input_agnostic(trojaned_logits, "all", key=k, radius=r, **opts))


def _run(target, key=0, radius=2.0, **extra):
    k, r = jax.random.PRNGKey(key), jnp.float32(radius)
    if isinstance(target, str):
        return _compiled(False, **extra)(k, r)
    return _compiled(True, **extra)(k, jnp.int32(target), r)


@pytest.mark.parametrize("norm,radius", [("l2", 1.5), ("linf", 0.3)])
def test_projection_keeps_perturbation_in_ball(norm, radius):
    r = _run(1, radius=radius, **({} if norm == "l2" else {"norm": norm}))
    p = {"l2": lambda a: float(jnp.linalg.norm(a.ravel())), "linf": lambda a: float(jnp.max(jnp.abs(a)))}[norm]
    assert p(r.map) <= radius * (1 + 1e-5)
    for rad, m in zip(np.asarray(r.radii), np.asarray(r.curve_maps)):
        assert p(jnp.asarray(m)) <= rad * (1 + 1e-5)
    np.testing.assert_allclose(np.asarray(r.radii), radius * np.array([1.0, 0.5, 0.25]), rtol=1e-6)
    # the optimizer actually uses the ball: the unrefined map sits on its boundary
    assert p(r.curve_maps[0]) >= 0.99 * radius
    # and the standalone projection
    x = jax.random.normal(jax.random.PRNGKey(0), SHAPE) * 5
    assert p(ia.project(x, radius, norm)) <= radius * (1 + 1e-6)


def test_refinement_never_lowers_fidelity_beyond_tolerance():
    tolerance = OPTS["tolerance"]
    for key in range(3):
        r = _run("all", key=key, radius=2.0)
        assert np.all(np.asarray(r.fidelity) >= np.asarray(r.fidelity_unrefined) - tolerance - 1e-7)
        assert np.all((0 <= np.asarray(r.refine_accepted)) & (np.asarray(r.refine_accepted) <= 3))


def test_reported_fidelity_is_the_success_rate_on_the_fidelity_set():
    r = _run(TROJAN, radius=2.0)
    k_fid = jax.random.split(jax.random.PRNGKey(0), 3)[1]
    f = ia.fidelity(trojaned_logits, r.map, TROJAN, key=k_fid, samples=OPTS["fidelity_samples"], chunk_size=4)
    assert float(f) == pytest.approx(float(r.fidelity))


def test_all_classes_batched_equals_per_class_calls():
    batched = _run("all", radius=2.0)
    assert batched.map.shape == (K,) + SHAPE and batched.success.shape == (K, 3)
    for c in range(K):
        single = _run(c, radius=2.0)
        for name in ("map", "curve_maps", "loss"):
            np.testing.assert_allclose(np.asarray(getattr(batched, name)[c]), np.asarray(getattr(single, name)),
                                       rtol=1e-4, atol=1e-5, err_msg=f"{name}, class {c}")
        for name in ("fidelity", "fidelity_unrefined", "success", "refine_accepted"):
            np.testing.assert_array_equal(np.asarray(getattr(batched, name)[c]), np.asarray(getattr(single, name)))
    subset = ia.input_agnostic(trojaned_logits, jnp.array([3, 1]), key=jax.random.PRNGKey(0), radius=2.0,
                               **{**OPTS, "steps": 3, "curve_fractions": (), "refine_steps": 0})
    again = [ia.input_agnostic(trojaned_logits, c, key=jax.random.PRNGKey(0), radius=2.0,
                               **{**OPTS, "steps": 3, "curve_fractions": (), "refine_steps": 0}).map for c in (3, 1)]
    np.testing.assert_allclose(np.asarray(subset.map),
                               np.stack([np.asarray(a) for a in again]), rtol=1e-4, atol=1e-5)


def test_same_key_same_map_and_different_key_differs():
    a, b, c = _run(0, key=7, radius=2.0), _run(0, key=7, radius=2.0), _run(0, key=8, radius=2.0)
    np.testing.assert_array_equal(np.asarray(a.map), np.asarray(b.map))
    assert not np.allclose(np.asarray(a.map), np.asarray(c.map))


def test_chunk_size_does_not_change_the_samples():
    a = _run(1, radius=2.0)
    b = _run(1, radius=2.0, chunk_size=3)
    np.testing.assert_allclose(np.asarray(a.map), np.asarray(b.map), rtol=1e-4, atol=1e-5)


def test_trojan_class_needs_the_smallest_radius_and_display_is_scaled():
    r = _run("all", radius=2.0)
    assert float(r.fidelity[TROJAN]) > 0.9
    # the trojaned class keeps its success at the smallest radius, the others lose it
    assert float(r.success[TROJAN, -1]) > 0.9
    assert float(jnp.max(jnp.delete(r.success[:, -1], TROJAN))) < 0.85
    d = np.asarray(r.display)
    assert d.min() == pytest.approx(0.0) and d.max() == pytest.approx(1.0)
    np.testing.assert_allclose(np.asarray(r.heatmap), np.abs(np.asarray(r.map)).sum(-1), rtol=1e-6)


def test_sample_distributions():
    key = jax.random.PRNGKey(0)
    for dist in ia.DISTRIBUTIONS:
        x = ia.draw_samples(key, 16, (16, 16, 3), low=-1.0, high=2.0, distribution=dist)
        assert x.shape == (16, 16, 16, 3) and float(x.min()) >= -1.0 and float(x.max()) <= 2.0
    u = ia.draw_samples(key, 64, (16, 16, 1), distribution="uniform")
    lf = ia.draw_samples(key, 64, (16, 16, 1), distribution="lowfreq")
    rough = lambda a: float(jnp.mean(jnp.abs(jnp.diff(a, axis=1))))
    assert rough(lf) < 0.5 * rough(u)  # low-frequency noise is smoother
    # each sample from its own key: drawing more samples keeps the first ones
    np.testing.assert_array_equal(np.asarray(ia.draw_samples(key, 4, SHAPE)),
                                  np.asarray(ia.draw_samples(key, 4, SHAPE)))


def test_gaussian_blur_preserves_mass_and_does_not_grow_norm():
    x = jnp.zeros((9, 9, 2)).at[4, 4, :].set(1.0)
    y = ia.gaussian_blur(x, 1.0)
    np.testing.assert_allclose(np.asarray(y.sum((0, 1))), [1.0, 1.0], rtol=1e-5)
    assert float(jnp.linalg.norm(y)) <= float(jnp.linalg.norm(x))


def test_model_handle_and_eager_call_work():
    w = _weights()
    handle = ModelHandle(lambda variables, x, train=False: trojaned_logits(x, variables["params"]), {"params": w})
    r = ia.input_agnostic(handle, 0, key=jax.random.PRNGKey(0), **{**OPTS, "steps": 3, "curve_fractions": (),
                                                                    "refine_steps": 0})
    assert r.map.shape == SHAPE and r.radii.shape == (1,)


@pytest.mark.parametrize("bad,match", [
    (dict(radius=0.0), "radius"), (dict(radius=-1.0), "radius"), (dict(target_class=K), r"\[0, 4\)"),
    (dict(target_class=-1), r"\[0, 4\)"), (dict(input_shape=(8, 8)), "input_shape"), (dict(norm="l1"), "norm"),
    (dict(distribution="gauss"), "distribution"), (dict(target_class="some"), "target_class"),
    (dict(curve_fractions=(1.5,)), "curve_fractions"), (dict(steps=0), "steps"), (dict(tolerance=-0.1), "tolerance"),
    (dict(low=1.0, high=0.0), "high must exceed low")])
def test_bad_input_raises(bad, match):
    kw = {**OPTS, "target_class": 0, **bad}
    target = kw.pop("target_class")
    with pytest.raises(ValueError, match=match):
        ia.input_agnostic(trojaned_logits, target, key=jax.random.PRNGKey(0), **kw)


# ---------------------------------------------------------------------------------------------- pinned output
# Values computed with the single-function implementation before it was split into stages (commit of this test),
# eagerly, with ``jax_disable_most_optimizations`` (this module's fixture): the stage functions must reproduce them.
PSHAPE, PK = (4, 4, 2), 3


def pin_logits(x):
    w = jnp.sin(jnp.arange(np.prod(PSHAPE) * PK, dtype=jnp.float32)).reshape(-1, PK) * 0.5
    z = x.reshape(x.shape[0], -1)
    return jnp.tanh(z @ w) * 3.0 + jnp.array([0.1, -0.2, 0.05])


PIN_CASES = {
    "l2": dict(low=0.0, high=1.0, distribution="uniform", norm="l2", radius=1.0, steps=6, samples=5, chunk_size=2,
               fidelity_samples=20, curve_fractions=(0.5, 0.2), curve_steps=3, refine_steps=2, refine_sigma=0.7,
               tolerance=0.1),
    "linf": dict(low=-1.0, high=1.0, distribution="mixed", lowfreq_factor=2, norm="linf", radius=0.4, steps=5,
                 samples=4, chunk_size=3, learning_rate=0.05, momentum=0.8, fidelity_samples=16, curve_fractions=(0.6,),
                 curve_steps=2, refine_steps=1, refine_sigma=0.5, tolerance=0.2),
}
PINNED = {
    "l2": dict(
         map=[0.007126227, -0.003239583, 0.004163987, 0.001610528, -0.003950857, 0.009755856, -0.007256918, 0.01110423, -0.01197565, 0.01619191, -0.02264461, 0.02841036, -0.02991886, 0.03492501, -0.02487421, 0.02761984, -0.0301218, 0.03083715, -0.04257842, 0.04280305, -0.04173081, 0.04064945, -0.02855752, 0.02695526, -0.02332386, 0.02137798, -0.02921899, 0.02586084, -0.02358444, 0.01946414, -0.0133154, 0.0100654],
         loss=[1.90921, 1.556839, 1.103619, 1.179018, 1.329605, 1.036146],
         success=[0.25, 0.25, 0.15],
         fidelity=[0.15],
         fidelity_unrefined=[0.25],
         refine_accepted=[2],
         curve_last=[0.04361153, -0.03847763, 0.03257316, -0.02579549, 0.01849018, -0.01086183, 0.002960306, 0.004431876, -0.01286115, 0.02078637, -0.02663338, 0.03395991, -0.03671544, 0.0453614, -0.04941648, 0.05168847, -0.05479693, 0.05607487, -0.05345391, 0.0530003, -0.05283682, 0.04897993, -0.04475562, 0.03905535, -0.03394847, 0.02675444, -0.01995023, 0.01232419, -0.004451477, -0.003510328, 0.01156788, -0.01751039],
    ),
    "linf": dict(
         map=[0.1211391, -0.1119076, 0.1353174, -0.1257161, 0.1287379, -0.1020807, 0.08056966, 0.06643593, -0.1140252, 0.1253728, -0.140583, 0.1457214, -0.1419297, 0.1521993, -0.1371593, 0.1583336, -0.1680415, 0.1700535, -0.1895773, 0.1869476, -0.1844915, 0.1639679, -0.1426242, 0.1380022, -0.155145, 0.1569758, -0.1704696, 0.1459355, -0.1218678, -0.03834755, 0.06630481, -0.09788667],
         loss=[2.546108, 2.086551, 1.009806, 0.9659094, 1.062393],
         success=[0.0625, 0.0625],
         fidelity=[0.0625],
         fidelity_unrefined=[0.0625],
         refine_accepted=[1],
         curve_last=[0.2304014, -0.2165496, 0.2348176, -0.2224202, 0.2354963, -0.2283912, 0.1714369, 0.08590127, -0.165991, 0.2080319, -0.2044361, 0.2099045, -0.2028576, 0.217549, -0.219506, 0.2207426, -0.2222892, 0.223677, -0.22275, 0.2240339, -0.2274741, 0.2287652, -0.2297767, 0.2298982, -0.2332461, 0.238821, -0.2358091, 0.2313415, -0.1997761, -0.07871174, 0.1621687, -0.1899341],
    ),
}


@pytest.mark.parametrize("case", sorted(PIN_CASES))
def test_output_pinned_to_the_single_function_implementation(case):
    r = jax.jit(lambda k: ia.input_agnostic(pin_logits, 1, key=k, input_shape=PSHAPE, **PIN_CASES[case]))(
        jax.random.PRNGKey(3))
    got = dict(map=r.map, loss=r.loss, success=r.success, fidelity=r.fidelity, fidelity_unrefined=r.fidelity_unrefined,
               refine_accepted=r.refine_accepted, curve_last=r.curve_maps[-1])
    want = {k: np.asarray(v, np.float32) for k, v in PINNED[case].items()}
    chex.assert_trees_all_close({k: np.asarray(v, np.float32).ravel() for k, v in got.items()}, want,
                                rtol=1e-4, atol=1e-6)
