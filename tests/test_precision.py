"""The precision policy (gradjax.precision), tested on the CPU with emulated GPU/TPU rounding (issue 23).

``emulate="gpu"`` / ``"tpu"`` on the built-in models rounds every product's inputs with ``lax.reduce_precision``
exactly as that chip would at the layer's resolved precision (10 mantissa bits for TF32, 7 for bfloat16), so the
policy (exact products by default, an explicit opt-in to speed, a warning naming the fix) is checked here as it
would behave on the chip. ``audit(..., backend="gpu"/"tpu")`` checks the precision each traced product would get.
"""
from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax import precision as P
from gradjax import trace
from gradjax.fullgrad import completeness_residual, full_gradients
from gradjax.gradients import logit_gradient
from gradjax.model import ModelHandle as H
from gradjax.models import MLP, TappedDense, create_model
from gradjax.saliency import integrated_gradients_with_delta

pytestmark = pytest.mark.usefixtures("fast_compilation")


def _fill(model, x, seed):
    """Variables with non-trivial biases and BatchNorm statistics (as tests/test_fullgrad.py), from NumPy."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    shapes = {k: shapes[k] for k in ("params", "batch_stats") if k in shapes}

    def value(path, s):
        name, shape = path[-1].key, s.shape
        a = {"kernel": lambda: rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1])),
             "bias": lambda: 0.3 * rng.normal(size=shape), "scale": lambda: 1.0 + 0.3 * rng.normal(size=shape),
             "mean": lambda: 0.5 * rng.normal(size=shape), "var": lambda: rng.uniform(0.5, 2.0, size=shape)}[name]()
        return jnp.asarray(a, s.dtype)

    return jax.tree_util.tree_map_with_path(value, shapes)


@pytest.fixture(scope="module")
def emulated_vgg():
    """A tiny VGG-4 whose products follow the active precision (precision=None) and round like a GPU's."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    model = create_model("vgg4", 10, width=0.125, precision=None, emulate="gpu")
    return model, _fill(model, x, 1), x


def _no_precision_warning():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error", P.PrecisionWarning)
    return ctx


# ------------------------------------------------------------------------------------------------ emulation

def test_emulated_rounding_follows_the_resolved_precision():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 64)), jnp.float32)
    exact_layer = TappedDense(16)
    v = _fill(exact_layer, x, 3)
    ref = np.asarray(x, np.float64) @ np.asarray(v["params"]["kernel"], np.float64) + np.asarray(v["params"]["bias"])

    def err(**kw):
        out = np.asarray(TappedDense(16, **kw).apply(v, x), np.float64)
        return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))

    assert err() < 1e-6  # default precision="highest": exact, emulated or not
    assert err(emulate="gpu") < 1e-6 and err(emulate="tpu") < 1e-6
    gpu, tpu = err(precision=None, emulate="gpu"), err(precision=None, emulate="tpu")  # no precision set: DEFAULT
    assert 1e-5 < gpu < 1e-2 and 1e-4 < tpu < 5e-2 and tpu > 3 * gpu  # TF32 (10 bits), bfloat16 (7 bits)
    with P.exact():  # the layer follows the context at trace time
        assert err(precision=None, emulate="gpu") < 1e-6
    with jax.default_matmul_precision("tensorfloat32"):
        assert err(precision=None, emulate="gpu") == pytest.approx(gpu, rel=1e-3)  # TF32 either way
    # rounding the operands is exactly lax.reduce_precision(., 8, 10)
    xr = np.asarray(jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=10), np.float64)
    kr = np.asarray(jax.lax.reduce_precision(v["params"]["kernel"], exponent_bits=8, mantissa_bits=10), np.float64)
    out = np.asarray(TappedDense(16, precision="default", emulate="gpu").apply(v, x), np.float64)
    np.testing.assert_allclose(out, xr @ kr + np.asarray(v["params"]["bias"]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="emulate"):
        TappedDense(16, precision=None, emulate="ipu").apply(v, x)
    with pytest.raises(ValueError, match="precision"):
        create_model("mlp", 3, precision="fast")


def test_audit_reports_what_the_chip_would_do():
    w = jnp.ones((5, 3))
    f = lambda x: jnp.tanh(x @ w)  # a plain callable: precision=None products  # noqa: E731
    x = jnp.ones((2, 5))
    assert P.audit(f, x, backend="cpu").exact
    gpu, tpu = P.audit(f, x, backend="gpu"), P.audit(f, x, backend="tpu")
    assert (gpu.mantissa_bits, tpu.mantissa_bits) == (10, 7) and not gpu.exact
    assert gpu.eps == 2.0 ** -10 and "dot_general" in gpu.sites[0]
    with P.policy():  # the library default: exact on every chip
        assert P.audit(f, x, backend="gpu").mantissa_bits == 23 and P.audit(f, x, backend="tpu").exact
    with jax.default_matmul_precision("high"):  # a user's explicit choice is respected by the policy
        with P.policy():
            assert P.audit(f, x, backend="tpu").mantissa_bits == 16
    bf16 = lambda x: x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)  # noqa: E731
    with P.exact():
        assert P.audit(bf16, x, backend="cpu").mantissa_bits == 7  # bfloat16 operands: no precision fixes that
    rounded = lambda x: jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=10) @ w  # noqa: E731
    assert P.audit(rounded, x, backend="cpu").mantissa_bits == 10


# ------------------------------------------------------------------------------------ full-gradient policy

def test_completeness_under_the_default_policy_with_emulation(emulated_vgg):
    """The default policy traces at 'highest', so the emulated TF32 rounding goes away: completeness <= 1e-4
    (round-off, in fact), eagerly and under jit, with no PrecisionWarning."""
    model, v, x = emulated_vgg
    ctx = _no_precision_warning()
    try:
        rel = full_gradients(H(model.apply, v), x).relative_residual()
        rel_jit = jax.jit(lambda v_, x_: completeness_residual(H(model.apply, v_), x_))(v, x)
    finally:
        ctx.__exit__(None, None, None)
    assert float(jnp.max(rel)) < 1e-5 and float(jnp.max(rel_jit)) < 1e-5
    # the bias term is a real part of f(x) here (the test could fail)
    fg = full_gradients(H(model.apply, v), x)
    assert float(jnp.min(jnp.abs(fg.bias_term()) / jnp.abs(fg.output))) > 1e-2


def test_opting_into_low_precision_warns_and_costs_completeness(emulated_vgg):
    model, v, x = emulated_vgg
    with jax.default_matmul_precision("tensorfloat32"):
        with pytest.warns(P.PrecisionWarning, match="10 mantissa bits.*exact\\(\\)"):
            rel = jax.jit(lambda v_, x_: full_gradients(H(model.apply, v_), x_).relative_residual())(v, x)
    assert float(jnp.max(rel)) > 1e-5  # TF32 rounding: completeness only to ~1e-3 .. 1e-4
    with P.exact():  # the fix the warning names
        ctx = _no_precision_warning()
        try:
            assert float(jnp.max(full_gradients(H(model.apply, v), x).relative_residual())) < 1e-5
        finally:
            ctx.__exit__(None, None, None)


def test_a_low_precision_model_warns_under_the_policy():
    """precision="default" fixed in the model, or bfloat16 compute: the policy cannot make it exact, so it warns."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 12)), jnp.float32)
    fast = MLP((16,), 5, precision="default", emulate="tpu")
    v = _fill(fast, x, 5)
    with pytest.warns(P.PrecisionWarning, match="7 mantissa bits"):
        rel = full_gradients(H(fast.apply, v), x).relative_residual()
    assert float(jnp.max(rel)) > 1e-5
    mixed = MLP((16,), 5, dtype=jnp.bfloat16)
    with pytest.warns(P.PrecisionWarning, match="bfloat16"):
        full_gradients(H(mixed.apply, v), x)


def test_policy_composes_with_an_outer_jit_for_plain_callables():
    """A plain Flax model (nn.Dense, precision=None) through full_gradients / trace estimators / IG inside an outer
    jit: every product traced inside carries HIGHEST (what a GPU would run exactly), its transposes too."""

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(4)(nn.softplus(nn.Dense(8)(x)))

    m = Plain()
    x = jnp.ones((2, 6))
    v = m.init(jax.random.PRNGKey(0), x)
    f = lambda z: m.apply(v, z)  # noqa: E731
    lse = lambda z: jax.nn.logsumexp(f(z), -1)  # noqa: E731
    key = jax.random.PRNGKey(1)
    assert not P.audit(jax.jit(jax.grad(lambda z: lse(z).sum())), x, backend="gpu").exact  # without gradjax
    paths = {
        "logit_gradient": lambda z: (logit_gradient(f, z) ** 2).sum(-1),  # the one gradient primitive
        "full_gradients": lambda z: full_gradients(H(m.apply, v), z).residual,
        "hutchinson": lambda z: trace.hutchinson_trace(lse, z, key, num_probes=2),
        "hutchpp": lambda z: trace.hutchpp_trace(lse, z, key, num_matvecs=3),
        "taylor": lambda z: trace.taylor_trace(lse, z, key, sigma=0.1, num_probes=2),
        "hvp": lambda z: trace.hvp(lse, z, jnp.ones_like(z)),
        "ig_delta": lambda z: integrated_gradients_with_delta(f, z, steps=4, reduce=None)[1],
    }
    for name, fn in paths.items():
        report = P.audit(jax.jit(jax.grad(lambda z: fn(z).sum())), x, backend="gpu")
        assert report.exact, (name, report)
    # the Hessian-vector product itself, traced alone (not only under an outer grad)
    assert P.audit(jax.jit(lambda z: trace.hvp(lse, z, jnp.ones_like(z))), x, backend="gpu").exact
    with jax.default_matmul_precision("tensorfloat32"):  # an explicit user choice is still respected
        assert not P.audit(jax.jit(lambda z: trace.hvp(lse, z, jnp.ones_like(z))), x, backend="gpu").exact


# ------------------------------------------------------------------------------------- Taylor round-off floor

def test_taylor_roundoff_floor_uses_the_effective_precision():
    """trace.py's round-off floor ~ eps·|f|/sigma² takes eps from the products' effective precision: TF32's 2^-10,
    not float32's 2^-23 (~8000x too optimistic)."""
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 10)), jnp.float32)
    model = MLP((16,), 3, "softplus", precision=None, emulate="gpu")
    v = _fill(model, x, 7)
    f = lambda z: jax.nn.logsumexp(model.apply(v, z), -1)  # noqa: E731
    exact = trace.taylor_noise_floor(f, x, sigma=0.05).roundoff
    with jax.default_matmul_precision("tensorfloat32"):
        tf32 = trace.taylor_noise_floor(f, x, sigma=0.05).roundoff
    ratio = np.asarray(tf32) / np.asarray(exact)
    np.testing.assert_allclose(ratio, 2.0 ** 13, rtol=0.05)  # eps ratio, up to the rounded f and grad f
    # the eager warning fires under TF32 at a sigma that is fine in exact float32
    key = jax.random.PRNGKey(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trace.taylor_trace(f, x, key, sigma=0.05, num_probes=4, warn_rtol=0.05)
    with jax.default_matmul_precision("tensorfloat32"):
        with pytest.warns(RuntimeWarning, match="round-off"):
            trace.taylor_trace(f, x, key, sigma=0.05, num_probes=4, warn_rtol=0.05)


# ------------------------------------------------------------------------------------ mixed-precision models

def test_mixed_precision_model_keeps_float32_params_and_logits():
    x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 8, 8, 1)), jnp.float32)
    full = create_model("vgg4", 10, width=0.125)
    mixed = create_model("vgg4", 10, width=0.125, dtype=jnp.bfloat16)
    v = _fill(full, x, 9)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(jax.eval_shape(mixed.init, jax.random.key(0), x)))
    out32, out16 = full.apply(v, x), mixed.apply(v, x)
    assert out16.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(out16 - out32)) / jnp.max(jnp.abs(out32)))
    assert 1e-5 < err < 0.1  # bfloat16 products: close, not equal
    assert P.audit(lambda z: mixed.apply(v, z), x).mantissa_bits == 7
