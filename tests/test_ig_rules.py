"""Integrated-gradients quadrature rules (Gauss–Legendre beside midpoint/trapezoid/left/right), exact node counts,
and the memory-budget chunk size (chunk=None) against fixed chunks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax import saliency as S
from gradjax._chunking import item_bytes
from gradjax.saliency.gradient_family import QUADRATURE_RULES, ig_nodes


@pytest.mark.parametrize("rule", QUADRATURE_RULES)
def test_nodes_in_unit_interval_weights_sum_to_one(rule):
    a, w = ig_nodes(7, rule)
    assert len(a) == len(w) == (8 if rule == "trapezoid" else 7)
    assert np.all((a >= 0) & (a <= 1))
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-12)


@pytest.mark.parametrize("m", [1, 2, 5, 12])
def test_gauss_legendre_exact_to_degree_2m_minus_1_and_not_beyond(m):
    a, w = ig_nodes(m, "gauss_legendre")
    for d in range(2 * m):
        np.testing.assert_allclose(np.sum(w * a ** d), 1.0 / (d + 1), rtol=1e-10, atol=1e-13)
    if m <= 5:  # degree 2m: not exact (the error (m!)^4 / ((2m+1) ((2m)!)^2) is below float64 round-off beyond)
        assert abs(np.sum(w * a ** (2 * m)) - 1.0 / (2 * m + 1)) > 1e-10
    # the midpoint rule with the same number of nodes is not exact for a cubic
    am, wm = ig_nodes(max(m, 2), "midpoint")
    assert abs(np.sum(wm * am ** 3) - 0.25) > 1e-6


def _poly_logits(x):
    """Two logits, f_0 = sum(x^4) (integrand a^3 along a ray from 0), f_1 = -f_0."""
    s = jnp.sum(x.reshape(x.shape[0], -1) ** 4, axis=1)
    return jnp.stack([s, -s], axis=1)


def test_gauss_legendre_completeness_exact_for_polynomial_model_where_midpoint_is_not():
    x = jax.random.uniform(jax.random.PRNGKey(0), (3, 4, 4, 2), minval=0.5, maxval=1.5)
    t = jnp.zeros((3,), jnp.int32)
    _, d_gl = S.integrated_gradients_with_delta(_poly_logits, x, t, steps=2, rule="gauss_legendre", reduce=None)
    _, d_mid = S.integrated_gradients_with_delta(_poly_logits, x, t, steps=2, rule="midpoint", reduce=None)
    scale = np.abs(np.asarray(_poly_logits(x)[:, 0]))
    assert np.max(np.abs(np.asarray(d_gl)) / scale) < 1e-5
    assert np.min(np.abs(np.asarray(d_mid)) / scale) > 1e-2


def test_auto_chunk_equals_fixed_chunks_and_uses_the_budget():
    """chunk=None (memory budget) gives the same IG / SmoothGrad as explicit chunks; a budget of one node's
    intermediates still gives the same map (one node per chunk)."""
    w1 = jax.random.normal(jax.random.PRNGKey(1), (48, 16))
    w2 = jax.random.normal(jax.random.PRNGKey(2), (16, 5))
    f = lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2  # noqa: E731
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 3))
    t = jnp.array([1, 3])
    ref, dref = S.integrated_gradients_with_delta(f, x, t, steps=9, rule="gauss_legendre", chunk=4, reduce=None)
    auto, dauto = S.integrated_gradients_with_delta(f, x, t, steps=9, rule="gauss_legendre", reduce=None)
    tiny = jax.jit(lambda z: S.integrated_gradients(f, z, t, steps=9, rule="gauss_legendre", reduce=None,
                                                    memory_budget=1))(x)
    for got in (auto, tiny):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dauto), np.asarray(dref), rtol=1e-3, atol=1e-5)
    key = jax.random.PRNGKey(4)
    sg_fixed = S.smoothgrad(f, x, t, key=key, samples=5, chunk=2, reduce=None)
    sg_auto = S.smoothgrad(f, x, t, key=key, samples=5, reduce=None)
    np.testing.assert_allclose(np.asarray(sg_auto), np.asarray(sg_fixed), rtol=1e-4, atol=1e-6)
    assert item_bytes(lambda a: f(x * a[:, None, None, None]), np.ones((9,), np.float32)) > 0


def test_bad_rule_and_bad_chunk_are_clear_errors():
    x = jnp.ones((1, 2, 2, 1))
    with pytest.raises(ValueError, match="rule must be one of"):
        S.integrated_gradients(_poly_logits, x, 0, rule="simpson")
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        S.integrated_gradients(_poly_logits, x, 0, chunk=0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ig_nodes(0, "gauss_legendre")


def _kinked_logits(x):
    """A ReLU model whose path gradient from the zero baseline jumps at many places (one kink per unit)."""
    z = x.reshape(x.shape[0], -1)
    c = jnp.linspace(0.05, 0.95, z.shape[1])
    s = jnp.sum(jax.nn.relu(z - c) * (1.0 + c) - 0.3 * jax.nn.relu(z - c / 2), axis=1)
    return jnp.stack([s, -s], axis=1)


def test_adaptive_rule_uses_completeness_to_beat_uniform_rules_at_equal_gradients():
    """On a piecewise-linear model (piecewise-constant path gradient), refining where the segment's completeness
    error is largest reaches a smaller delta than the fixed rules with the same number of gradients; and it is
    exact for a linear model."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (3, 2, 2, 1), minval=0.6, maxval=1.0)
    t = jnp.zeros((3,), jnp.int32)
    scale = np.abs(np.asarray(_kinked_logits(x)[:, 0] - _kinked_logits(jnp.zeros_like(x))[:, 0]))
    rel = lambda d: np.abs(np.asarray(d)) / scale  # noqa: E731
    run = jax.jit(lambda z, rule, n: S.integrated_gradients_with_delta(_kinked_logits, z, t, steps=n, rule=rule,
                                                                      reduce=None), static_argnums=(1, 2))
    _, d_ad = run(x, "adaptive", 15)
    for rule in ("midpoint", "trapezoid", "gauss_legendre"):
        n = 14 if rule == "trapezoid" else 15  # 15 gradients each
        _, d = run(x, rule, n)
        assert rel(d_ad).mean() < 0.5 * rel(d).mean(), rule
    lin = lambda z: jnp.stack([jnp.sum(z.reshape(z.shape[0], -1), 1)] * 2, axis=1)  # noqa: E731
    m, d_lin = S.integrated_gradients_with_delta(lin, x, t, steps=5, rule="adaptive", reduce=None)
    np.testing.assert_allclose(np.asarray(m), np.asarray(x), rtol=1e-5)
    assert np.max(np.abs(np.asarray(d_lin))) < 1e-4
    with pytest.raises(ValueError, match="adaptive' needs steps >= 3"):
        S.integrated_gradients(lin, x, t, steps=2, rule="adaptive")
