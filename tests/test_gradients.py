"""Tests for gradjax.gradients: logit/loss/probability gradients and Jacobians (thesis ch. 2, §2.4.1, §5.2)."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax import gradients as G
from gradjax import precision as P


def init_mlp(rng, sizes, dtype=jnp.float32):
    """Tiny MLP parameters from a NumPy generator (fixed seed; cheap: no per-op compilation of jax.random)."""
    return [(jnp.asarray(rng.normal(size=(m, n)) / np.sqrt(m), dtype), jnp.asarray(0.1 * rng.normal(size=n), dtype))
            for m, n in zip(sizes[:-1], sizes[1:])]


def mlp(params, x, act=jnp.tanh):
    h = x.reshape(x.shape[0], -1)
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        if i < len(params) - 1:
            h = act(h)
    return h


def setup(dtype=jnp.float32, shape=(5, 2, 3), K=4, act=jnp.tanh, seed=0):
    rng = np.random.default_rng(seed)
    D = int(np.prod(shape[1:]))
    params = init_mlp(rng, [D, 16, K], dtype)
    x = jnp.asarray(rng.normal(size=shape), dtype)
    labels = jnp.asarray(rng.integers(0, K, size=shape[0]), jnp.int32)
    return params, functools.partial(mlp, params, act=act), x, labels


def jac_reference(logits_fn, x):
    """Per-example full Jacobian by forward mode on single examples: [B, K, ...]; exact products (the reference must
    not run as TF32 on a GPU)."""
    with P.exact():
        return jax.vmap(jax.jacfwd(lambda xi: logits_fn(xi[None])[0]))(x)


# --------------------------------------------------------------------------------------------- correctness
def test_logit_gradient_matches_jacfwd_and_finite_differences(x64):
    _, f, x, labels = setup(jnp.float64)
    B = x.shape[0]

    @jax.jit
    def run(x, labels):
        logits, g = G.logits_and_logit_gradient(f, x, labels)
        return jac_reference(f, x), logits, g, G.logit_gradient(f, x), f(x)

    J, logits, g, g_pred, ref_logits = run(x, labels)
    assert g.shape == x.shape and g.dtype == x.dtype
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-14)
    np.testing.assert_allclose(g, J[jnp.arange(B), labels], rtol=1e-12, atol=1e-12)
    # PREDICTED = arg-max class
    pred = jnp.argmax(ref_logits, axis=-1)
    np.testing.assert_allclose(g_pred, J[jnp.arange(B), pred], rtol=1e-12, atol=1e-12)
    # central finite differences on a few coordinates of example 0
    h, fj = 1e-6, jax.jit(f)
    for idx in [(0, 0, 0), (0, 1, 2), (0, 0, 1)]:
        e = np.zeros(x.shape)
        e[idx] = h
        fd = (fj(x + e)[0, labels[0]] - fj(x - e)[0, labels[0]]) / (2 * h)
        np.testing.assert_allclose(g[idx], fd, rtol=1e-7, atol=1e-9)


def test_jacobian_full_target_top_agree(x64):
    _, f, x, labels = setup(jnp.float64)
    B = x.shape[0]
    run = jax.jit(lambda x, t: (G.jacobian(f, x, mode="full"), G.jacobian(f, x, mode="target", target=t),
                                G.jacobian(f, x, mode="top"), jac_reference(f, x), f(x)))
    full, tgt, top, ref, logits = run(x, labels)
    assert full.shape == (B, 4) + x.shape[1:]
    np.testing.assert_allclose(full, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tgt, full[jnp.arange(B), labels], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(top, full[jnp.arange(B), jnp.argmax(logits, -1)], rtol=1e-13, atol=1e-13)
    # the rows of the full Jacobian differ, so the agreement above is not trivial
    assert float(jnp.abs(full[:, 0] - full[:, 1]).max()) > 1e-2


def test_loss_and_probability_gradients_match_reference(x64):
    _, f, x, labels = setup(jnp.float64)
    B = x.shape[0]

    @jax.jit
    def run(x, labels, T):  # the temperature may be traced
        def ce_single(xi, yi):
            return -jax.nn.log_softmax(f(xi[None])[0] / T)[yi]

        def p_single(xi, yi):
            return jax.nn.softmax(f(xi[None])[0] / T)[yi]

        return (G.loss_and_loss_gradient(f, x, labels, temperature=T),
                G.probabilities_and_probability_gradient(f, x, labels, temperature=T),
                (jax.vmap(ce_single)(x, labels), jax.vmap(jax.jacfwd(ce_single))(x, labels)),
                (jax.vmap(p_single)(x, labels), jax.vmap(jax.jacfwd(p_single))(x, labels)),
                G.loss_gradient(f, x, labels, temperature=T), G.probability_gradient(f, x, labels, temperature=T))

    for T in (1.0, 2.5):
        (loss, g), (p, gp), (loss_ref, g_ref), (p_ref, gp_ref), g2, gp2 = run(x, labels, jnp.float64(T))
        np.testing.assert_allclose(loss, loss_ref, rtol=1e-13)
        np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(p, p_ref, rtol=1e-13)
        np.testing.assert_allclose(gp, gp_ref, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(g2, g, rtol=1e-14)
        np.testing.assert_allclose(gp2, gp, rtol=1e-14)
    # loss-gradient = (softmax - onehot)ᵀ J (T = 1): a combination of all Jacobian rows
    lg, J, logits, lg_pred, lg_argmax = jax.jit(lambda x, t: (
        G.loss_gradient(f, x, t), jac_reference(f, x), f(x), G.loss_gradient(f, x, G.PREDICTED),
        G.loss_gradient(f, x, jnp.argmax(f(x), -1))))(x, labels)
    coef = jax.nn.softmax(logits, -1) - jax.nn.one_hot(labels, 4)
    np.testing.assert_allclose(lg.reshape(B, -1), jnp.einsum("bk,bkd->bd", coef, J.reshape(B, 4, -1)),
                               rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(lg_pred, lg_argmax, rtol=1e-14)


def test_sum_trick_equals_vmap_mode():
    _, f, x, labels = setup(jnp.float32, shape=(2, 4, 4, 3))  # NHWC images

    @jax.jit
    def run(x, labels):
        out = {}
        for name, target in (("labels", labels), ("pred", G.PREDICTED)):
            for fn in (G.logit_gradient, G.loss_gradient, G.probability_gradient):
                out[f"{name}-{fn.__name__}"] = (fn(f, x, target, batch_mode="sum"), fn(f, x, target, batch_mode="vmap"))
        out["jacobian"] = (G.jacobian(f, x, batch_mode="sum"), G.jacobian(f, x, batch_mode="vmap"))
        return out

    for key, (a, b) in run(x, labels).items():
        assert a.shape == b.shape, key
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(key))


def test_vmap_mode_is_per_example_for_batch_mixing_models():
    """A model that mixes examples (centring by the batch mean, like train-mode BatchNorm): the sum trick picks
    up cross-example terms, the vmap mode gives each example's own gradient (as a batch of one)."""
    _, f, x, labels = setup(jnp.float32, shape=(4, 6))
    mixing = lambda z: f(z - jnp.mean(z, axis=0, keepdims=True) + 0.3 * z)
    run = jax.jit(lambda x, t: (
        P.exact_by_default(jax.vmap(lambda xi, yi: jax.grad(lambda z: mixing(z[None])[0, yi])(xi)))(x, t),
        G.logit_gradient(mixing, x, t, batch_mode="vmap"), G.logit_gradient(mixing, x, t, batch_mode="sum")))
    per_example, vm, sm = run(x, labels)
    np.testing.assert_allclose(vm, per_example, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(sm - per_example).max()) > 1e-2


class TestJitVariants(chex.TestCase):
    """The same values with and without ``jax.jit`` (chex variants), against a per-example forward-mode reference."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_logit_gradient_and_jacobian_with_and_without_jit(self):
        _, f, x, labels = setup(jnp.float32)
        J = jac_reference(f, x)  # [B, K, ...]
        g = self.variant(lambda z, t: G.logit_gradient(f, z, t))(x, labels)
        chex.assert_trees_all_close(g, J[jnp.arange(x.shape[0]), labels], rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(self.variant(lambda z: G.jacobian(f, z, mode="full"))(x), J, rtol=1e-5,
                                    atol=1e-6)


def test_vmappable():
    _, f, x, labels = setup(jnp.float32)
    # vmap over an extra leading axis of batches (and PREDICTED under jit)
    xs = jnp.stack([x, 2 * x, -x])
    out = jax.jit(jax.vmap(lambda z: G.logit_gradient(f, z)))(xs)
    single = jax.jit(lambda z: G.logit_gradient(f, z))
    for i in range(3):
        np.testing.assert_allclose(out[i], single(xs[i]), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(out[0] - out[1]).max()) > 1e-3


# ------------------------------------------------------------------------------------ double backprop
def test_double_backprop_through_logit_gradient_matches_finite_differences(x64):
    """jax.grad w.r.t. the closed-over parameters of a penalty built from input-gradients (Jacobian matching /
    gradient-norm losses need this), checked against central finite differences along random directions."""
    params, _, x, labels = setup(jnp.float64)

    def penalties(p):
        f = functools.partial(mlp, p)
        return (jnp.sum(G.logit_gradient(f, x, labels) ** 2)
                + 0.5 * jnp.sum(G.loss_gradient(f, x, labels) ** 2)
                + 0.1 * jnp.sum(G.jacobian(f, x) ** 2)
                + 0.3 * jnp.sum(G.logit_gradient(f, x, labels, batch_mode="vmap") * x))

    value_and_grad = jax.jit(jax.value_and_grad(penalties))
    pen = jax.jit(penalties)
    _, grads = value_and_grad(params)
    rng = np.random.default_rng(5)
    h = 1e-5
    for _ in range(3):
        d = jax.tree_util.tree_map(lambda l: jnp.asarray(rng.normal(size=l.shape), l.dtype), params)
        plus = jax.tree_util.tree_map(lambda p, v: p + h * v, params, d)
        minus = jax.tree_util.tree_map(lambda p, v: p - h * v, params, d)
        fd = (pen(plus) - pen(minus)) / (2 * h)
        ad = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(d)))
        np.testing.assert_allclose(ad, fd, rtol=1e-7)
        assert abs(float(ad)) > 1e-3


# ------------------------------------------------------------------------------- §5.2 shift invariance
@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-11), (jnp.float32, 2e-5)])
def test_shift_invariance_of_softmax(dtype, tol):
    """Thesis §5.2, Observation: f̃_i = f_i + g(x) for every class changes logit-gradients by ∇g but leaves
    cross-entropy values, loss-gradients (and probabilities) unchanged."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", dtype == jnp.float64)
    try:
        _, f, x, labels = setup(dtype)
        w = jnp.asarray(np.random.default_rng(3).normal(size=x.shape[1:]), dtype)
        axes = tuple(range(1, x.ndim))

        def g(z):  # nonlinear, per-example
            return 3.0 * jnp.sin(2.0 * jnp.sum(z * w, axis=axes)) + jnp.sum(z**2, axis=axes)

        f_shift = lambda z: f(z) + g(z)[:, None]

        @jax.jit
        def run(x, t):
            return dict(grad_g=jax.grad(lambda z: jnp.sum(g(z)))(x),
                        lg=G.logit_gradient(f, x, t), lg_s=G.logit_gradient(f_shift, x, t),
                        loss=G.loss_and_loss_gradient(f, x, t), loss_s=G.loss_and_loss_gradient(f_shift, x, t),
                        pg=G.probability_gradient(f, x, t), pg_s=G.probability_gradient(f_shift, x, t))

        r = run(x, labels)
        np.testing.assert_allclose(r["lg_s"] - r["lg"], r["grad_g"], rtol=tol, atol=tol * 10)
        assert float(jnp.abs(r["lg_s"] - r["lg"]).max()) > 1.0  # logit-gradients really changed
        np.testing.assert_allclose(r["loss_s"][0], r["loss"][0], rtol=tol, atol=tol)
        np.testing.assert_allclose(r["loss_s"][1], r["loss"][1], rtol=tol, atol=tol * 10)
        np.testing.assert_allclose(r["pg_s"], r["pg"], rtol=tol, atol=tol * 10)
    finally:
        jax.config.update("jax_enable_x64", prev)


# ------------------------------------------------------------------------------------------ has_aux
def test_has_aux_returns_train_mode_batch_stats():
    """A train-mode Flax pass returns (logits, updated batch_stats): with has_aux the gradient functions return the
    aux unchanged next to the gradient of the summed selected outputs (sum mode; BatchNorm couples examples)."""
    import flax.linen as nn

    from gradjax.models import TappedBatchNorm, TappedDense

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            h = TappedBatchNorm(name="bn")(TappedDense(8, name="d")(x.reshape(x.shape[0], -1)), train=train)
            return TappedDense(4, name="head")(jnp.tanh(h))

    model = Net()
    _, _, x, labels = setup(jnp.float32)
    v = model.init(jax.random.PRNGKey(0), x)
    train_fn = lambda z: model.apply(v, z, train=True, mutable=["batch_stats"])  # noqa: E731

    @jax.jit
    def run(x, y):
        logits, state = train_fn(x)
        with P.exact():  # references at float32-exact products, as gradjax's
            ref = jax.grad(lambda z: jnp.sum(G.select(train_fn(z)[0], y)))(x)
            ref_loss = jax.grad(lambda z: -jnp.sum(G.select(jax.nn.log_softmax(train_fn(z)[0]), y)))(x)
        return (logits, state, ref, ref_loss, G.logits_and_logit_gradient(train_fn, x, y, has_aux=True),
                G.loss_gradient(train_fn, x, y, has_aux=True), G.logit_gradient(train_fn, x, y, batch_mode="vmap",
                                                                                has_aux=True))

    logits, state, ref, ref_loss, (lg, g, aux), (gl, aux_l), (gv, aux_v) = run(x, labels)
    np.testing.assert_allclose(lg, logits, rtol=1e-6)
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gl, ref_loss, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(aux, state, rtol=1e-6)
    assert not np.allclose(aux["batch_stats"]["bn"]["mean"], v["batch_stats"]["bn"]["mean"])
    chex.assert_trees_all_close(aux_l, state, rtol=1e-6)
    # vmap mode: each example as a batch of one, aux stacked over examples
    assert aux_v["batch_stats"]["bn"]["mean"].shape == (x.shape[0], 8)
    assert gv.shape == x.shape and not np.allclose(gv, g, atol=1e-4)


# ------------------------------------------------------------------------------------------ validation
def test_bad_inputs_raise_clear_errors():
    _, f, x, labels = setup(jnp.float32)
    with pytest.raises(ValueError, match="floating-point"):
        G.logit_gradient(f, x.astype(jnp.int32), labels)
    with pytest.raises(ValueError, match="batch axis"):
        G.logit_gradient(f, jnp.float32(1.0), labels)
    with pytest.raises(ValueError, match="non-finite"):
        G.logit_gradient(f, x.at[0, 0, 0].set(jnp.nan), labels)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        G.logit_gradient(f, x, labels.at[0].set(4))
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        G.loss_gradient(f, x, labels.at[1].set(-1))
    with pytest.raises(ValueError, match="integer array"):
        G.logit_gradient(f, x, labels.astype(jnp.float32))
    with pytest.raises(ValueError, match="rank 1"):
        G.loss_gradient(f, x, labels[:, None])
    with pytest.raises(ValueError, match="5 examples"):
        G.probability_gradient(f, x, labels[:3])
    with pytest.raises(ValueError, match="PREDICTED"):
        G.logit_gradient(f, x, "argmax")
    with pytest.raises(ValueError, match="batch_mode"):
        G.logit_gradient(f, x, labels, batch_mode="loop")
    with pytest.raises(ValueError, match="temperature"):
        G.loss_gradient(f, x, labels, temperature=0.0)
    with pytest.raises(ValueError, match="mode must be"):
        G.jacobian(f, x, mode="diag")
    with pytest.raises(ValueError, match="needs target"):
        G.jacobian(f, x, mode="target")
    with pytest.raises(ValueError, match=r"shape \[B, K\]"):
        G.logit_gradient(lambda z: f(z)[:, 0], x, labels)
    with pytest.raises(ValueError, match="one value per example"):
        G.value_and_input_gradient(f, x)
    # label range is checked only on concrete labels; static checks still run under jit
    with pytest.raises(ValueError, match="floating-point"):
        jax.jit(lambda z: G.logit_gradient(f, z, labels))(x.astype(jnp.int32))
