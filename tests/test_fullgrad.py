"""Tests of gradjax.fullgrad: full-gradient completeness (thesis §3.4, eq. 3.1/3.3, Propositions 5/6)."""
from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax.fullgrad import (MERGE_MODES, PREDICTED, FullGradients, bias_taps, completeness_residual,
                              flatten_taps, full_gradients)
from gradjax.model import ModelHandle as H
from gradjax.models import MLP, TapInfo, TappedBatchNorm, TappedConv, TappedDense, create_model
from gradjax.models.layers import global_average_pool

NUM_CLASSES = 10

pytestmark = pytest.mark.usefixtures("fast_compilation")


def _x64():
    """Context manager enabling float64 locally (jax.enable_x64 in recent JAX)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older JAX
    return enable_x64()


def _fill(model, x, seed):
    """Variables for ``model`` at input ``x`` with every explicit/implicit bias non-trivial.

    Shapes come from ``jax.eval_shape(model.init)`` (no computation) and values from NumPy (fast on CPU):
    He-normal kernels, random biases, BatchNorm scales away from 1 and running statistics away from (0, 1), so
    the BatchNorm implicit biases ``beta - gamma * mean / sqrt(var + eps)`` are large.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    shapes = {k: shapes[k] for k in ("params", "batch_stats") if k in shapes}

    def value(path, s):
        name, shape = path[-1].key, s.shape
        if name == "kernel":
            a = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif name == "bias":
            a = 0.3 * rng.normal(size=shape)
        elif name == "scale":
            a = 1.0 + 0.3 * rng.normal(size=shape)
        elif name == "mean":
            a = 0.5 * rng.normal(size=shape)
        elif name == "var":
            a = rng.uniform(0.5, 2.0, size=shape)
        else:
            raise AssertionError(path)
        return jnp.asarray(a, s.dtype)

    return jax.tree_util.tree_map_with_path(value, shapes)


@functools.lru_cache(maxsize=None)
def conv_setup(name: str, activation: str):
    """A tiny VGG-9 / ResNet-18 (width 0.125, batch 2, 32x32) with non-trivial biases and BatchNorm statistics."""
    model = create_model(name, NUM_CLASSES, activation=activation, beta=10.0, width=0.125)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    return model, _fill(model, x, 1), x


@functools.lru_cache(maxsize=None)
def mlp_setup(activation: str = "relu"):
    model = MLP((16, 12), NUM_CLASSES, activation)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4, 5)), jnp.float32)
    return model, _fill(model, x, 3), x


CONV_CASES = [("vgg9", "relu"), ("vgg9", "softplus"), ("resnet18", "relu"), ("resnet18", "softplus")]


# --------------------------------------------------------------------------------------------------------------
# Completeness (Proposition 6 / eq. 3.1 / eq. 3.3; implicit activation biases for softplus, §3.4)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,activation", CONV_CASES)
def test_completeness_float32_all_merges_and_targets(name, activation):
    model, v, x = conv_setup(name, activation)
    t = jnp.array([3, 7])
    ref = full_gradients(H(model.apply, v), x, t)
    if activation == "relu":  # (the plain forward of softplus models compiles new ops: skipped to save time)
        logits = model.apply(v, x, train=False)
        np.testing.assert_allclose(ref.output, logits[jnp.arange(2), t], rtol=1e-5, atol=1e-5)
    # the bias term is large here (non-trivial BN statistics): the input term alone is far from f(x)
    assert float(jnp.max(jnp.abs(ref.bias_term()) / jnp.abs(ref.output))) > 1e-2
    for merge in MERGE_MODES:
        for target in (t, PREDICTED):
            fg = full_gradients(H(model.apply, v), x, target, merge=merge)
            rel = fg.relative_residual()
            assert rel.shape == (2,)
            assert float(jnp.max(rel)) < 1e-4, (merge, target, rel)
            direct = fg.output - fg.input_term(x) - fg.bias_term()
            np.testing.assert_allclose(fg.residual, direct, atol=1e-5)
    pred = full_gradients(H(model.apply, v), x, PREDICTED)
    assert bool(jnp.all(pred.output >= ref.output - 1e-6))
    if activation == "relu":
        np.testing.assert_allclose(pred.output, jnp.max(logits, axis=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # float64 recompiles every op (~20 s on 2 CPU cores)
@pytest.mark.parametrize("name,activation", [("vgg9", "relu"), ("resnet18", "softplus")])
def test_completeness_float64(name, activation):
    model, v, x = conv_setup(name, activation)
    with _x64():
        fg = full_gradients(H(model.apply, v), x, PREDICTED, merge="conv_bn", dtype=jnp.float64)
        assert fg.output.dtype == jnp.float64 and fg.input_gradient.dtype == jnp.float64
        assert float(jnp.max(fg.relative_residual())) < 1e-10
        assert float(jnp.max(completeness_residual(H(model.apply, v), x, jnp.array([0, 9]),
                                                   dtype=jnp.float64))) < 1e-10


def test_softplus_needs_activation_implicit_biases():
    """Without the activation taps (§3.4 implicit bias b_sigma) completeness fails: the test can fail."""
    model, v, x = conv_setup("vgg9", "softplus")
    fg = full_gradients(H(model.apply, v), x)
    act = sum(fg.bias_gradients[k].reshape(2, -1).sum(1) for k in fg.bias_gradients if k.endswith("/act"))
    assert float(jnp.max(jnp.abs(act) / jnp.abs(fg.output))) > 1e-3


def test_incomplete_when_a_bias_site_is_missed():
    """A model that adds a constant outside a bias tap has a large residual (the check can fail)."""

    class Leaky(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = x.reshape((x.shape[0], -1))
            x = nn.relu(TappedDense(8, name="d0")(x) + 0.5)  # untapped constant
            return TappedDense(NUM_CLASSES, name="head")(x)

    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 6)), jnp.float32)
    m = Leaky()
    v = _fill(m, x, 5)
    assert float(jnp.max(full_gradients(H(m.apply, v), x).relative_residual())) > 1e-2


# --------------------------------------------------------------------------------------------------------------
# Proposition 5: bias-free ReLU nets, f(x) = <grad_x f, x>
# --------------------------------------------------------------------------------------------------------------

def test_proposition5_bias_free_relu():
    model, v, x = mlp_setup("relu")
    zero = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.zeros_like(a) if p[-1].key == "bias" else a, v["params"])
    fg0 = full_gradients(H(model.apply, {"params": zero}), x, jnp.array([1, 2, 3]))
    np.testing.assert_allclose(fg0.input_term(x), fg0.output, rtol=1e-5, atol=1e-6)
    for m in fg0.bias_gradients.values():
        assert float(jnp.max(jnp.abs(m))) == 0.0
    # control: with biases, the input term alone does not give f(x)
    fg = full_gradients(H(model.apply, v), x, jnp.array([1, 2, 3]))
    assert float(jnp.max(jnp.abs(fg.input_term(x) - fg.output))) > 1e-2
    assert float(jnp.max(fg.relative_residual())) < 1e-5


def test_proposition5_no_taps_at_all():
    """A network built without any bias site: empty bias_gradients, and f(x) = <grad_x f, x> for ReLU."""

    class NoBias(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = x.reshape((x.shape[0], -1))
            x = nn.relu(TappedDense(16, use_bias=False, name="d0")(x))
            x = nn.relu(TappedDense(16, use_bias=False, name="d1")(x))
            return TappedDense(NUM_CLASSES, use_bias=False, name="head")(x)

    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 5)), jnp.float32)
    m = NoBias()
    v = _fill(m, x, 7)
    biases, perts = bias_taps(H(m.apply, v), x)
    assert biases == {} and perts == {}
    fg = full_gradients(H(m.apply, v), x)
    assert fg.bias_gradients == {}
    np.testing.assert_allclose(fg.input_term(x), fg.output, rtol=1e-5)
    assert float(jnp.max(fg.relative_residual())) < 1e-5
    jitted = jax.jit(lambda v_, x_: full_gradients(H(m.apply, v_), x_))(v, x)
    chex.assert_trees_all_close(jitted.output, fg.output, rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Independent checks of the gradients
# --------------------------------------------------------------------------------------------------------------

def test_input_gradient_matches_jax_grad_per_example():
    model, v, x = conv_setup("resnet18", "softplus")
    t = jnp.array([4, 1])
    fg = full_gradients(H(model.apply, v), x, t)
    for i in range(2):
        g = jax.grad(lambda x_: model.apply(v, x_, train=False)[i, t[i]])(x)
        np.testing.assert_allclose(fg.input_gradient[i], g[i], rtol=1e-4, atol=1e-6)
        assert float(jnp.max(jnp.abs(g[1 - i]))) == 0.0  # eval mode: examples do not interact


def test_bias_gradients_match_parameter_gradients():
    """sum over positions of f^b_l = b_l * df/d(bias) for a conv bias, c * df/d(beta) for BN (eq. 3.3).

    The parameter gradients come from plain ``jax.grad`` of one logit with respect to the bias parameters
    (no taps involved), one example at a time.
    """
    model, v, x = conv_setup("vgg9", "relu")
    t = jnp.array([2, 5])
    fg = full_gradients(H(model.apply, v), x, t)
    blocks = ("block0", "block3")
    start = {blk: (v["params"][blk]["conv"]["bias"], v["params"][blk]["bn"]["bias"]) for blk in blocks}

    def logit(biases, i):
        params = dict(v["params"])
        for blk, (cb, beta) in biases.items():
            params[blk] = {"conv": {**params[blk]["conv"], "bias": cb}, "bn": {**params[blk]["bn"], "bias": beta}}
        return model.apply({**v, "params": params}, x, train=False)[i, t[i]]

    for i in range(2):
        grads = jax.grad(logit)(start, i)
        for blk in blocks:
            b = v["params"][blk]["conv"]["bias"]
            np.testing.assert_allclose(fg.bias_gradients[f"{blk}/conv"][i].sum((0, 1)), b * grads[blk][0],
                                       rtol=1e-4, atol=1e-6)
            bn, st = v["params"][blk]["bn"], v["batch_stats"][blk]["bn"]
            s = bn["scale"] / jnp.sqrt(st["var"] + 1e-5)
            c = bn["bias"] - s * st["mean"]
            np.testing.assert_allclose(fg.bias_gradients[f"{blk}/bn"][i].sum((0, 1)), c * grads[blk][1],
                                       rtol=1e-4, atol=1e-6)


def test_mlp_maps_by_hand():
    """Dense head: map = onehot(t) * b_head; first hidden layer: (W_head... backprop) * relu'(z0) * b0."""
    model = MLP((16,), NUM_CLASSES, "relu")
    x = jnp.asarray(np.random.default_rng(6).normal(size=(3, 7)), jnp.float32)
    p = _fill(model, x, 7)["params"]
    t = jnp.array([0, 5, 9])
    fg = full_gradients(H(model.apply, {"params": p}), x, t)
    assert set(fg.bias_gradients) == {"dense0", "head"}
    head = jax.nn.one_hot(t, NUM_CLASSES) * p["head"]["bias"]
    np.testing.assert_allclose(fg.bias_gradients["head"], head, rtol=1e-6)
    z0 = x @ p["dense0"]["kernel"] + p["dense0"]["bias"]
    g0 = p["head"]["kernel"][:, t].T * (z0 > 0)
    np.testing.assert_allclose(fg.bias_gradients["dense0"], g0 * p["dense0"]["bias"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fg.input_gradient, g0 @ p["dense0"]["kernel"].T, rtol=1e-5, atol=1e-7)


def test_bias_taps_structure():
    model, v, x = conv_setup("resnet18", "softplus")
    biases, perts = bias_taps(H(model.apply, v), x)
    fb, fp = flatten_taps(biases), flatten_taps(perts)
    assert set(fb) == set(fp) and "stem_bn" in fb and "stage1_block0/shortcut_bn" in fb and "head" in fb
    assert "stage0_block0/act1" in fb  # softplus implicit bias
    assert fp["head"].shape == (2, NUM_CLASSES) and fb["head"].shape == (NUM_CLASSES,)
    assert fp["stage1_block0/bn1"].shape == (2, 16, 16, 16)
    assert fb["stage0_block0/act1"].shape == fp["stage0_block0/act1"].shape  # input-dependent
    fg = full_gradients(H(model.apply, v), x)
    assert set(fg.bias_gradients) == set(fb)
    for k, m in fg.bias_gradients.items():
        assert m.shape == fp[k].shape


# --------------------------------------------------------------------------------------------------------------
# Merge modes
# --------------------------------------------------------------------------------------------------------------

def test_merge_conv_bn_and_block_are_sums_vgg():
    model, v, x = conv_setup("vgg9", "softplus")
    none = full_gradients(H(model.apply, v), x).bias_gradients
    cb = full_gradients(H(model.apply, v), x, merge="conv_bn").bias_gradients
    blk = full_gradients(H(model.apply, v), x, merge="block").bias_gradients
    n_blocks = sum(1 for k in none if k.endswith("/conv"))
    assert n_blocks == 8
    assert set(cb) == {f"block{i}" for i in range(8)} | {f"block{i}/act" for i in range(8)} | {"head"}
    assert set(blk) == {f"block{i}" for i in range(8)} | {"head"}
    for i in range(8):
        np.testing.assert_allclose(cb[f"block{i}"], none[f"block{i}/conv"] + none[f"block{i}/bn"], rtol=1e-6)
        np.testing.assert_allclose(cb[f"block{i}/act"], none[f"block{i}/act"])
        np.testing.assert_allclose(blk[f"block{i}"], cb[f"block{i}"] + none[f"block{i}/act"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(cb["block0"], none["block0/bn"])  # the conv bias really contributes


def test_merge_conv_bn_resnet_names():
    model, v, x = conv_setup("resnet18", "relu")
    none = full_gradients(H(model.apply, v), x).bias_gradients
    cb = full_gradients(H(model.apply, v), x, merge="conv_bn").bias_gradients
    blk = full_gradients(H(model.apply, v), x, merge="block").bias_gradients
    # ResNet convolutions have no bias: the conv+BN layer is the BN map under the layer's name
    np.testing.assert_array_equal(cb["stem_conv_bn"], none["stem_bn"])
    np.testing.assert_array_equal(cb["stage1_block0/conv_bn1"], none["stage1_block0/bn1"])
    np.testing.assert_array_equal(cb["stage1_block0/shortcut_conv_bn"], none["stage1_block0/shortcut_bn"])
    assert len(cb) == len(none) and not any(k.endswith("bn") and "conv" not in k.split("/")[-1] for k in cb)
    want = none["stage2_block0/bn1"] + none["stage2_block0/bn2"] + none["stage2_block0/shortcut_bn"]
    np.testing.assert_allclose(blk["stage2_block0"], want, rtol=1e-5, atol=1e-7)
    assert set(blk) == {"stem_bn", "head"} | {f"stage{s}_block{j}" for s in range(4) for j in range(2)}


def test_taps_declare_kind_and_group():
    """Every tap of the built-in layers records what it is where it is made (no guessing from names)."""
    model, v, x = conv_setup("vgg9", "softplus")
    from gradjax.fullgrad import tap_gradients
    info = tap_gradients(H(model.apply, v), x).info
    assert info["block0/conv"] == TapInfo("conv", "") and info["block0/bn"] == TapInfo("bn", "")
    assert info["block0/act"] == TapInfo("activation", None) and info["head"] == TapInfo("dense", None)
    rmodel, rv, _ = conv_setup("resnet18", "relu")
    rinfo = tap_gradients(H(rmodel.apply, rv), x).info
    assert rinfo["stem_bn"] == TapInfo("bn", "stem_conv_bn")
    assert rinfo["stage1_block0/shortcut_bn"] == TapInfo("bn", "shortcut_conv_bn")


class _Named(nn.Module):
    """A user model whose module names contain 'bn'/'conv' by accident (``subnet``, ``suconvet``) and whose
    conv + BatchNorm layer has other names (``c``, ``norm``) but declares its group."""

    @nn.compact
    def __call__(self, x, train=False):
        z = TappedConv(3, name="suconvet")(x)  # no declared group: its own layer
        z = TappedBatchNorm(name="subnet")(z, train=train)  # 'bn' in the name, but no declared group
        y = TappedConv(3, tap_group="layer", name="c")(nn.relu(z))
        y = TappedBatchNorm(tap_group="layer", name="norm")(y, train=train)
        return TappedDense(NUM_CLASSES, name="head")(global_average_pool(nn.relu(y)))


def test_conv_bn_merges_declared_groups_not_names():
    """merge="conv_bn" sums the taps that declared one group; a module named ``subnet`` (which contains "bn") is
    not paired with a conv by name (the old rule merged ``subnet`` and ``suconvet`` into ``suconv_bnet``)."""
    m = _Named()
    x = jnp.asarray(np.random.default_rng(11).normal(size=(2, 6, 6, 2)), jnp.float32)
    v = _fill(m, x, 12)
    none = full_gradients(H(m.apply, v), x).bias_gradients
    cb = full_gradients(H(m.apply, v), x, merge="conv_bn")
    assert set(none) == {"suconvet", "subnet", "c", "norm", "head"}
    assert set(cb.bias_gradients) == {"suconvet", "subnet", "layer", "head"}
    np.testing.assert_array_equal(cb.bias_gradients["subnet"], none["subnet"])
    np.testing.assert_array_equal(cb.bias_gradients["suconvet"], none["suconvet"])
    np.testing.assert_allclose(cb.bias_gradients["layer"], none["c"] + none["norm"], rtol=1e-6)
    assert float(jnp.max(jnp.abs(none["c"]))) > 1e-3  # the conv bias really contributes to the group
    assert float(jnp.max(cb.relative_residual())) < 1e-5


def test_group_of_a_tap_without_parent_is_rejected():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return TappedDense(NUM_CLASSES, tap_group="", name="head")(x.reshape(x.shape[0], -1))

    x = jnp.ones((2, 3))
    v = Top().init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="no parent"):
        full_gradients(H(Top().apply, v), x, merge="conv_bn")
    with pytest.raises(ValueError, match="kind"):
        from gradjax.models import bias_tap
        bias_tap(None, x, x, kind="batchnorm")


# --------------------------------------------------------------------------------------------------------------
# jit / vmap / grad
# --------------------------------------------------------------------------------------------------------------

class TestJitVariants(chex.TestCase):
    """The same values with and without ``jax.jit`` (chex variants), checked against independent references."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_full_gradients_with_and_without_jit(self):
        model, v, x = mlp_setup("relu")
        t = jnp.array([1, 0, 9])
        fg = self.variant(lambda v_, x_, t_: full_gradients(H(model.apply, v_), x_, t_, merge="block"))(v, x, t)
        ref_grad = jax.vmap(lambda xi, ti: jax.grad(lambda z: model.apply(v, z[None])[0, ti])(xi))(x, t)
        chex.assert_trees_all_close(fg.input_gradient, ref_grad, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(fg.output, model.apply(v, x)[jnp.arange(3), t], rtol=1e-6)
        self.assertLess(float(jnp.max(fg.relative_residual())), 1e-5)
        # the handle itself as an argument (variables traced under jit, apply_fn static), PREDICTED closed over
        pred = self.variant(lambda h, x_: full_gradients(h, x_))(H(model.apply, v), x)
        chex.assert_trees_all_close(pred.output, jnp.max(model.apply(v, x), axis=-1), rtol=1e-6)
        chex.assert_trees_all_close(pred.bias_gradients["head"],
                                    jax.nn.one_hot(jnp.argmax(model.apply(v, x), -1), NUM_CLASSES)
                                    * v["params"]["head"]["bias"], rtol=1e-6)


def test_value_checks_run_eagerly():
    model, v, x = mlp_setup("relu")
    # value checks run in eager calls (under jit the arguments are tracers)
    with pytest.raises(ValueError, match=r"target must lie in \[0, 10\)"):
        full_gradients(H(model.apply, v), x, jnp.array([0, 1, 10]))
    with pytest.raises(ValueError, match="non-finite"):
        full_gradients(H(model.apply, v), x.at[0, 0, 0].set(jnp.nan))


def test_vmap_over_stack_of_batches():
    model, v, x = mlp_setup("relu")
    xs = jnp.stack([x, 2.0 * x - 0.5])
    out = jax.jit(jax.vmap(lambda x_: full_gradients(H(model.apply, v), x_)))(xs)
    for j in range(2):
        ref = full_gradients(H(model.apply, v), xs[j])
        np.testing.assert_allclose(out.output[j], ref.output, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.input_gradient[j], ref.input_gradient, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out.bias_gradients["dense1"][j], ref.bias_gradients["dense1"], rtol=1e-5, atol=1e-7)


def test_differentiable_wrt_params():
    """Full-gradient losses differentiate through full_gradients (double backprop), implicit biases included.

    By completeness, d/dtheta sum(bias term) must equal d/dtheta sum(f - <grad_x f, x>); this fails if the
    softplus implicit biases or any bias map were cut off from the parameter gradient.
    """
    model, v, x = mlp_setup("softplus")
    t = jnp.array([1, 2, 3])

    def both(p):
        fg = full_gradients(H(model.apply, {"params": p}), x, t)
        return jnp.sum(fg.bias_term()), jnp.sum(fg.output - fg.input_term(x))

    g_bias = jax.grad(lambda p: both(p)[0])
    g_rest = jax.grad(lambda p: both(p)[1])
    ga, gb = jax.jit(lambda p: (g_bias(p), g_rest(p)))(v["params"])
    chex.assert_tree_all_finite(ga)
    chex.assert_trees_all_close(ga, gb, rtol=1e-4, atol=1e-4)
    assert float(jnp.max(jnp.abs(ga["dense0"]["bias"]))) > 1e-2


def test_init_collections_are_ignored():
    """Passing model.init's output (with 'biases'/'perturbations' of another batch size) still works."""
    model, v, x = mlp_setup("relu")
    biases, perts = bias_taps(H(model.apply, v), x)
    # what model.init(key, x[:1]) returns: taps recorded for a batch of one
    v = {**v, "biases": biases, "perturbations": jax.tree.map(lambda a: a[:1], perts)}
    fg = full_gradients(H(model.apply, v), x)
    assert fg.output.shape == (3,) and float(jnp.max(fg.relative_residual())) < 1e-5


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------

def test_bad_inputs_raise():
    model, v, x = mlp_setup("relu")
    vgg, vv, xi = conv_setup("vgg9", "relu")
    with pytest.raises(ValueError, match="rank"):
        full_gradients(H(model.apply, v), jnp.ones((5,)))
    with pytest.raises(ValueError, match="rank 4"):
        full_gradients(H(vgg.apply, vv), xi[:, :, :, 0])
    with pytest.raises(ValueError, match="floating-point"):
        full_gradients(H(model.apply, v), jnp.ones((3, 20), jnp.int32))
    with pytest.raises(ValueError, match="non-finite"):
        full_gradients(H(model.apply, v), x.at[1, 2, 3].set(jnp.nan))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        full_gradients(H(model.apply, v), x, jnp.array([0, 1, 10]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        full_gradients(H(model.apply, v), x, jnp.array([-1, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        full_gradients(H(model.apply, v), x, jnp.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="3 examples"):
        full_gradients(H(model.apply, v), x, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="merge"):
        full_gradients(H(model.apply, v), x, merge="layers")
    with pytest.raises(ValueError, match="target"):
        full_gradients(H(model.apply, v), x, "top")
    with pytest.raises(ValueError, match="variables"):
        full_gradients(H(model.apply, [v]), x)
    if not jax.config.jax_enable_x64:
        with pytest.raises(ValueError, match="x64"):
            full_gradients(H(model.apply, v), x, dtype=jnp.float64)
    # a scalar target is broadcast to the batch
    fg = full_gradients(H(model.apply, v), x, 4)
    np.testing.assert_allclose(fg.output, model.apply(v, x)[:, 4], rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Train-mode models
# --------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def vgg_small():
    model = create_model("vgg4", NUM_CLASSES, width=0.125)
    x = jnp.asarray(np.random.default_rng(8).normal(size=(3, 8, 8, 1)), jnp.float32)
    return model, _fill(model, x, 9), x


def test_train_mode_full_gradients_return_updated_batch_stats():
    """A train-mode handle with mutable=("batch_stats",): the updated running statistics come back, the output is
    the train-mode logit and the input-gradient is the gradient of the summed train-mode logits (which couple the
    examples through the batch moments)."""
    model, v, x = vgg_small()
    t = jnp.array([1, 4, 7])

    @jax.jit
    def run(v, x):
        fg = full_gradients(H(model.apply, v, apply_kwargs={"train": True}), x, t, mutable=("batch_stats",))
        logits, state = model.apply(v, x, train=True, mutable=["batch_stats"])
        selected = lambda z: jnp.sum(model.apply(v, z, train=True, mutable=["batch_stats"])[0][jnp.arange(3), t])
        return fg, logits, state, jax.grad(selected)(x)

    fg, logits, state, g = run(v, x)
    np.testing.assert_allclose(fg.output, logits[jnp.arange(3), t], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(fg.updates["batch_stats"], state["batch_stats"], rtol=1e-6, atol=1e-7)
    assert not np.allclose(fg.updates["batch_stats"]["block0"]["bn"]["mean"], v["batch_stats"]["block0"]["bn"]["mean"])
    np.testing.assert_allclose(fg.input_gradient, g, rtol=1e-4, atol=1e-6)
    assert full_gradients(H(model.apply, v), x, t).updates is None  # eval mode: nothing to update


def test_frozen_moments_full_gradients_are_complete():
    """BatchNorm with recorded batch moments under stop_gradient is affine per example: completeness holds on a
    train-mode pass, and the output is the train-mode logit."""
    from gradjax.models import layers
    moments = getattr(layers, "MOMENTS", None)
    if moments is None:
        pytest.skip("no frozen-moments BatchNorm in this tree")
    model, v, x = vgg_small()

    @jax.jit
    def run(v, x):
        logits, state = model.apply(v, x, train=True, mutable=["batch_stats", moments])
        frozen = H(model.apply, {**v, moments: state[moments]}, apply_kwargs={"train": True})
        train = H(model.apply, v, apply_kwargs={"train": True})
        return logits, full_gradients(frozen, x), full_gradients(train, x, mutable=("batch_stats",))

    logits, fg, train = run(v, x)
    np.testing.assert_allclose(fg.output, jnp.max(logits, axis=-1), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(fg.relative_residual())) < 1e-4
    assert float(jnp.max(train.relative_residual())) > 1e-3  # the batch moments depend on x: not complete
