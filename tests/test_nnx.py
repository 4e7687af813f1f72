"""An NNX model works with the input-gradient, saliency and trace functions (gradjax's core takes plain callables):
through ``nnx.split`` and a pure function ``state -> (x -> logits)`` that calls ``nnx.merge(graphdef, state,
copy=True)`` (no NNX ``perturb``, no mutation of the model)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gradjax import gradients as G
from gradjax import saliency as S
from gradjax import trace as T

pytestmark = pytest.mark.usefixtures("fast_compilation")


class Net(nnx.Module):
    """A small softplus MLP on [B, 2, 3, 2] 'images' (smooth, so its input-Hessian is not zero)."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(12, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.softplus(self.l1(x.reshape(x.shape[0], -1))))


@pytest.fixture(scope="module")
def nnx_setup():
    graphdef, state = nnx.split(Net(nnx.Rngs(0)))

    def logits_fn(state):  # pure: a fresh copy of the module per call, the caller's state untouched
        return lambda x: nnx.merge(graphdef, state, copy=True)(x)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, 3, 2)), jnp.float32)
    return logits_fn, state, x


def test_nnx_input_gradient_matches_per_example_grad(nnx_setup):
    logits_fn, state, x = nnx_setup
    t = jnp.array([0, 3, 1])
    f = logits_fn(state)
    ref = jax.vmap(lambda xi, ti: jax.grad(lambda z: f(z[None])[0, ti])(xi))(x, t)
    np.testing.assert_allclose(G.logit_gradient(f, x, t), ref, rtol=1e-5, atol=1e-6)
    # the NNX state is a pytree: the caller jits with it as an argument
    jitted = jax.jit(lambda st, x_, t_: G.logit_gradient(logits_fn(st), x_, t_))(state, x, t)
    np.testing.assert_allclose(jitted, ref, rtol=1e-5, atol=1e-6)


def test_nnx_saliency_methods_jit_equals_eager(nnx_setup):
    logits_fn, state, x = nnx_setup
    key = jax.random.key(0, impl="rbg")
    f = logits_fn(state)
    for name, opts in (("gradient", {}), ("integrated_gradients", dict(steps=4, chunk=2)),
                       ("smoothgrad", dict(samples=3, chunk=2))):
        fn = S.SALIENCY_METHODS[name]
        eager = fn(f, x, key=key, **opts)
        jitted = jax.jit(lambda st, x_, k: fn(logits_fn(st), x_, key=k, **opts))(state, x, key)
        assert eager.shape == (3, 2, 3) and float(jnp.abs(eager).max()) > 0
        np.testing.assert_allclose(jitted, eager, rtol=1e-4, atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="ModelHandle"):  # internal-layer methods need a Linen handle
        S.fullgrad(f, x)


def test_nnx_trace_estimators(nnx_setup):
    logits_fn, state, x = nnx_setup
    log_density = lambda st: lambda z: jax.nn.logsumexp(logits_fn(st)(z), axis=-1)  # noqa: E731
    key = jax.random.PRNGKey(1)
    exact, hutch = jax.jit(lambda st, x_, k: (T.exact_trace(log_density(st), x_),
                                               T.hutchinson_trace(log_density(st), x_, k, num_probes=4)))(state, x, key)
    f = log_density(state)
    H = jax.vmap(jax.hessian(lambda xi: f(xi[None])[0]))(x).reshape(3, 12, 12)
    np.testing.assert_allclose(exact, jnp.trace(H, axis1=1, axis2=2), rtol=1e-4, atol=1e-5)
    assert float(jnp.min(jnp.abs(exact))) > 1e-3
    np.testing.assert_allclose(T.hutchinson_trace(f, x, key, num_probes=4), hutch, rtol=1e-4, atol=1e-5)  # eager
