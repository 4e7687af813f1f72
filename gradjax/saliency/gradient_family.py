"""Gradient family: random baseline, input-gradient, gradient x input, integrated gradients (thesis §3.2, §3.3).

Every map here is built on :func:`gradjax.gradients.logits_and_target_gradient` (one vjp, one-hot cotangent) and,
for the path integral, on :func:`gradjax._chunking.chunked_sum`. Works with a plain ``logits_fn`` or a
:class:`gradjax.model.ModelHandle`.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from gradjax import _validation as V
from gradjax import precision as P
from gradjax._chunking import chunked_sum
from gradjax.gradients import PREDICTED, Target, logits_and_target_gradient, per_example_sum, resolve_target, select
from gradjax.model import as_logits_fn
from gradjax.saliency.postprocess import reduce_channels

Array = jax.Array

__all__ = ["random_saliency", "input_gradient", "gradient_x_input", "integrated_gradients",
           "integrated_gradients_with_delta", "IG_RULES", "QUADRATURE_RULES", "ig_nodes"]

QUADRATURE_RULES = ("midpoint", "trapezoid", "left", "right", "gauss_legendre")
"""The fixed-node rules of :func:`ig_nodes`."""

IG_RULES = QUADRATURE_RULES + ("adaptive",)
"""Quadrature rules of :func:`integrated_gradients` (``"adaptive"``: nodes placed per example, see
:func:`integrated_gradients_with_delta`)."""


def random_saliency(model, x: Array, target: Target = PREDICTED, *, key=None) -> Array:
    """Random baseline: i.i.d. ``U(0, 1)`` scores ``[B, H, W]`` (ranking pixels uniformly at random).

    The model and target are ignored (the target is still checked); ``key`` is required. Used as the "Random"
    column of thesis Tables 3.1/3.2 and the random-removal baseline of §3.5.1/§3.5.2.
    """
    x = V.check_input(x, images=True)
    V.normalize_target(target, x.shape[0])
    return jax.random.uniform(V.check_key(key, "random_saliency"), x.shape[:3], dtype=x.dtype)


def _gradient(model, x: Array, target) -> Array:
    return logits_and_target_gradient(as_logits_fn(model), x, target).gradient


def input_gradient(model, x: Array, target: Target = PREDICTED, *, key=None,
                   reduce: Optional[str] = "abs_sum") -> Array:
    """Input-gradient saliency ``reduce(grad_x f_t(x))`` (Simonyan et al. 2013; thesis §3.2).

    ``x``: ``[B, H, W, C]`` (any ``[B, ...]`` with ``reduce=None``). Shape ``[B, H, W]`` (``reduce=None``:
    ``x.shape``).
    """
    x = V.check_input(x, images=reduce is not None, min_rank=2)
    return reduce_channels(_gradient(model, x, target), reduce)


def gradient_x_input(model, x: Array, target: Target = PREDICTED, *, key=None,
                     reduce: Optional[str] = "abs_sum") -> Array:
    """Gradient x input ``reduce(grad_x f_t(x) ⊙ x)`` (the input term of FullGrad, thesis eq. 3.2/3.3).

    For a bias-free ReLU network its sum equals ``f_t(x)`` (thesis Proposition 8). ``[B, H, W]``.
    """
    x = V.check_input(x, images=reduce is not None, min_rank=2)
    return reduce_channels(_gradient(model, x, target) * x, reduce)


def ig_nodes(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes ``alpha_k`` and weights ``w_k`` on [0, 1] (``sum_k w_k = 1``) of rule ``rule`` with
    ``steps`` intervals (``"gauss_legendre"``: ``steps`` nodes, the roots of the Legendre polynomial
    ``P_steps`` mapped to [0, 1], exact for polynomials of degree ``2 steps - 1``; also Captum's default rule).
    Float64 numpy arrays; ``len(alpha)`` is the number of gradients the rule costs."""
    steps = V.check_count(steps, "steps")
    V.check_choice(rule, QUADRATURE_RULES, "rule")
    m = steps
    if rule == "gauss_legendre":
        t, w = np.polynomial.legendre.leggauss(m)
        return (t + 1.0) / 2.0, w / 2.0
    if rule == "midpoint":
        return (np.arange(m) + 0.5) / m, np.full(m, 1.0 / m)
    if rule == "trapezoid":
        w = np.full(m + 1, 1.0 / m)
        w[0] = w[-1] = 0.5 / m
        return np.arange(m + 1) / m, w
    if rule == "left":
        return np.arange(m) / m, np.full(m, 1.0 / m)
    return np.arange(1, m + 1) / m, np.full(m, 1.0 / m)


@P.exact_by_default
def integrated_gradients_with_delta(model, x: Array, target: Target = PREDICTED, *, key=None, baseline=0.0,
                                    steps: int = 32, rule: str = "midpoint", chunk: Optional[int] = None,
                                    reduce: Optional[str] = "abs_sum",
                                    memory_budget: Optional[int] = None,
                                    loop: str = "scan") -> tuple[Array, Array]:
    """Integrated gradients and their completeness error (Sundararajan et al. 2017; thesis §3.2, §3.3).

    ``IG(x) = (x - x') ⊙ int_0^1 grad f_t(x' + a (x - x')) da``, the integral approximated by a quadrature on
    ``steps`` intervals: ``rule="midpoint"`` (Riemann midpoint, ``steps`` evaluations, error ``O(steps^-2)``),
    ``"trapezoid"`` (``steps + 1`` evaluations, ``O(steps^-2)``), ``"left"``/``"right"`` Riemann sums (``O(1/steps)``),
    ``"gauss_legendre"`` (``steps`` evaluations at the Gauss–Legendre nodes, exact for a polynomial integrand of
    degree ``2 steps - 1``; a ReLU network's path gradient is piecewise constant, so no fixed rule beats
    ``O(1/steps)`` in the worst case — measured deltas per rule: docs/BENCHMARKS.md), or ``"adaptive"``
    (``steps`` evaluations, ``>= 3``: a trapezoid rule refined per example where the exactly known completeness
    error of a path segment is largest — see the private ``_adaptive_average_gradient`` — evaluated in one
    batched call per refinement round, ``chunk``/``loop`` unused). :func:`ig_nodes` gives the fixed rules' nodes.
    Evaluated ``chunk`` nodes at a time (one model call on ``chunk * B`` inputs) with a running sum
    (:func:`gradjax._chunking.chunked_sum`); ``chunk=None`` (default) sizes the chunk from ``memory_budget`` bytes
    (default :data:`gradjax._chunking.DEFAULT_MEMORY_BUDGET`), so a small batch runs as one batched call.
    Exactly one gradient per node: ``steps`` (``steps + 1`` for the trapezoid rule), no padding. ``loop``: how
    several chunks run under ``jit`` (:func:`gradjax._chunking.chunked_sum`: ``"scan"`` bounds memory to one
    chunk, ``"unroll"`` avoids XLA:CPU's slower loop bodies).

    Args:
      baseline: ``x'``: a scalar (default ``0.0``, the black image for [0, 1] data) or an array broadcastable to
        ``x``.
      target: classes, resolved at ``x`` (:data:`PREDICTED` = arg-max at ``x``).

    Returns:
      ``(map, delta)``: ``map`` is ``reduce_channels(IG, reduce)`` (``[B, H, W]``; raw ``IG`` for
      ``reduce=None``) and ``delta = sum(IG) - (f_t(x) - f_t(x'))`` ``[B]``, the per-example completeness error
      of the quadrature (0 for the exact integral).

    Precision: traced under :func:`gradjax.precision.policy` (float32-exact products unless a matmul precision has
    been set), so ``delta`` measures the quadrature, not TF32/bfloat16 round-off (a floor of ``~1e-3 |f|``), on GPUs and
    TPUs too.
    """
    x = V.check_input(x, images=reduce is not None, min_rank=2)
    steps = V.check_count(steps, "steps")
    chunk = None if chunk is None else V.check_count(chunk, "chunk")
    V.check_choice(rule, IG_RULES, "rule")
    if rule == "adaptive" and steps < 3:
        raise ValueError(f"rule='adaptive' needs steps >= 3 (two end points and one refinement); got {steps}.")
    f = as_logits_fn(model)
    base = jnp.asarray(baseline, x.dtype)
    try:
        base = jnp.broadcast_to(base, x.shape)
    except ValueError as e:
        raise ValueError(f"baseline of shape {base.shape} does not broadcast to x of shape {x.shape}.") from e
    V.check_finite(base, "baseline")
    logits_x = f(x)
    t = resolve_target(logits_x, target)
    diff = x - base
    B = x.shape[0]

    def grads(a):  # a: [c] -> gradients at the c path points, [c, B, ...]
        c = a.shape[0]
        pts = base[None] + a.reshape((c,) + (1,) * x.ndim).astype(x.dtype) * diff[None]
        g = logits_and_target_gradient(f, pts.reshape((c * B,) + x.shape[1:]), jnp.tile(t, c)).gradient
        return g.reshape((c,) + x.shape)

    if rule == "adaptive":
        avg_grad = _adaptive_average_gradient(f, base, diff, t, steps)
    else:
        alphas, weights = ig_nodes(steps, rule)
        avg_grad = chunked_sum(grads, np.asarray(alphas, x.dtype), jnp.asarray(weights, x.dtype), chunk=chunk,
                               memory_budget=memory_budget, loop=loop)
    attr = diff * avg_grad
    delta = per_example_sum(attr) - (select(logits_x, t) - select(f(base), t))
    return reduce_channels(attr, reduce), delta


def _adaptive_average_gradient(f, base: Array, diff: Array, t: Array, steps: int) -> Array:
    """``int_0^1 grad f_t(x' + a d) da`` by a composite trapezoid rule whose nodes are refined per example where
    the path's completeness is violated, with exactly ``steps`` gradients.

    Every gradient evaluation at ``a`` also yields ``f_t(x' + a d)`` (its forward pass), so on each segment
    ``[a, b]`` the trapezoid error of the path integral is known exactly:
    ``e = (b - a)/2 (g_a + g_b)·d - (f_t(b) - f_t(a))``. Start: ``m0 = (steps - 1) // 2`` uniform segments
    (``m0 + 1`` nodes); then up to 4 rounds, each bisecting the ``k`` segments with the largest ``|e|`` of each
    example (one batched call on ``k * B`` points), until ``steps`` nodes are used. The nodes are ``[N, B]``
    (one set per example); the attribution weights are the trapezoid weights of each example's sorted nodes.
    """
    B = diff.shape[0]
    tail = (1,) * (diff.ndim - 1)

    def evaluate(a):  # a [c, B] -> (directional derivative [c, B], f_t [c, B], gradients [c, B, ...])
        c = a.shape[0]
        pts = base[None] + a.reshape((c, B) + tail) * diff[None]
        res = logits_and_target_gradient(f, pts.reshape((c * B,) + diff.shape[1:]), jnp.tile(t, c))
        g = res.gradient.reshape((c,) + diff.shape)
        fv = select(res.logits, jnp.tile(t, c)).reshape(c, B)
        return per_example_sum((g * diff[None]).reshape((c * B,) + diff.shape[1:])).reshape(c, B), fv, g

    def sort(a, *vals):
        order = jnp.argsort(a, axis=0)
        return order, jnp.take_along_axis(a, order, 0), [jnp.take_along_axis(v, order, 0) for v in vals]

    m0 = max(1, (steps - 1) // 2)
    a = jnp.broadcast_to(jnp.linspace(0.0, 1.0, m0 + 1, dtype=diff.dtype)[:, None], (m0 + 1, B))
    s, fv, g = evaluate(a)
    extra = steps - (m0 + 1)
    per_round = max(1, -(-extra // 4))
    while extra > 0:
        k = min(per_round, extra, a.shape[0] - 1)
        _, a_s, (s_s, f_s) = sort(a, s, fv)
        err = (a_s[1:] - a_s[:-1]) / 2 * (s_s[1:] + s_s[:-1]) - (f_s[1:] - f_s[:-1])  # [segments, B]
        _, worst = jax.lax.top_k(jnp.abs(err).T, k)  # [B, k]
        lo = jnp.take_along_axis(a_s[:-1].T, worst, 1)
        hi = jnp.take_along_axis(a_s[1:].T, worst, 1)
        mid = ((lo + hi) / 2).T  # [k, B]
        s2, f2, g2 = evaluate(mid)
        a, s, fv = jnp.concatenate([a, mid]), jnp.concatenate([s, s2]), jnp.concatenate([fv, f2])
        g = jnp.concatenate([g, g2])
        extra -= k
    order, a_s, _ = sort(a)
    h = a_s[1:] - a_s[:-1]
    w_sorted = jnp.zeros_like(a_s).at[:-1].add(h / 2).at[1:].add(h / 2)
    w = jnp.zeros_like(a_s).at[order, jnp.arange(B)[None, :]].set(w_sorted)  # weight of node n of example b
    return jnp.einsum("nb,nb...->b...", w, g)


def integrated_gradients(model, x: Array, target: Target = PREDICTED, *, key=None, baseline=0.0,
                         steps: int = 32, rule: str = "midpoint", chunk: Optional[int] = None,
                         reduce: Optional[str] = "abs_sum", memory_budget: Optional[int] = None,
                         loop: str = "scan") -> Array:
    """Integrated-gradients map ``[B, H, W]``; see :func:`integrated_gradients_with_delta` (same options)."""
    return integrated_gradients_with_delta(model, x, target, baseline=baseline, steps=steps, rule=rule,
                                           chunk=chunk, reduce=reduce, memory_budget=memory_budget,
                                           loop=loop)[0]
