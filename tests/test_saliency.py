"""Tests of gradjax.saliency: completeness of FullGrad's parts, IG convergence, guided backprop's backward rule,
Grad-CAM against a hand computation, jit == eager for every registered method, no recompilation of eager calls,
boundary errors."""
import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax import saliency as S
from gradjax.saliency.internal_layers import guided_interceptor
from gradjax.models import create_model
from gradjax.models.layers import (Activation, TappedBatchNorm, TappedConv, TappedDense, global_average_pool,
                                   max_pool)


pytestmark = pytest.mark.usefixtures("fast_compilation")


# ------------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------------

def randomize(variables, seed, scale=0.2):
    """Give every bias / BatchNorm statistic a non-zero value so that bias-gradients are non-trivial
    (numpy randomness: no per-shape compilation)."""
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        name = jax.tree_util.keystr(path)
        leaf = np.asarray(leaf)
        if "var" in name:
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        if "mean" in name:
            return jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype)
        if leaf.ndim == 1:
            return jnp.asarray(leaf + scale * rng.standard_normal(leaf.shape), leaf.dtype)
        return jnp.asarray(leaf * (1 + 0.5 * rng.standard_normal(leaf.shape)), leaf.dtype)

    return {k: jax.tree_util.tree_map_with_path(perturb, variables[k])
            for k in ("params", "batch_stats") if k in variables}


def rbg_key(seed):
    """Stochastic tests use RBG keys: their random bits compile ~5x faster on CPU than threefry's (one test
    uses a threefry ``PRNGKey`` to cover raw uint32 keys)."""
    return jax.random.key(seed, impl="rbg")


def init(model, x, seed):
    """Variables at their usual initial values (He-normal kernels, zero biases, unit BatchNorm scale and
    variance), drawn with numpy from the shapes of ``model.init``: nothing is compiled."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            return jnp.asarray(rng.standard_normal(s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1])), s.dtype)
        if "scale" in name or "var" in name:
            return jnp.ones(s.shape, s.dtype)
        return jnp.zeros(s.shape, s.dtype)

    return {k: jax.tree_util.tree_map_with_path(fill, shapes[k]) for k in ("params", "batch_stats") if k in shapes}


def make_vgg(size, activation="relu", seed=0, random_biases=True, batch=2):
    model = create_model("vgg4", 10, activation=activation, width=0.125)
    x = jnp.asarray(np.random.default_rng(seed + 100).standard_normal((batch, size, size, 1)), jnp.float32)
    v = init(model, x, seed)
    if random_biases:
        v = randomize(v, seed + 1)
    return model, S.ModelHandle(model.apply, v), x


@pytest.fixture(scope="module")
def vgg8px():
    return make_vgg(8, seed=3)


class NoPoolNet(nn.Module):
    """conv-bn-act, conv-bn-act at full resolution, global average pool, dense: every map is input-sized.
    A tiny model (cheap to compile) with every kind of bias tap."""

    activation: str = "relu"

    @nn.compact
    def __call__(self, x, train=False):
        for i, c in enumerate((3, 4)):
            x = TappedConv(c, name=f"conv{i}")(x)
            x = TappedBatchNorm(name=f"bn{i}")(x, train=train)
            x = Activation(self.activation, 4.0, name=f"act{i}")(x)
        return TappedDense(5, name="head")(global_average_pool(x))


def make_nopool(activation="relu", seed=7):
    m = NoPoolNet(activation)
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((2, 6, 6, 2)), jnp.float32)
    v = randomize(init(m, x, seed + 1), seed + 2)
    return m, S.ModelHandle(m.apply, v), x


@pytest.fixture(scope="module")
def nopool():
    return make_nopool()


@contextlib.contextmanager
def count_compiles():
    """Counts XLA compilations inside the block (``jax.monitoring``): ``with count_compiles() as n: ...; n[0]``."""
    n = [0]

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            n[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield n
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


SMALL_OPTIONS = {
    "integrated_gradients": dict(steps=3, chunk=2),
    "smoothgrad": dict(samples=3, chunk=2),
    "smoothgrad_sq": dict(samples=3, chunk=2),
    "vargrad": dict(samples=3, chunk=2),
    "smooth_fullgrad": dict(samples=2, chunk=1),
}


# ------------------------------------------------------------------------------------------------------------
# every method: call shape, jit == eager
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(S.SALIENCY_METHODS))
def test_every_method_jit_matches_eager(name, nopool):
    _, h, x = nopool
    fn = S.SALIENCY_METHODS[name]
    key = rbg_key(5)
    t = jnp.array([1, 4])
    opts = SMALL_OPTIONS.get(name, {})
    eager = fn(h, x, t, key=key, **opts)  # op by op: nothing in gradjax jits itself
    jitted = jax.jit(lambda x_, t_, k_: fn(h, x_, t_, key=k_, **opts))(x, t, key)
    assert eager.shape == x.shape[:3]
    assert bool(jnp.all(jnp.isfinite(eager)))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-4, atol=1e-5 * float(jnp.abs(eager).max() + 1e-12))
    # a nonzero map (the model is random, but not degenerate)
    assert float(jnp.abs(eager).max()) > 0


@pytest.mark.parametrize("name", ["fullgrad_maps", "integrated_gradients_with_delta", "noise_gradient_moments",
                                  "tap_gradients"])
def test_public_functions_outside_the_registry_jit_matches_eager(name, nopool):
    _, h, x = nopool
    fn = getattr(S, name)
    opts = {"integrated_gradients_with_delta": dict(steps=3, chunk=2),
            "noise_gradient_moments": dict(samples=3, chunk=2, key=rbg_key(1))}.get(name, {})
    t = jnp.array([2, 0])
    eager = fn(h, x, t, **opts)
    jitted = jax.jit(lambda h_, x_, t_: fn(h_, x_, t_, **opts))(h, x, t)
    assert jax.tree.structure(eager) == jax.tree.structure(jitted)
    # one absolute scale for all leaves: fullgrad_maps' completeness residual is itself round-off of the output
    scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(eager))
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * (scale + 0.1))


@pytest.mark.parametrize("name", sorted(S.SALIENCY_METHODS))
def test_a_repeated_eager_call_compiles_nothing(name, nopool):
    """Nothing in gradjax jits itself: an eager call runs JAX's per-operation programs (compiled once per shape),
    and chunk loops run as Python loops eagerly (an eager lax.scan would recompile its fresh body every call)."""
    _, h, x = nopool
    fn = S.SALIENCY_METHODS[name]
    opts = dict(SMALL_OPTIONS.get(name, {}), key=rbg_key(5))  # options with two or more chunks
    first = fn(h, x, jnp.array([1, 4]), **opts)
    with count_compiles() as n:
        second = fn(h, x, jnp.array([1, 4]), **opts)
    assert n[0] == 0, f"{name}: {n[0]} compilations on the second eager call"
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_jit_method_is_an_explicit_bounded_compiled_method(nopool):
    _, h, x = nopool
    sg = S.jit_method("smoothgrad", samples=3, chunk=2)
    key, x2, t1, t2 = rbg_key(5), 2.0 * x, jnp.array([1, 4]), jnp.array([0, 2])
    with count_compiles() as n:
        a = sg(h, x, t1, key=key)
        b = sg(h, x2, t2, key=key)  # same shapes: the same program
    assert n[0] == 1
    np.testing.assert_allclose(np.asarray(a), np.asarray(S.smoothgrad(h, x, jnp.array([1, 4]), key=key, samples=3,
                                                                      chunk=2)), rtol=1e-4, atol=1e-6)
    assert not np.allclose(np.asarray(a), np.asarray(b))
    sg.clear()
    with count_compiles() as n:
        sg(h, x, t1, key=key)
    assert n[0] == 1  # cleared: compiled again


def test_model_handle_is_a_pytree_through_jit(nopool):
    _, h, x = nopool
    a = S.fullgrad(h, x)  # eager
    b = jax.jit(S.fullgrad)(h, x)  # the handle is an argument: variables traced, apply_fn static
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert "perturbations" not in h.variables and "biases" not in h.variables


def test_gradient_methods_accept_a_plain_logits_callable(nopool):
    _, h, x = nopool
    f = lambda z: h.logits(z)  # noqa: E731
    np.testing.assert_allclose(np.asarray(S.input_gradient(f, x)), np.asarray(S.input_gradient(h, x)), rtol=1e-6)
    with pytest.raises(ValueError, match="ModelHandle"):
        S.fullgrad(f, x)


# ------------------------------------------------------------------------------------------------------------
# FullGrad
# ------------------------------------------------------------------------------------------------------------

def test_fullgrad_pre_psi_parts_sum_to_output_vgg32():
    model, h, x = make_vgg(32)
    t = jnp.array([2, 7])
    fm, logits = jax.jit(lambda x_: (S.fullgrad_maps(h, x_, t), model.apply(h.variables, x_)))(x)
    dec = fm.decomposition
    total = (dec.input_gradient * x).reshape(2, -1).sum(1)
    for m in dec.bias_gradients.values():
        total = total + m.reshape(2, -1).sum(1)
    out = logits[jnp.arange(2), t]
    np.testing.assert_allclose(np.asarray(total), np.asarray(out), rtol=2e-4, atol=2e-4)
    # the bias part is not negligible, so this checks more than the input term
    assert float(jnp.min(jnp.abs(out - (dec.input_gradient * x).reshape(2, -1).sum(1)))) > 1e-2
    # maps for every spatial conv and bn site (default merge="none", the authors'), none for the dense head
    assert set(fm.layer_maps) == {f"block{i}/{site}" for i in range(3) for site in ("conv", "bn")}
    assert fm.saliency.shape == (2, 32, 32)
    np.testing.assert_allclose(np.asarray(fm.saliency),
                               np.asarray(fm.input_map + sum(fm.layer_maps.values())), rtol=1e-6, atol=1e-6)


def test_fullgrad_noabs_map_sums_to_output_minus_dense_terms(nopool):
    model, h, x = nopool
    t = jnp.array([0, 3])
    dec = S.fullgrad_maps(h, x, t).decomposition
    noabs = S.fullgrad_noabs(h, x, t)  # psi_m = bilinearUpsample = identity at full resolution
    out = model.apply(h.variables, x)[jnp.arange(2), t]
    head = dec.bias_gradients["head"].sum(1)
    np.testing.assert_allclose(np.asarray(noabs.reshape(2, -1).sum(1)), np.asarray(out - head), rtol=1e-4, atol=1e-4)


def test_fullgrad_psi_matches_manual_rescale(nopool):
    _, h, x = nopool
    fm = S.fullgrad_maps(h, x, jnp.array([1, 2]))
    dec = fm.decomposition

    def psi(m, axes):
        a = np.abs(np.asarray(m, np.float64))
        lo, hi = a.min(axis=axes, keepdims=True), a.max(axis=axes, keepdims=True)
        return ((a - lo) / (hi - lo + 1e-6)).sum(-1)

    np.testing.assert_allclose(np.asarray(fm.input_map), psi(dec.input_gradient * x, (1, 2, 3)), rtol=1e-5, atol=1e-6)
    for k, m in dec.bias_gradients.items():
        if m.ndim == 4:
            np.testing.assert_allclose(np.asarray(fm.layer_maps[k]), psi(m, (1, 2, 3)), rtol=1e-5, atol=1e-6)
    # per-channel rescaling (literal eq. 3.2): every channel of every layer reaches exactly 1
    per_ch = S.fullgrad_maps(h, x, jnp.array([1, 2]), rescale="channel")
    np.testing.assert_allclose(np.asarray(per_ch.layer_maps["bn1"]),
                               psi(dec.bias_gradients["bn1"], (1, 2)), rtol=1e-5, atol=1e-6)


def test_tap_gradients_times_bias_are_the_bias_gradients(nopool):
    from gradjax.fullgrad import flatten_taps
    _, h, x = nopool

    def everything(x):
        dec = S.fullgrad_maps(h, x, merge="none").decomposition  # per site
        taps = S.tap_gradients(h, x)
        gx, gz = taps.input_gradient, taps.tap_gradients
        _, state = h.apply_fn(h.variables, x, mutable=["biases"])
        simple = S.fullgrad_simple(h, x)
        # simple FullGrad = the same aggregation of |grad_z f|
        manual = S.postprocess_map(gx * x, x.shape[1:3]) + sum(S.postprocess_map(v, x.shape[1:3])
                                                                 for v in gz.values() if v.ndim == 4)
        return dec, gx, gz, flatten_taps(state["biases"]), simple, manual

    dec, gx, gz, b, simple, manual = jax.jit(everything)(x)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(dec.input_gradient), rtol=1e-5, atol=1e-6)
    for k in dec.bias_gradients:
        np.testing.assert_allclose(np.asarray(gz[k] * b[k]), np.asarray(dec.bias_gradients[k]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(simple), np.asarray(manual), rtol=1e-5, atol=1e-6)


def test_smooth_fullgrad_without_noise_is_fullgrad(nopool):
    _, h, x = nopool  # 2 input channels: the input-term rule matters
    key = rbg_key(0)
    for input_sum in ("before", "after"):  # "before": the reference SmoothFullGrad's default
        ref = S.fullgrad(h, x, input_sum=input_sum)
        for average in ("raw", "saliency"):
            kw = {} if input_sum == "before" else dict(input_sum=input_sum)
            sm = S.smooth_fullgrad(h, x, key=key, samples=2, chunk=2, noise_level=0.0, average=average, **kw)
            np.testing.assert_allclose(np.asarray(sm), np.asarray(ref), rtol=1e-5, atol=1e-5)


# --- the reference FullGrad code's post-processing (idiap/fullgrad-saliency), re-implemented in numpy (issue 14) ---

def _np_upsample_align_corners(m, H, W):
    """Bilinear resize ``[B, h, w, c] -> [B, H, W, c]`` with ``align_corners=True``, pixel by pixel."""
    B, h, w, c = m.shape
    out = np.zeros((B, H, W, c))
    for i in range(H):
        y = i * (h - 1) / (H - 1) if H > 1 and h > 1 else 0.0
        y0 = min(int(np.floor(y)), h - 1)
        y1, wy = min(y0 + 1, h - 1), y - y0
        for j in range(W):
            xx = j * (w - 1) / (W - 1) if W > 1 and w > 1 else 0.0
            x0 = min(int(np.floor(xx)), w - 1)
            x1, wx = min(x0 + 1, w - 1), xx - x0
            out[:, i, j] = ((1 - wy) * ((1 - wx) * m[:, y0, x0] + wx * m[:, y0, x1])
                            + wy * ((1 - wx) * m[:, y1, x0] + wx * m[:, y1, x1]))
    return out


def _np_authors_psi(m, size, eps=1e-6):
    """abs -> per-example min-max rescale over all channels ``(m - min) / (max - min + eps)`` -> bilinear upsample
    (align_corners) -> channel sum: ``FullGrad._postProcess`` + ``F.interpolate`` + ``.sum(1)``."""
    a = np.abs(np.asarray(m, np.float64))
    lo = a.reshape(len(a), -1).min(1)[:, None, None, None]
    a = a - lo
    hi = a.reshape(len(a), -1).max(1)[:, None, None, None]
    return _np_upsample_align_corners(a / (hi + eps), *size).sum(-1)


def _np_authors_fullgrad(input_term, layer_terms, size, eps=1e-6, input_sum_first=False):
    """``FullGrad.saliency`` (``input_sum_first=False``) / ``SmoothFullGrad.saliency`` without noise (``True``:
    the input term is summed over channels before the post-processing)."""
    inp = np.asarray(input_term, np.float64)
    if input_sum_first:
        inp = inp.sum(-1, keepdims=True)
    total = _np_authors_psi(inp, size, eps)
    for m in layer_terms:
        total = total + _np_authors_psi(m, size, eps)
    return total


def bn_vgg_after_training(seed=5):
    """A BatchNorm VGG-6 (width 1/16) on 16x16 RGB inputs in the state training leaves it in: conv biases start at
    zero and get no gradient through BatchNorm, so they end at round-off size (~1e-9, set here deterministically);
    BatchNorm biases and statistics of a normal size."""
    model = create_model("vgg6", 10, width=1 / 16)
    x = jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    v = randomize(init(model, x, seed), seed + 1)
    rng = np.random.default_rng(seed + 2)
    params = {k: dict(b) for k, b in v["params"].items()}
    for k, b in params.items():
        if k.startswith("block"):
            b["conv"] = dict(b["conv"], bias=jnp.asarray(1e-9 * rng.standard_normal(b["conv"]["bias"].shape),
                                                         jnp.float32))
    v = dict(v, params=params)
    return model, S.ModelHandle(model.apply, v), x


@pytest.fixture(scope="module")
def bn_vgg():
    return bn_vgg_after_training()


def _bn_vgg_terms(h, x, t):
    """Input term, per-site bias-gradients ``grad_z f * b`` and the folded conv+BN bias-gradients, in numpy."""
    taps = S.tap_gradients(h, x, t)
    g = {k: np.asarray(v, np.float64) for k, v in taps.tap_gradients.items()}
    inp = np.asarray(taps.input_gradient, np.float64) * np.asarray(x, np.float64)
    p, bs = h.variables["params"], h.variables["batch_stats"]
    blocks = sorted({k.split("/")[0] for k in g if k.startswith("block")})
    sep, folded = [], []
    for blk in blocks:
        b_conv = np.asarray(p[blk]["conv"]["bias"], np.float64)
        gamma, beta = np.asarray(p[blk]["bn"]["scale"], np.float64), np.asarray(p[blk]["bn"]["bias"], np.float64)
        mean, var = np.asarray(bs[blk]["bn"]["mean"], np.float64), np.asarray(bs[blk]["bn"]["var"], np.float64)
        s = gamma / np.sqrt(var + 1e-5)
        b_bn = beta - s * mean
        # grad wrt the conv output = s * grad wrt the BN output
        sep += [g[f"{blk}/conv"] * b_conv, g[f"{blk}/bn"] * b_bn]
        folded.append(g[f"{blk}/bn"] * (b_bn + s * b_conv))  # conv+BN folded into one conv with this bias
    return inp, sep, folded


def test_fullgrad_matches_the_authors_formula_on_a_trained_bn_vgg(bn_vgg):
    _, h, x = bn_vgg
    t = jnp.array([3, 8])
    size = x.shape[1:3]
    inp, sep, folded = _bn_vgg_terms(h, x, t)
    assert max(np.abs(m).max() for m in sep[0::2]) < 1e-7  # the conv maps are round-off-sized
    tol = dict(rtol=1e-5, atol=2e-5)
    # default merge="none": every conv and BatchNorm a layer, exactly the reference code on this network
    authors = _np_authors_fullgrad(inp, sep, size)
    np.testing.assert_allclose(np.asarray(S.fullgrad(h, x, t)), authors, **tol)
    # merge="conv_bn": the reference code on the same network with every conv+BN folded into one conv
    merged = np.asarray(S.fullgrad(h, x, t, merge="conv_bn"))
    np.testing.assert_allclose(merged, _np_authors_fullgrad(inp, folded, size), **tol)
    # here the two differ only by the conv maps' weights ~max|f^b_conv| / 1e-6 (~1e-3)
    rng = authors.max((1, 2)) - authors.min((1, 2))
    assert np.abs(merged - authors).max() < 0.02 * rng.min()
    # the old rescaling (eps=0) stretches each round-off conv map to [0, 1]: far from the reference
    old = np.asarray(S.fullgrad(h, x, t, merge="none", eps=0.0))
    np.testing.assert_allclose(old, _np_authors_fullgrad(inp, sep, size, eps=0.0), rtol=1e-4, atol=1e-4)
    assert np.abs(old - authors).max() > 0.1 * rng.min()
    # eps is irrelevant once conv and BN are one layer
    np.testing.assert_allclose(np.asarray(S.fullgrad(h, x, t, eps=0.0, merge="conv_bn")), merged,
                               rtol=1e-4, atol=1e-4)


def test_smooth_fullgrad_without_noise_uses_the_authors_input_rule_on_rgb(bn_vgg):
    _, h, x = bn_vgg
    t = jnp.array([3, 8])
    size = x.shape[1:3]
    inp, sites, _ = _bn_vgg_terms(h, x, t)  # default merge="none": the authors' per-site layers
    sm = np.asarray(S.smooth_fullgrad(h, x, t, key=rbg_key(1), samples=1, chunk=1, noise_level=0.0))
    ref = _np_authors_fullgrad(inp, sites, size, input_sum_first=True)  # SmoothFullGrad: grd.sum(1) first
    np.testing.assert_allclose(sm, ref, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(sm, np.asarray(S.fullgrad(h, x, t, input_sum="before")), rtol=1e-5, atol=1e-5)
    # the old rule (post-process the input term per layer, channels summed after) is input_sum="after"
    old = np.asarray(S.smooth_fullgrad(h, x, t, key=rbg_key(1), samples=1, chunk=1, noise_level=0.0,
                                       input_sum="after"))
    np.testing.assert_allclose(old, _np_authors_fullgrad(inp, sites, size), rtol=1e-5, atol=2e-5)
    assert np.abs(old - sm).max() > 1e-3  # on RGB the two rules differ


def test_noise_scale_over_the_batch_or_per_example():
    from gradjax.saliency.noise_family import noise_scale
    x = jnp.stack([jnp.linspace(0, 1, 16).reshape(4, 4, 1), jnp.linspace(-5, 5, 16).reshape(4, 4, 1)])
    np.testing.assert_allclose(np.asarray(noise_scale(x, 0.1)).ravel(), [0.1, 1.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(noise_scale(x, 0.1, "batch")).ravel(), [1.0, 1.0], rtol=1e-6)
    assert noise_scale(x, 0.1, "batch").shape == (2, 1, 1, 1)
    with pytest.raises(ValueError, match="over"):
        noise_scale(x, 0.1, "pixel")


def test_bilinear_upsample_align_corners_and_half_pixel():
    m = jnp.arange(6.0).reshape(1, 2, 3)
    up = S.bilinear_upsample(m, (3, 5), align_corners=True)
    # corners preserved, midpoints averaged
    np.testing.assert_allclose(np.asarray(up[0, [0, 0, -1, -1], [0, -1, 0, -1]]), [0, 2, 3, 5])
    np.testing.assert_allclose(float(up[0, 1, 1]), (0 + 1 + 3 + 4) / 4)
    half = S.bilinear_upsample(m, (4, 6), align_corners=False)
    ref = jax.image.resize(m, (1, 4, 6), "bilinear", antialias=False)
    np.testing.assert_allclose(np.asarray(half), np.asarray(ref), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# integrated gradients, SmoothGrad family
# ------------------------------------------------------------------------------------------------------------

def test_ig_completeness_delta_shrinks_with_steps_softplus():
    _, h, x = make_nopool("softplus", seed=11)
    t = jnp.array([3, 4])
    deltas, maps = [], {}
    for steps in (2, 16):
        maps[steps], d = S.integrated_gradients_with_delta(h, x, t, steps=steps, chunk=8, baseline=0.0, reduce=None)
        deltas.append(np.abs(np.asarray(d)))
    assert np.all(deltas[1] < 0.2 * deltas[0])  # midpoint rule: error O(steps^-2)
    out = h.logits(x)[jnp.arange(2), t] - h.logits(jnp.zeros_like(x))[jnp.arange(2), t]
    assert np.all(deltas[1] < 0.02 * np.abs(np.asarray(out)) + 1e-4)
    # the trapezoid rule converges too
    _, dt = S.integrated_gradients_with_delta(h, x, t, steps=16, chunk=5, rule="trapezoid")  # 17 nodes, padded
    assert np.all(np.abs(np.asarray(dt)) < 0.2 * deltas[0])


def test_ig_equals_grad_times_input_for_bias_free_relu_net():
    # positively homogeneous network: the gradient is constant along the ray from 0, so IG = x * grad (Prop. 8)
    model = NoPoolNet()
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 6, 6, 2)), jnp.float32)
    v = init(model, x, 4)  # zero biases, BatchNorm at its initial statistics: no constant terms
    h = S.ModelHandle(model.apply, v)
    ig = S.integrated_gradients(h, x, steps=3, reduce=None)
    gxi = S.gradient_x_input(h, x, reduce=None)
    np.testing.assert_allclose(np.asarray(ig), np.asarray(gxi), rtol=1e-4, atol=1e-6)


def test_noise_methods_noise_scale_per_example_and_chunking():
    # f(x) = 0.5 ||x||^2 - g = x + n: VarGrad = sigma_b^2 exactly in expectation, SmoothGrad = x.
    def logits_fn(x):
        s = 0.5 * jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1)
        return jnp.stack([s, -s], axis=1)

    x = jnp.stack([jnp.linspace(0, 1, 16).reshape(4, 4, 1), jnp.linspace(-5, 5, 16).reshape(4, 4, 1)])
    key = rbg_key(0)
    t = jnp.zeros(2, jnp.int32)
    m1, m2 = S.noise_gradient_moments(logits_fn, x, t, key=key, samples=128, chunk=128, noise_level=0.1)
    var = m2 - m1 ** 2  # what vargrad reduces
    expected = (0.1 * np.array([1.0, 10.0])) ** 2
    np.testing.assert_allclose(np.asarray(var.mean(axis=(1, 2, 3))), expected, rtol=0.1)
    np.testing.assert_allclose(np.asarray(m1), np.asarray(x), atol=0.05 * 10)  # SmoothGrad's mean gradient
    # draw i uses split(key, samples)[i]: chunking (with a padded last chunk) does not change the estimate
    a = S.noise_gradient_moments(logits_fn, x, t, key=key, samples=5, chunk=2)
    np.testing.assert_allclose(np.asarray(a[1]), np.asarray(
        S.noise_gradient_moments(logits_fn, x, t, key=key, samples=5, chunk=5)[1]), rtol=1e-5)


def test_smoothgrad_without_noise_is_the_gradient(nopool):
    _, h, x = nopool
    key = rbg_key(1)
    g = S.input_gradient(h, x, reduce=None)
    m1, m2 = S.noise_gradient_moments(h, x, key=key, samples=2, noise_level=0.0)
    np.testing.assert_allclose(np.asarray(m1), np.asarray(g), rtol=1e-5, atol=1e-7)  # SmoothGrad
    np.testing.assert_allclose(np.asarray(m2), np.asarray(g ** 2), rtol=1e-5, atol=1e-10)  # SmoothGrad^2
    assert float(jnp.abs(m2 - m1 ** 2).max()) < 1e-8  # VarGrad


def test_noise_methods_are_the_documented_moments(nopool):
    """SmoothGrad = reduce(m1), SmoothGrad² = reduce(m2), VarGrad = reduce(m2 - m1²) with the moments of
    noise_gradient_moments (same key and options); without noise SmoothGrad is the input-gradient map."""
    _, h, x = nopool
    key, t = rbg_key(2), jnp.array([3, 1])
    opts = dict(key=key, samples=3, chunk=2, noise_level=0.2)

    @jax.jit
    def run(x):
        m1, m2 = S.noise_gradient_moments(h, x, t, **opts)
        return (m1, m2, S.smoothgrad(h, x, t, reduce=None, **opts), S.smoothgrad_squared(h, x, t, reduce=None, **opts),
                S.vargrad(h, x, t, reduce=None, **opts), S.smoothgrad(h, x, t, **opts), S.vargrad(h, x, t, **opts),
                S.smoothgrad(h, x, t, key=key, samples=2, noise_level=0.0), S.input_gradient(h, x, t))

    m1, m2, sg, sg2, vg, sg_map, vg_map, sg0, grad_map = run(x)
    np.testing.assert_allclose(np.asarray(sg), np.asarray(m1), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.asarray(sg2), np.asarray(m2), rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(np.asarray(vg), np.asarray(jnp.maximum(m2 - m1 ** 2, 0)), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(np.asarray(sg_map), np.asarray(jnp.abs(m1).sum(-1)), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.asarray(vg_map), np.asarray(jnp.maximum(m2 - m1 ** 2, 0).sum(-1)), rtol=1e-4,
                               atol=1e-9)
    assert float(jnp.abs(vg).max()) > 1e-6  # the noise really changes the gradient
    np.testing.assert_allclose(np.asarray(sg0), np.asarray(grad_map), rtol=1e-5, atol=1e-7)


def test_ig_with_a_nonzero_baseline():
    """IG = (x - x') ⊙ avg grad: exact for a linear model, and complete (sum = f(x) - f(x')) for a smooth one."""
    W = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 3, 2)), jnp.float32)
    linear = lambda z: jnp.stack([jnp.sum((z * W).reshape(z.shape[0], -1), 1), jnp.zeros(z.shape[0])], 1)  # noqa
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 3, 2)), jnp.float32)
    base = jnp.asarray(np.random.default_rng(2).uniform(0.5, 1.5, size=(3, 3, 2)), jnp.float32)
    ig, delta = S.integrated_gradients_with_delta(linear, x, 0, baseline=base, steps=2, reduce=None)
    np.testing.assert_allclose(np.asarray(ig), np.asarray((x - base) * W), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(delta), 0.0, atol=1e-5)
    _, h, xs = make_nopool("softplus", seed=11)
    ig, delta = jax.jit(lambda x_: S.integrated_gradients_with_delta(h, x_, jnp.array([3, 4]), baseline=0.5,
                                                                      steps=16, chunk=8, reduce=None))(xs)
    gap = h.logits(xs)[jnp.arange(2), jnp.array([3, 4])] - h.logits(jnp.full_like(xs, 0.5))[jnp.arange(2), jnp.array([3, 4])]
    assert np.all(np.abs(np.asarray(delta)) < 0.02 * np.abs(np.asarray(gap)) + 1e-4)


def test_reductions(nopool):
    _, h3, x = nopool  # 2 input channels
    g = S.input_gradient(h3, x, reduce=None)
    np.testing.assert_allclose(np.asarray(S.input_gradient(h3, x, reduce="abs_max")), np.asarray(jnp.abs(g).max(-1)))
    np.testing.assert_allclose(np.asarray(S.input_gradient(h3, x, reduce="sum")), np.asarray(g.sum(-1)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(S.gradient_x_input(h3, x, reduce="abs_sum")),
                               np.asarray(jnp.abs(g * x).sum(-1)), rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# guided backprop
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlp():
    model = create_model("mlp", 4, hidden=(6, 5))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 7)), jnp.float32)
    v = randomize(init(model, x, 3), 4)
    return model, v, x


def test_guided_backprop_matches_manual_rule(mlp):
    model, v, x = mlp
    p = v["params"]
    t = jnp.array([0, 2, 3])
    W0, b0 = p["dense0"]["kernel"], p["dense0"]["bias"]
    W1, b1 = p["dense1"]["kernel"], p["dense1"]["bias"]
    Wh = p["head"]["kernel"]
    z0 = x @ W0 + b0
    z1 = jax.nn.relu(z0) @ W1 + b1
    g = Wh[:, t].T                                   # d f_t / d a1   [B, 5]
    g = g * (z1 > 0) * (g > 0)                       # guided ReLU rule
    g = g @ W1.T                                     # d / d a0
    g = g * (z0 > 0) * (g > 0)
    manual = g @ W0.T
    gb = S.guided_backprop(S.ModelHandle(model.apply, v), x, t, reduce=None)
    np.testing.assert_allclose(np.asarray(gb), np.asarray(manual), rtol=1e-5, atol=1e-6)
    grad = S.input_gradient(S.ModelHandle(model.apply, v), x, t, reduce=None)
    assert float(jnp.abs(gb - grad).max()) > 1e-3  # generic network: the rule matters


def test_guided_backprop_equals_gradient_when_no_relu_sees_a_negative_gradient(mlp):
    model, v, x = mlp
    p = jax.tree.map(lambda a: a, v["params"])
    p["dense1"] = dict(p["dense1"], kernel=jnp.abs(p["dense1"]["kernel"]))
    p["head"] = dict(p["head"], kernel=jnp.abs(p["head"]["kernel"]))
    h = S.ModelHandle(model.apply, {"params": p})
    gb = S.guided_backprop(h, x, reduce=None)
    grad = S.input_gradient(h, x, reduce=None)
    np.testing.assert_allclose(np.asarray(gb), np.asarray(grad), rtol=1e-6, atol=1e-7)
    # ...and the forward pass is untouched
    logits_guided = h.logits(x, interceptor=guided_interceptor())
    np.testing.assert_allclose(np.asarray(logits_guided), np.asarray(h.logits(x)), rtol=1e-6)


def test_guided_backprop_refuses_a_model_it_cannot_intercept():
    """A Flax model applying nn.relu directly has no Activation module: guided backprop would silently be the
    plain gradient, so it raises instead (eagerly and under jit)."""

    class PlainRelu(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(3)(nn.relu(nn.Dense(5)(x.reshape(x.shape[0], -1))))

    m = PlainRelu()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 1)), jnp.float32)
    h = S.ModelHandle(m.apply, jax.eval_shape(m.init, jax.random.PRNGKey(0), x))
    h = h.replace(variables=jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), h.variables))
    with pytest.raises(ValueError, match="Activation"):
        S.guided_backprop(h, x)
    with pytest.raises(ValueError, match="Activation"):
        jax.jit(lambda h_, x_: S.guided_backprop(h_, x_))(h, x)


# ------------------------------------------------------------------------------------------------------------
# Grad-CAM
# ------------------------------------------------------------------------------------------------------------

def test_gradcam_matches_manual_computation(vgg8px):
    model, h, x = vgg8px
    t = jnp.array([4, 9])
    _, inter = jax.jit(lambda v, x_: model.apply(v, x_, capture_intermediates=lambda mdl, _: mdl.path == ("block2",),
                                                  mutable=["intermediates"]))(h.variables, x)
    A = inter["intermediates"]["block2"]["__call__"][0]  # [B, 2, 2, c]
    p = h.variables["params"]["head"]

    def head(a):
        return global_average_pool(max_pool(a)) @ p["kernel"] + p["bias"]

    dA = jax.grad(lambda a: head(a)[jnp.arange(2), t].sum())(A)
    manual = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", A, dA.mean(axis=(1, 2))))
    cam_small, cam, mid = jax.jit(lambda x_: (
        S.gradcam(h, x_, t, layer="block2", upsample=False),
        S.gradcam(h, x_, t),  # default layer = last spatial module = block2
        S.gradcam(h, x_, t, layer="block1")))(x)
    np.testing.assert_allclose(np.asarray(cam_small), np.asarray(manual), rtol=1e-4, atol=1e-6)
    assert cam.shape == (2, 8, 8) and float(cam.min()) >= 0
    np.testing.assert_allclose(np.asarray(cam), np.asarray(S.bilinear_upsample(manual, (8, 8))), rtol=1e-4,
                               atol=1e-6)
    assert mid.shape == (2, 8, 8) and float(mid.min()) >= 0


# ------------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------------

def test_bad_inputs_raise(nopool):
    _, h, x = nopool
    key = rbg_key(0)
    with pytest.raises(ValueError, match="non-finite"):
        S.input_gradient(h, x.at[0, 0, 0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="rank 4"):
        S.fullgrad(h, x[0])
    with pytest.raises(ValueError, match="floating"):
        S.gradcam(h, x.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        S.fullgrad(h, x, jnp.array([0, 5]))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        S.input_gradient(h, x, jnp.array([-1, 0]))
    with pytest.raises(ValueError, match="entries but the batch has"):
        S.integrated_gradients(h, x, jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="PREDICTED|predicted"):
        S.input_gradient(h, x, "top")
    with pytest.raises(ValueError, match="key"):
        S.smoothgrad(h, x)
    with pytest.raises(ValueError, match="reduce"):
        S.input_gradient(h, x, reduce="mean")
    with pytest.raises(ValueError, match="postprocess"):
        S.fullgrad(h, x, postprocess="sqrt")
    with pytest.raises(ValueError, match="steps"):
        S.integrated_gradients(h, x, steps=0)
    with pytest.raises(ValueError, match="rule"):
        S.integrated_gradients(h, x, rule="simpson")
    with pytest.raises(ValueError, match="no module at path"):
        S.gradcam(h, x, layer="conv9")
    with pytest.raises(ValueError, match="not a spatial map"):
        S.gradcam(h, x, layer="head")
    with pytest.raises(ValueError, match="unknown saliency method"):
        S.compute_saliency("lrp", h, x)
    # raw uint32 (threefry) keys work as well as typed keys
    r = S.random_saliency(h, x, key=jax.random.PRNGKey(0))
    assert r.shape == x.shape[:3] and float(r.min()) >= 0 and float(r.max()) <= 1
    # scalar targets broadcast
    np.testing.assert_allclose(np.asarray(S.input_gradient(h, x, 3)),
                               np.asarray(S.input_gradient(h, x, jnp.array([3, 3]))))
