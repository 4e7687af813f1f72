"""Per-example Hessian-vector products and Hessian-trace estimators (thesis ch. 5, §5.3.2 and §5.8).

All functions take a batched scalar function ``f(x) -> [B]`` with ``x`` of shape ``[B, ...]`` — e.g.
``f = lambda x: jax.nn.logsumexp(logits_fn(x), -1)`` (the implicit log-density ``log p_θ(x)`` up to a constant,
§5.3) or a selected logit ``f_i(x) = log p_θ(x | y=i) + const`` — and return the per-example quantity for
``H_b = ∇²_{x_b} f(x)_b``, the Hessian w.r.t. example ``b``'s own input (``D = prod(x.shape[1:])``).

Per-example Hessians, two batch modes (keyword ``batch_mode``), as in :mod:`gradjax.gradients`:
``"sum"`` (default) differentiates ``Σ_b f(x)_b``: when examples are independent its Hessian is block-diagonal
with blocks ``H_b``, so a batched tangent ``v = (v_1..v_B)`` gives ``H v = (H_1 v_1, …, H_B v_B)`` in one
pass. ``"vmap"`` maps over examples run as batches of one (for functions that mix examples).

Probes: probe ``i`` is drawn from ``jax.random.fold_in(key, i)`` with shape ``x.shape`` (an independent
probe per example); :func:`sample_probes` with ``num_probes=N`` returns exactly these ``[N, *x.shape]`` draws.
With the default threefry keys the draw does not depend on ``chunk``, and :func:`hutchinson_trace` and
:func:`taylor_trace` draw *the same* probes for the same key, distribution and dtype, so they can be compared with
common random numbers. (Any key type works; keys of the ``"rbg"`` implementations may give different draws under
``vmap``, hence for different chunk sizes.) **Explicit probes**: every randomized estimator also takes
``probes=`` (an array ``[N, *x.shape]`` of unit-scale probes ``ε``, or one probe of ``x``'s shape) instead of a key,
e.g. another implementation's noise, so estimates can be compared on the same noise; the draws of
``sample_probes(key, ..., num_probes=N)`` give exactly the key-based result. Probes are processed ``chunk`` at a
time with a running sum (:func:`gradjax._chunking.chunked_sum`, the loop every gradjax estimator shares), so
memory does not grow with ``num_probes``; ``chunk=None`` (default) sizes the chunk from ``memory_budget`` bytes
(:func:`gradjax._chunking.auto_chunk`, default :data:`gradjax._chunking.DEFAULT_MEMORY_BUDGET`), the chunking
policy of the whole library.

Models: ``f`` is any JAX function — of a Flax Linen model (``lambda x: logsumexp(model.apply(v, x), -1)``, or of a
:class:`gradjax.model.ModelHandle` ``h``: ``lambda x: logsumexp(h(x), -1)``) or of an NNX model through
``nnx.split``/``nnx.merge``.

Jit: nothing here jits itself. Every function is pure and jittable (``f`` and the keyword options are static;
``sigma`` may be traced) and vmappable (e.g. over keys); the caller jits, e.g.::

    trace_fn = jax.jit(lambda x, key: hutchinson_trace(f, x, key, num_probes=16))

Called eagerly, a function runs operation by operation (each compiled once per shape by JAX; the probe loop is a
Python loop over chunks), so a repeated eager call compiles nothing new. Inputs are validated at the boundary
(values only when concrete). :func:`taylor_trace`'s float round-off warning needs concrete values and is only
issued in eager calls.

Estimators (``N`` probes, ``ε ~ N(0, I)`` or Rademacher; ``E[εεᵀ] = I`` for both):

====================  ========================================================  ============================
function              estimate of ``tr H`` (per example)                          cost per probe
====================  ========================================================  ============================
exact_trace           ``Σ_i e_iᵀ H e_i`` (``D`` HVPs)                             —
hutchinson_trace      ``1/N Σ εᵀ H ε``  (§5.3.2)                                   one forward-over-reverse JVP
taylor_trace          ``2/(Nσ²) Σ (f(x+σε) - f(x))``  (eq. 5.3 / eq. 5.9)          one forward pass
hutchpp_trace         Hutch++ (Meyer et al. 2021; not in the thesis)               ``num_matvecs`` HVPs total
====================  ========================================================  ============================
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradjax import _validation as V
from gradjax import precision as _precision
from gradjax._chunking import chunked_sum
from gradjax.gradients import per_example_sum, value_and_input_gradient

__all__ = [
    "hvp",
    "exact_trace",
    "hutchinson_trace",
    "taylor_trace",
    "hutchpp_trace",
    "value_grad_and_trace",
    "sample_probes",
    "taylor_noise_floor",
    "TaylorNoise",
]

ScalarFn = Callable[[jax.Array], jax.Array]
BatchMode = Literal["sum", "vmap"]
_DISTRIBUTIONS = ("rademacher", "gaussian")
_FORMS = ("one_sided", "antithetic", "control_variate")
_BATCH_MODES = ("sum", "vmap")
_METHODS = ("exact", "hutchinson", "hutchpp", "taylor")


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------
def _check_sigma(sigma) -> None:
    if V.is_concrete(sigma):
        s = np.asarray(sigma)
        if s.ndim != 0:
            raise ValueError(f"sigma must be a scalar; got shape {s.shape}.")
        if not np.isfinite(s) or not float(s) > 0:
            raise ValueError(f"sigma must be a finite number > 0; got {float(s)}.")


def _check_fx(fx, B: int, name: str = "f(x)") -> None:
    if jnp.shape(fx) != (B,):
        raise ValueError(f"{name} must have one value per example, shape ({B},); got {tuple(jnp.shape(fx))}.")


# ----------------------------------------------------------------------------------------------------------
# gradient / HVP machinery
# ----------------------------------------------------------------------------------------------------------
def _value_and_grad_fn(f: ScalarFn, batch_mode: str) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """``x -> (f(x) [B], ∇_{x_b} f(x)_b [B, ...])`` (the sum trick or vmap over batches of one; see
    :func:`gradjax.gradients.value_and_input_gradient`)."""
    return lambda x: value_and_input_gradient(f, x, batch_mode=batch_mode)


def _linearized_hessian(f: ScalarFn, x: jax.Array, batch_mode: str):
    """One forward+backward pass at ``x``; returns ``(f(x), ∇f(x), v -> H v)`` with ``H v`` a linear map that
    re-uses the stored residuals (forward-over-reverse: ``jax.linearize`` of the gradient)."""
    (fx, g), lin = jax.linearize(_value_and_grad_fn(f, batch_mode), x)
    return fx, g, lambda v: lin(v)[1]


def sample_probes(key: jax.Array, shape, dtype, distribution: str, *, num_probes: int | None = None) -> jax.Array:
    """One probe ``ε`` of ``shape`` with ``E[ε] = 0`` and ``E[εεᵀ] = I``: Rademacher (±1) or standard normal.

    With ``num_probes=N``: ``[N, *shape]``, probe ``i`` drawn from ``jax.random.fold_in(key, i)`` — exactly the
    probes the estimators of this module draw for ``key`` (pass them back as ``probes=`` to get the same estimate,
    or transform them first)."""
    V.check_choice(distribution, _DISTRIBUTIONS, "distribution")
    if num_probes is not None:
        n = V.check_count(num_probes, "num_probes")
        return jax.vmap(lambda i: sample_probes(jax.random.fold_in(key, i), shape, dtype, distribution))(
            jnp.arange(n))
    if distribution == "rademacher":
        return jax.random.rademacher(key, shape, dtype=dtype)
    return jax.random.normal(key, shape, dtype=dtype)


def _check_chunk(chunk) -> None:
    if chunk is not None:
        V.check_count(chunk, "chunk")


def _resolve_probes(key, probes, num_probes, x: jax.Array, *, count_name: str = "num_probes"):
    """``(probes [N, *x.shape] or None, N)``: explicit probes (validated, cast to ``x.dtype``) or ``None`` with the
    number of probes to draw from ``key``. Exactly one of ``key`` and ``probes`` must be given."""
    if probes is None:
        if key is None:
            raise ValueError("this estimator is randomized: pass a jax.random key, or explicit probes=[N, *x.shape].")
        return None, V.check_count(1 if num_probes is None else num_probes, count_name)
    if key is not None:
        raise ValueError("pass either a key or explicit probes=..., not both (the probes replace the key's draws).")
    probes = jnp.asarray(probes)
    if jnp.shape(probes) == jnp.shape(x):
        probes = probes[None]
    if probes.ndim != x.ndim + 1 or tuple(probes.shape[1:]) != tuple(x.shape):
        raise ValueError(f"probes must have shape [num_probes, *x.shape] = [N, {', '.join(map(str, x.shape))}] (or "
                         f"x's shape for one probe); got {tuple(jnp.shape(probes))}.")
    if probes.shape[0] < 1:
        raise ValueError("probes must hold at least one probe.")
    V.check_floating(probes, "probes")
    if num_probes is not None and V.check_count(num_probes, count_name) != probes.shape[0]:
        raise ValueError(f"{count_name}={num_probes} but {probes.shape[0]} probes were given; leave {count_name} "
                         "unset with explicit probes.")
    return probes.astype(x.dtype), int(probes.shape[0])


def _probe_mean(estimate: Callable[[jax.Array], jax.Array], draw: Callable[[jax.Array], jax.Array], key, probes,
                num_probes: int, chunk: int | None, memory_budget: int | None, offset: int = 0) -> jax.Array:
    """``1/N Σ_{i<N} estimate(ε_i)`` with ``ε_i = probes[offset + i]`` (explicit probes) or
    ``draw(fold_in(key, offset + i))``, evaluated ``chunk`` probes at a time (``vmap`` inside a chunk, a running sum
    across chunks: :func:`gradjax._chunking.chunked_sum`; ``chunk=None``: sized from ``memory_budget``). The result
    does not depend on ``chunk`` (up to float summation order), and a key's draws passed as ``probes`` give the
    key's result."""
    batched = jax.vmap(estimate)
    if probes is not None:
        return chunked_sum(batched, probes[offset:offset + num_probes], chunk=chunk,
                           memory_budget=memory_budget) / num_probes
    drawn = lambda idx: batched(jax.vmap(lambda i: draw(jax.random.fold_in(key, i)))(idx))  # noqa: E731
    return chunked_sum(drawn, np.arange(offset, offset + num_probes), chunk=chunk,
                       memory_budget=memory_budget) / num_probes


# ----------------------------------------------------------------------------------------------------------
# public: HVP and exact trace
# ----------------------------------------------------------------------------------------------------------
@_precision.exact_by_default  # float32-exact products unless the caller set a matmul precision
def hvp(f: ScalarFn, x: jax.Array, v: jax.Array, *, batch_mode: BatchMode = "sum") -> jax.Array:
    """Per-example Hessian-vector product ``(H_b v_b)_b``, shape of ``x`` (Pearlmutter's trick, §5.3.2).

    Forward-over-reverse: ``jax.jvp(∇_x Σ_b f(x)_b, (x,), (v,))`` — one forward and one backward pass plus
    their tangents. ``v`` has the shape of ``x`` (one direction per example).
    """
    x = V.check_input(x)
    V.check_choice(batch_mode, _BATCH_MODES, "batch_mode")
    if jnp.shape(v) != jnp.shape(x):
        raise ValueError(f"v must have the shape of x {tuple(jnp.shape(x))}; got {tuple(jnp.shape(v))}.")
    V.check_floating(v, "v")
    vg = _value_and_grad_fn(f, batch_mode)
    return jax.jvp(vg, (x,), (v.astype(x.dtype),))[1][1]


@_precision.exact_by_default  # float32-exact products unless the caller set a matmul precision
def _exact(f, x, *, max_dim, chunk, memory_budget, batch_mode):
    x = V.check_input(x)
    V.check_choice(batch_mode, _BATCH_MODES, "batch_mode")
    max_dim = V.check_count(max_dim, "max_dim")
    B = x.shape[0]
    D = int(math.prod(x.shape[1:]))
    if D > max_dim:
        raise ValueError(
            f"exact_trace needs D = prod(x.shape[1:]) = {D} Hessian-vector products per example, more than "
            f"max_dim={max_dim}. Use hutchinson_trace / hutchpp_trace / taylor_trace for large inputs, or raise "
            f"max_dim if you really want the exact value.")
    _check_chunk(chunk)
    fx, g, hv = _linearized_hessian(f, x, batch_mode)

    def diagonal(idx):  # basis indices [c] -> e_iᵀ H_b e_i, [c, B]
        c = idx.shape[0]
        e = jax.nn.one_hot(idx, D, dtype=x.dtype)  # [c, D]
        vs = jnp.broadcast_to(e[:, None, :], (c, B, D)).reshape((c,) + x.shape)
        return jax.vmap(per_example_sum)(vs * jax.vmap(hv)(vs))

    return fx, g, chunked_sum(diagonal, np.arange(D), chunk=chunk, memory_budget=memory_budget)


def exact_trace(f: ScalarFn, x: jax.Array, *, max_dim: int = 4096, chunk: int | None = None,
                memory_budget: int | None = None, batch_mode: BatchMode = "sum") -> jax.Array:
    """Exact per-example Hessian trace ``tr H_b = Σ_{i=1}^D e_iᵀ H_b e_i``, shape ``[B]``.

    ``D`` Hessian-vector products (``jax.linearize`` of the gradient once, then the linear map on every basis
    vector), ``chunk`` basis vectors at a time (``vmap``) with a running sum (``chunked_sum``), so memory is
    ``O(chunk · B · D)``; ``chunk=None`` (default) sizes the chunk from ``memory_budget`` bytes
    (:func:`gradjax._chunking.auto_chunk`). Raises ``ValueError`` if ``D > max_dim``. The reference for the
    estimators below; thesis eq. 5.2 (score-matching) needs this trace.
    """
    return _exact(f, x, max_dim=max_dim, chunk=chunk, memory_budget=memory_budget, batch_mode=batch_mode)[2]


# ----------------------------------------------------------------------------------------------------------
# Hutchinson
# ----------------------------------------------------------------------------------------------------------
@_precision.exact_by_default
def _hutchinson(f, x, key, *, num_probes, distribution, chunk, memory_budget, batch_mode, probes):
    x = V.check_input(x)
    probes, num_probes = _resolve_probes(key, probes, num_probes, x)
    V.check_choice(distribution, _DISTRIBUTIONS, "distribution")
    V.check_choice(batch_mode, _BATCH_MODES, "batch_mode")
    _check_chunk(chunk)

    fx, g, hv = _linearized_hessian(f, x, batch_mode)

    def estimate(v):
        return per_example_sum(v * hv(v))

    draw = lambda k: sample_probes(k, x.shape, x.dtype, distribution)  # noqa: E731
    return fx, g, _probe_mean(estimate, draw, key, probes, num_probes, chunk, memory_budget)


def hutchinson_trace(f: ScalarFn, x: jax.Array, key: jax.Array | None = None, *, num_probes: int | None = None,
                     distribution: Literal["rademacher", "gaussian"] = "rademacher", chunk: int | None = None,
                     memory_budget: int | None = None, batch_mode: BatchMode = "sum",
                     probes: jax.Array | None = None) -> jax.Array:
    """Hutchinson's estimator of the per-example Hessian trace, shape ``[B]`` (thesis §5.3.2).

    .. math::

       \\operatorname{tr} H \\approx \\frac{1}{N} \\sum_{n=1}^{N} \\epsilon_n^\\top H \\epsilon_n,
       \\qquad \\mathbb{E}[\\epsilon \\epsilon^\\top] = I

    ``tr H ≈ 1/N Σ_{n=1}^N ε_nᵀ H ε_n`` with ``E[εεᵀ] = I``, unbiased. ``H ε`` by forward-over-reverse
    (Pearlmutter's trick, §5.3.2: the thesis counts it as "two backward passes" per probe); the forward and
    backward pass at ``x`` are linearized once and re-used by every probe. Variance of one probe:
    ``2 ‖H‖_F²`` for Gaussian probes (the thesis's §5.8 reference formula, divided by ``N`` for ``N`` probes),
    ``2 Σ_{i≠j} H_ij²`` for Rademacher probes (the default: never larger).

    ``num_probes`` ``N`` (static int ≥ 1, default 1) are drawn as ``fold_in(key, n)`` — or given explicitly as
    ``probes`` ``[N, *x.shape]`` (then no key; ``distribution`` is not used) — and processed ``chunk`` at a time
    (a running sum, :func:`gradjax._chunking.chunked_sum`: memory ``O(chunk · B · D)``, independent of ``N``;
    ``chunk=None`` sizes the chunk from ``memory_budget`` bytes). The result does not depend on ``chunk``.
    """
    return _hutchinson(f, x, key, num_probes=num_probes, distribution=distribution, chunk=chunk,
                       memory_budget=memory_budget, batch_mode=batch_mode, probes=probes)[2]


# ----------------------------------------------------------------------------------------------------------
# Taylor trace estimator
# ----------------------------------------------------------------------------------------------------------
class TaylorNoise(NamedTuple):
    """Per-example noise scales of one Taylor-trace sample (each ``[B]``), see :func:`taylor_noise_floor`."""
    roundoff: jax.Array
    """Order of magnitude of the float error of one sample: ``4 eps (|f(x)| + Σ_i |x_i ∂_i f|) / σ²``."""
    gradient_spread: jax.Array
    """std of the first-order term of one sample: ``2 ‖∇f(x)‖ / σ`` (one-sided form; 0 for the others)."""


def _roundoff(fx, x, g, sigma, dtype, eps=None):
    """Order-of-magnitude floor of the float round-off in one Taylor sample (per example).

    Each evaluation of ``f`` carries a relative error of at least ``eps`` (the unit round-off of ``dtype``), and
    the difference ``f(x+σε) - f(x)`` keeps the absolute error ``~2 eps |f|``, amplified by ``2/σ²`` (one-sided,
    control variate) or ``1/σ²`` with four terms (antithetic); rounding ``x + σε`` to ``dtype`` perturbs the
    step by ``eps |x_i|``, adding ``~eps Σ|x_i ∂_i f|`` to the difference (only when ``g`` is known). ``eps``: the
    effective unit round-off of ``f``'s products (:func:`gradjax.precision.effective_eps`: TF32's 2^-10 on a GPU
    at the default matmul precision, not float32's); default ``dtype``'s."""
    eps = float(jnp.finfo(dtype).eps) if eps is None else eps
    scale = jnp.abs(fx)
    if g is not None:
        scale = scale + per_example_sum(jnp.abs(x * g))
    return 4.0 * eps * scale / jnp.asarray(sigma, dtype) ** 2


@_precision.exact_by_default
def taylor_noise_floor(f: ScalarFn, x: jax.Array, *, sigma: float,
                       form: Literal["one_sided", "antithetic", "control_variate"] = "one_sided",
                       fx: jax.Array | None = None, grad_fx: jax.Array | None = None,
                       batch_mode: BatchMode = "sum") -> TaylorNoise:
    """Diagnose the σ trade-off of :func:`taylor_trace` before using it (thesis §5.8, Observation).

    Returns per-example ``roundoff`` ≈ ``4 eps (|f(x)| + Σ_i |x_i ∂_i f(x)|) / σ²`` — an order-of-magnitude
    estimate of the float error of one sample (measured errors on a small softplus net were 0.1–0.5× this),
    growing as ``σ⁻²`` — and ``gradient_spread = 2 ‖∇f(x)‖ / σ``, the standard
    deviation that the first-order term ``2 ∇f·ε / σ`` adds to one one-sided sample (zero for the antithetic and
    control-variate forms, which cancel it). Taylor truncation bias grows as ``σ²`` instead: choose σ where the
    three balance, e.g. ``σ ≳ eps^{1/4}`` (≈ 0.02 in float32) times the input scale. Costs one forward and one
    backward pass unless ``fx`` and ``grad_fx`` are given.
    """
    x = V.check_input(x)
    _check_sigma(sigma)
    V.check_choice(form, _FORMS, "form")
    B = x.shape[0]
    if fx is None or grad_fx is None:
        V.check_choice(batch_mode, _BATCH_MODES, "batch_mode")
        fx0, g0 = _value_and_grad_fn(f, batch_mode)(x)
        fx = fx0 if fx is None else fx
        grad_fx = g0 if grad_fx is None else grad_fx
    _check_fx(fx, B)
    dtype = jnp.result_type(x)
    gnorm = jnp.sqrt(per_example_sum(grad_fx * grad_fx))
    spread = 2.0 * gnorm / sigma if form == "one_sided" else jnp.zeros_like(gnorm)
    return TaylorNoise(roundoff=_roundoff(fx, x, grad_fx, sigma, dtype, _precision.effective_eps(f, x)),
                       gradient_spread=spread)


def _warn_if_roundoff(fx, x, g, sigma, estimate, warn_rtol, f=None):
    """Eager calls only: warn when the round-off floor of one sample is not small against the estimate."""
    if warn_rtol is None or not all(V.is_concrete(a) for a in (fx, x, sigma, estimate)):
        return
    if g is not None and not V.is_concrete(g):
        g = None
    dtype = jnp.result_type(x)
    eps = float(jnp.finfo(dtype).eps) if f is None else _precision.effective_eps(f, x)  # f's products' precision
    floor = np.asarray(_roundoff(fx, x, g, sigma, dtype, eps))
    step_lost = float(sigma) <= 64 * eps * float(np.max(np.abs(np.asarray(x)), initial=0.0))
    ref = np.maximum(np.abs(np.asarray(estimate)), np.finfo(np.float64).tiny)
    worst = float(np.max(floor / ref))
    if worst > warn_rtol or step_lost:
        warnings.warn(
            f"taylor_trace: sigma={float(sigma):.3g} is small for {jnp.dtype(dtype).name} "
            f"(eps={eps:.2g}): the float round-off of one sample, ~4·eps·|f(x)|/sigma² = up to "
            f"{float(np.max(floor)):.3g}, is {worst:.2g}× the estimate"
            + (", and x + sigma·eps loses most of the step to rounding" if step_lost else "")
            + ". Increase sigma (the Taylor bias grows only as sigma²), use float64, or use "
              "hutchinson_trace. See taylor_noise_floor().",
            RuntimeWarning, stacklevel=3)


@_precision.exact_by_default
def _taylor(f, x, key, *, sigma, num_probes, distribution, form, grad_fx, fx, chunk, memory_budget, batch_mode,
            warn_rtol, probes, want_grad=False):
    x = V.check_input(x)
    _check_sigma(sigma)
    probes, num_probes = _resolve_probes(key, probes, num_probes, x)
    V.check_choice(distribution, _DISTRIBUTIONS, "distribution")
    V.check_choice(form, _FORMS, "form")
    V.check_choice(batch_mode, _BATCH_MODES, "batch_mode")
    _check_chunk(chunk)
    B = x.shape[0]
    if fx is not None:
        _check_fx(fx, B, "fx")
        V.check_finite(fx, "fx")
    if grad_fx is not None:
        if jnp.shape(grad_fx) != jnp.shape(x):
            raise ValueError(f"grad_fx must have the shape of x {tuple(x.shape)}; got {tuple(jnp.shape(grad_fx))}.")
        V.check_finite(grad_fx, "grad_fx")
    need_grad = grad_fx is None and (want_grad or form == "control_variate")

    if need_grad:
        fx0, grad_fx = _value_and_grad_fn(f, batch_mode)(x)
        fx = fx0 if fx is None else fx
    if fx is None:
        fx = f(x)
        _check_fx(fx, B)
    s = jnp.asarray(sigma, x.dtype)

    def estimate(eps):
        v = s * eps  # v ~ N(0, σ² I): thesis eq. 5.9
        if form == "one_sided":
            return 2.0 / s**2 * (f(x + v) - fx)
        if form == "antithetic":
            return (f(x + v) + f(x - v) - 2.0 * fx) / s**2
        return 2.0 / s**2 * (f(x + v) - fx - per_example_sum(grad_fx * v))

    draw = lambda k: sample_probes(k, x.shape, x.dtype, distribution)  # noqa: E731
    tr = _probe_mean(estimate, draw, key, probes, num_probes, chunk, memory_budget)
    _warn_if_roundoff(fx, x, grad_fx, sigma, tr, warn_rtol, f)
    return fx, grad_fx, tr


def taylor_trace(f: ScalarFn, x: jax.Array, key: jax.Array | None = None, *, sigma: float,
                 num_probes: int | None = None, distribution: Literal["gaussian", "rademacher"] = "gaussian",
                 form: Literal["one_sided", "antithetic", "control_variate"] = "one_sided",
                 grad_fx: jax.Array | None = None, fx: jax.Array | None = None, chunk: int | None = None,
                 memory_budget: int | None = None, batch_mode: BatchMode = "sum", warn_rtol: float | None = 0.05,
                 probes: jax.Array | None = None) -> jax.Array:
    """Forward-only Taylor estimator of the per-example Hessian trace, shape ``[B]`` (thesis §5.3.2, §5.8).

    .. math::

       \\mathrm{TTE} = \\frac{2}{N \\sigma^2} \\sum_{n=1}^{N} \\big( f(x + \\sigma \\epsilon_n) - f(x) \\big)
       = \\operatorname{tr} H + O(\\sigma^2) \\text{ in expectation} \\qquad \\text{(eq. 5.9)}

    With ``v_n = σ ε_n`` (so ``v_n ~ N(0, σ² I)`` for Gaussian ``ε_n``, exactly as the thesis writes it) and
    ``N = num_probes``:

    * ``form="one_sided"`` — the thesis's *Taylor Trace Estimator*, eq. 5.9 (= eq. 5.3, second line):
      ``TTE = 2/(Nσ²) Σ_n (f(x + v_n) - f(x))``. One extra forward pass per probe, no backward pass.
    * ``form="antithetic"`` (not in the thesis): ``1/(Nσ²) Σ_n (f(x + v_n) + f(x - v_n) - 2 f(x))`` — the
      symmetric second difference; its expectation equals the one-sided one (``ε`` and ``-ε`` are equally
      likely) but the first-order term ``2∇f·ε/σ`` cancels in every sample. Two forward passes per probe.
    * ``form="control_variate"`` (not in the thesis): ``2/(Nσ²) Σ_n (f(x + v_n) - f(x) - ∇f(x)ᵀ v_n)`` — the first
      line of eq. 5.3 / eq. 5.8, subtracting the zero-mean first-order term; free when ``∇f(x)`` is already
      known (pass ``grad_fx``, e.g. from the score-matching gradient-norm term), else one backward pass.

    Each sample equals ``εᵀHε + O(σ)`` (a Hutchinson sample on the same probe) plus, for the one-sided form,
    ``2 ∇f(x)ᵀε / σ``; expectations are ``tr H + O(σ²)`` for all three forms (odd Taylor terms vanish in
    expectation for a symmetric probe distribution). §5.8 Observation: on a quadratic ``f`` the one-sided
    variance exceeds Hutchinson's by ``4 ‖∇f(x)‖² / (Nσ²)`` (the thesis states the bound ``4σ⁻²‖∇f‖²``).

    **The σ trade-off.** Bias ``O(σ²)`` wants small σ; the one-sided spread ``≈ 2‖∇f‖/σ`` per sample and the float
    round-off ``≈ 4 eps |f(x)| / σ²`` want large σ. In float32 (``eps ≈ 1.2e-7``) a σ of ``1e-3`` already gives a
    round-off of ~0.5·``|f|`` per sample. When called eagerly (not under ``jit``), a ``RuntimeWarning`` is raised if
    the estimated round-off floor exceeds ``warn_rtol`` × ``|estimate|`` (``warn_rtol=None`` disables it); under
    ``jit`` call :func:`taylor_noise_floor` once outside instead.

    ``fx`` (``[B]``) skips the forward pass at ``x`` when the caller already has it. Probes are the same as
    :func:`hutchinson_trace`'s for the same key, distribution and dtype (common random numbers), chunked the same
    way (memory independent of ``num_probes``; ``chunk=None`` sized from ``memory_budget``). ``probes``
    ``[N, *x.shape]``: explicit unit-scale probes ``ε_n`` instead of a key (the step is ``σ ε_n``).
    """
    return _taylor(f, x, key, sigma=sigma, num_probes=num_probes, distribution=distribution, form=form,
                   grad_fx=grad_fx, fx=fx, chunk=chunk, memory_budget=memory_budget, batch_mode=batch_mode,
                   warn_rtol=warn_rtol, probes=probes)[2]


# ----------------------------------------------------------------------------------------------------------
# Hutch++
# ----------------------------------------------------------------------------------------------------------
@_precision.exact_by_default
def _hutchpp(f, x, key, *, num_matvecs, distribution, chunk, memory_budget, batch_mode, probes):
    x = V.check_input(x)
    m = V.check_count(num_matvecs, "num_matvecs", minimum=3)
    V.check_choice(distribution, _DISTRIBUTIONS, "distribution")
    V.check_choice(batch_mode, _BATCH_MODES, "batch_mode")
    _check_chunk(chunk)
    need = m - m // 3  # k sketch probes + r = m - 2k residual probes
    probes, n = _resolve_probes(key, probes, None, x)
    if probes is not None and n != need:
        raise ValueError(f"num_matvecs={m} uses {need} probes (k = {m // 3} for the sketch, {m - 2 * (m // 3)} for "
                         f"the residual); got {n}.")
    return _hutchpp_core(f, x, key, m, distribution, chunk, memory_budget, batch_mode, probes)


def _hutchpp_core(f, x, key, m, distribution, chunk, memory_budget, batch_mode, probes):
    B = x.shape[0]
    D = int(math.prod(x.shape[1:]))
    k = m // 3
    r = m - 2 * k  # probes for the residual; r >= k
    fx, g, hv = _linearized_hessian(f, x, batch_mode)
    draw = lambda kk: sample_probes(kk, x.shape, x.dtype, distribution)  # noqa: E731
    as_x = lambda cols: jnp.moveaxis(cols, -1, 0).reshape((cols.shape[-1],) + x.shape)  # [B,D,c] -> [c,B,...]
    as_cols = lambda vs: jnp.moveaxis(vs.reshape(vs.shape[0], B, D), 0, -1)  # [c,B,...] -> [B,D,c]

    # probes n = 0..k-1 (fold_in(key, n), or probes[:k]) form the sketch; n = k..k+r-1 the residual probes
    S = probes[:k] if probes is not None else jax.vmap(lambda i: draw(jax.random.fold_in(key, i)))(
        jnp.arange(k))  # [k, B, ...]
    HS = as_cols(jax.vmap(hv)(S))  # [B, D, k]
    Q, _ = jnp.linalg.qr(HS)  # [B, D, min(D, k)], orthonormal columns per example
    HQ = as_cols(jax.vmap(hv)(as_x(Q)))
    t_low = jnp.sum(Q * HQ, axis=(1, 2))  # tr(Qᵀ H Q)

    def estimate(eps):
        G = eps.reshape(B, D)
        Gp = G - jnp.einsum("bdc,bc->bd", Q, jnp.einsum("bdc,bd->bc", Q, G))  # (I - QQᵀ) g
        HGp = hv(Gp.reshape(x.shape)).reshape(B, D)
        return jnp.sum(Gp * HGp, axis=1)  # gᵀ (I-QQᵀ) H (I-QQᵀ) g

    t_res = _probe_mean(estimate, draw, key, probes, r, chunk, memory_budget, offset=k)
    return fx, g, t_low + t_res


def hutchpp_trace(f: ScalarFn, x: jax.Array, key: jax.Array | None = None, *, num_matvecs: int,
                  distribution: Literal["rademacher", "gaussian"] = "rademacher", chunk: int | None = None,
                  memory_budget: int | None = None, batch_mode: BatchMode = "sum",
                  probes: jax.Array | None = None) -> jax.Array:
    """Hutch++ estimate of the per-example Hessian trace, shape ``[B]`` (Meyer, Musco, Musco & Woodruff 2021;
    not in the thesis — a lower-variance drop-in for the Hutchinson estimator of §5.3.2).

    With ``m = num_matvecs`` (≥ 3) Hessian-vector products per example, ``k = ⌊m/3⌋``:
    sketch ``S ∈ R^{D×k}`` (random probes), ``Q = qr(H S)`` (``k`` HVPs), then
    ``tr H ≈ tr(Qᵀ H Q) + 1/r Σ_{n=1}^{r} g_nᵀ (I - QQᵀ) H (I - QQᵀ) g_n`` (``k`` + ``r = m - 2k`` HVPs).
    Unbiased; the top-``k`` eigen-directions are captured exactly, so the variance is that of Hutchinson on the
    deflated Hessian — much smaller when ``H`` has a dominant low-rank part (error ``O(1/m)`` vs ``O(1/√m)``).
    Memory ``O(k · B · D)`` for the sketch; residual probes are chunked like :func:`hutchinson_trace`.
    Explicit ``probes`` (instead of a key): ``[k + r, *x.shape]``, the first ``k`` the sketch, the rest the
    residual probes (``sample_probes(key, x.shape, x.dtype, distribution, num_probes=k + r)`` reproduces the
    key's estimate).
    """
    return _hutchpp(f, x, key, num_matvecs=num_matvecs, distribution=distribution, chunk=chunk,
                    memory_budget=memory_budget, batch_mode=batch_mode, probes=probes)[2]


# ----------------------------------------------------------------------------------------------------------
# value, gradient and trace together
# ----------------------------------------------------------------------------------------------------------
def value_grad_and_trace(f: ScalarFn, x: jax.Array, key: jax.Array | None = None, *,
                         method: Literal["exact", "hutchinson", "hutchpp", "taylor"] = "hutchinson",
                         **options) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(f(x) [B], ∇_{x_b} f(x)_b [B, ...], tr H_b [B])`` — the three terms of score-matching (thesis eq. 5.2,
    ``tr ∇²_x log p + ½ ‖∇_x log p‖²``, and eq. 5.4).

    ``method`` picks the trace (``options`` are its keyword options): ``"exact"`` (:func:`exact_trace`),
    ``"hutchinson"``, ``"hutchpp"`` (need ``key``) — for these the value and gradient are the primal outputs of
    the linearization the HVPs need anyway, so they are free — or ``"taylor"`` (:func:`taylor_trace`, any
    ``form``): one forward and one backward pass for ``f(x)`` and ``∇f(x)``, which the control-variate form then
    re-uses, plus forward passes for the probes. The randomized methods take ``probes=`` instead of ``key``.
    """
    V.check_choice(method, _METHODS, "method")
    chunking = {"chunk", "memory_budget", "batch_mode"}
    allowed = {
        "exact": {"max_dim"} | chunking,
        "hutchinson": {"num_probes", "distribution", "probes"} | chunking,
        "hutchpp": {"num_matvecs", "distribution", "probes"} | chunking,
        "taylor": {"sigma", "num_probes", "distribution", "form", "warn_rtol", "probes"} | chunking,
    }[method]
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for method={method!r}; allowed: {sorted(allowed)}.")
    if method != "exact" and key is None and options.get("probes") is None:
        raise ValueError(f"method={method!r} is randomized and needs a jax.random key (or probes=...).")
    opts = dict(chunk=None, memory_budget=None, batch_mode="sum")
    if method == "exact":
        opts.update(max_dim=4096)
        opts.update(options)
        return _exact(f, x, **opts)
    opts.update(distribution="gaussian" if method == "taylor" else "rademacher", probes=None)
    if method == "hutchinson":
        opts.update(num_probes=None)
        opts.update(options)
        return _hutchinson(f, x, key, **opts)
    if method == "hutchpp":
        if "num_matvecs" not in options:
            raise ValueError("method='hutchpp' needs num_matvecs=...")
        opts.update(options)
        return _hutchpp(f, x, key, **opts)
    if "sigma" not in options:
        raise ValueError("method='taylor' needs sigma=...")
    opts.update(num_probes=None, form="one_sided", warn_rtol=0.05)
    opts.update(options)
    return _taylor(f, x, key, grad_fx=None, fx=None, want_grad=True, **opts)
