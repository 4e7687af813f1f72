"""Forward modes and the BatchNorm policy of extra passes (gradjax.model): train / frozen moments / eval."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradjax import fullgrad
from gradjax import model as gmodel
from gradjax.models import create_model

pytestmark = pytest.mark.usefixtures("fast_compilation")

B, K = 6, 5


@pytest.fixture(scope="module")
def setup():
    """A tiny VGG-4 (width 1/16, 8x8 inputs), its variables, a batch far from the init running statistics, and one
    train-mode pass (logits, new model state, recorded moments)."""
    model = create_model("vgg4", K, width=1 / 16)
    x = jax.random.normal(jax.random.PRNGKey(0), (B, 8, 8, 1)) * 2.0 + 0.7
    y = jnp.arange(B) % K
    v = model.init(jax.random.PRNGKey(1), x, train=False)
    params, state = v["params"], {"batch_stats": v["batch_stats"]}
    out = gmodel.apply_train(model.apply, params, state, x)
    return model, params, state, x, y, out


def _ce_sum(logits, y):
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def test_apply_train_records_moments_and_updates_running_stats(setup):
    model, params, state, x, y, (logits, new_state, moments) = setup
    assert set(moments) == {"block0", "block1", "block2"}
    for blk in moments:
        m, s = moments[blk]["bn"]["mean"], moments[blk]["bn"]["var"]
        old = state["batch_stats"][blk]["bn"]
        new = new_state["batch_stats"][blk]["bn"]
        np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * m, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * s, rtol=1e-5, atol=1e-6)
        assert not np.allclose(m, 0.0)


def test_frozen_pass_reproduces_train_logits_and_leaves_state_alone(setup):
    model, params, state, x, y, (logits, new_state, moments) = setup
    frozen = gmodel.apply_frozen(model.apply, params, state, moments, x)
    np.testing.assert_allclose(frozen, logits, rtol=1e-5, atol=1e-5)
    evl = gmodel.apply_eval(model.apply, params, state, x)
    assert not np.allclose(evl, logits, atol=1e-3)  # the moments are not the running statistics
    fn = gmodel.extra_pass_fn(model.apply, params, state, moments)  # default policy: frozen
    out, after = fn(x)
    np.testing.assert_allclose(out, frozen, rtol=1e-6, atol=1e-6)
    assert after is state


def test_frozen_moments_give_exact_per_example_gradients(setup):
    """grad_x of the batch sum through a frozen-moments pass == vmap over single examples with the same moments;
    the train-mode sum trick does not give per-example gradients (batch statistics mix the examples)."""
    model, params, state, x, y, (_, _, moments) = setup

    @jax.jit
    def grads(params, state, moments, x, y):
        frozen = lambda z: gmodel.apply_frozen(model.apply, params, state, moments, z)
        g_sum = jax.grad(lambda z: _ce_sum(frozen(z), y))(x)
        g_vmap = jax.vmap(lambda xi, yi: jax.grad(lambda z: _ce_sum(frozen(z[None]), yi[None]))(xi))(x, y)
        g_train = jax.grad(lambda z: _ce_sum(gmodel.apply_train(model.apply, params, state, z)[0], y))(x)
        return g_sum, g_vmap, g_train

    g_sum, g_vmap, g_train = grads(params, state, moments, x, y)
    np.testing.assert_allclose(g_sum, g_vmap, rtol=1e-4, atol=1e-6)
    assert float(jnp.max(jnp.abs(g_sum))) > 1e-4
    assert not np.allclose(g_train, g_sum, rtol=1e-2, atol=1e-4)


def test_full_gradient_completeness_on_a_frozen_moments_pass(setup, x64):
    """With frozen moments BN is affine per example, so f(x) = <grad_x f, x> + sum_l <grad_b_l f, b_l> holds (the
    BN taps carry beta - gamma * mean / sqrt(var + eps) with the batch moments)."""
    model, params, state, x, y, (_, _, moments) = setup
    handle = gmodel.ModelHandle(model.apply, {"params": params, **state, gmodel.MOMENTS: moments},
                                apply_kwargs={"train": True})
    res = fullgrad.completeness_residual(handle, x, y, dtype=jnp.float64)
    assert float(jnp.max(res)) < 1e-9
    # and the pass really is the frozen-moments one: its logits are the train-mode logits, not the eval ones
    f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
    lg = gmodel.apply_frozen(model.apply, f64(params), f64(state), f64(moments), jnp.asarray(x, jnp.float64))
    ev = gmodel.apply_eval(model.apply, f64(params), f64(state), jnp.asarray(x, jnp.float64))
    assert not np.allclose(lg, ev, atol=1e-3)


def test_extra_pass_policies(setup):
    model, params, state, x, y, (logits, new_state, moments) = setup
    x2 = x[::-1] * 0.5
    lg, after = gmodel.extra_pass_fn(model.apply, params, new_state, moments, "train")(x2)
    ref_lg, ref_state, _ = gmodel.apply_train(model.apply, params, new_state, x2)
    np.testing.assert_allclose(lg, ref_lg, rtol=1e-6)
    jax.tree.map(np.testing.assert_allclose, after, ref_state)
    # the authors' policy updates the running statistics a second time
    assert not np.allclose(after["batch_stats"]["block0"]["bn"]["mean"], new_state["batch_stats"]["block0"]["bn"]["mean"])
    lg, after = gmodel.extra_pass_fn(model.apply, params, state, moments, "eval")(x2)
    np.testing.assert_allclose(lg, gmodel.apply_eval(model.apply, params, state, x2), rtol=1e-6)
    assert after is state
    with pytest.raises(ValueError, match="unknown BatchNorm policy"):
        gmodel.extra_pass_fn(model.apply, params, state, moments, "running")


def test_frozen_pass_without_moments_is_a_clear_error(setup):
    model, params, state, x, y, _ = setup
    with pytest.raises(ValueError, match="no recorded moments"):
        gmodel.apply_frozen(model.apply, params, state, {}, x)
    with pytest.raises(ValueError, match="model_state must be a dict"):
        gmodel.apply_train(model.apply, params, None, x)


def test_model_without_batchnorm():
    mlp = create_model("mlp", 3, hidden=(8,))
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 2))
    v = mlp.init(jax.random.PRNGKey(1), x)
    lg, state, moments = gmodel.apply_train(mlp.apply, v["params"], {}, x)
    assert state == {} and moments == {}
    np.testing.assert_allclose(gmodel.apply_frozen(mlp.apply, v["params"], {}, moments, x), lg, rtol=1e-6)
