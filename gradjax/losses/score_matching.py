"""Score-matching and anti-score-matching regularizers of thesis ch. 5 (§5.3, §5.5, §5.8).

The implicit density model (§5.3): ``log p_θ(x | y=i) = f_i(x) - log Z_i``, so the label logit ``f_y`` is an
unnormalized log-density and its input-gradient the score. Every function here is a *per-example* objective
(shape ``[B]``, no hidden batch reduction, optax style): the training loss is
``mean_b CE_b + λ · mean_b reg_b`` (the authors' code: ``CE + lambda * reg``).

Regularizers (``h_b`` a Hessian-trace estimate of ``tr ∇²_x f_{y_b}(x_b)``, ``g_b = ∇_{x_b} f_{y_b}``):

========================  =====================================================  ===========================
function                  per-example value                                      thesis
========================  =====================================================  ===========================
score_matching            ``h + ½ ‖g‖² + μ h²``                                   eq. 5.4 (μ h² = §5.3.3)
anti_score_matching       ``-min(h, τ)`` (no gradient once ``h > τ``)            §5.5 "Anti-score-matching"
========================  =====================================================  ===========================

The third regularizer of §5.5, "Gradient-Norm" ``½ ‖g‖²``, is the one gradient-norm penalty of gradjax:
``½ ·`` :func:`gradjax.losses.regularizers.gradient_norm` with ``form="logit"`` (its term:
``gradjax.losses.terms.gradient_norm_term(λ / 2, form="logit")``). The squared norm ``‖g‖²`` here is
:func:`gradjax.losses.regularizers.gradient_sq_norm` too. The training terms of this module are
:func:`gradjax.losses.terms.score_matching_term` and :func:`gradjax.losses.terms.anti_score_matching_term`.

The authors' code reduces them as ``0.5 Σ‖g‖²/B + mean(tr) + μ mean(tr²)`` (score-matching),
``-mean(min(tr, τ))`` (anti) and ``0.5 Σ‖g‖²/B`` (gradient norm) — the batch mean of the per-example values.

**Names.** The thesis writes μ for the stability weight and τ for the anti-score-matching clamp; the authors'
code calls the stability weight ``tau`` and the clamp ``thresh``. Here: ``mu`` and ``tau`` as in the thesis.

**Trace estimators** (``estimator=``; all from :mod:`gradjax.trace`):
``"taylor"`` with ``form="one_sided"`` (the thesis's eq. 5.3/5.9, the default: σ = 0.01 and one probe for
score-matching, σ = 0.001 for anti-score-matching), ``"antithetic"`` and ``"control_variate"`` (ours, see
:func:`gradjax.trace.taylor_trace`), ``"hutchinson"``, ``"hutchpp"`` and ``"exact"`` (small inputs only).

**What the stability term really penalizes** (:func:`implied_regularizer`). With ``N`` one-sided probes,
``h = tr H + (2/σ) gᵀε̄ + (quadratic form) + O(σ)``, so on a quadratic ``f`` with Gaussian probes

    E[μ h²] = μ tr(H)² + (2μ/N) ‖H‖_F² + (4μ/(N σ²)) ‖g‖².

The last term is a gradient-norm penalty that the thesis does not mention: at the authors' σ = 0.01, μ = 1e-3,
N = 1 it is ``40 ‖g‖²`` — 80× the explicit ``½ ‖g‖²`` of eq. 5.4. So the thesis's "score-matched" model is,
in expectation, mostly a (strongly) gradient-norm-regularized one. The antithetic and control-variate forms
and Hutchinson have no linear term and apply ``μ tr(H)² + μ Var`` with ``Var = 2‖H‖_F²/N`` (Gaussian) only.

**BatchNorm.** These functions see only callables. A training loss builds ``f`` (clean pass) and, optionally,
``noisy_f`` (the function the Taylor probes are evaluated with) from one of the BatchNorm policies of
:mod:`gradjax.model`: frozen moments (the clean batch's statistics, per-example exact — gradjax's default) or
train mode (the authors': each noisy batch normalizes with its own statistics, so the estimate is the trace of
the whole batch's summed logit, with cross-example terms). See :func:`density_terms`.
"""
from __future__ import annotations

from typing import Callable, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gradjax import _validation as V
from gradjax import gradients as G
from gradjax import trace as T
from gradjax.losses.regularizers import gradient_sq_norm

__all__ = [
    "ESTIMATORS",
    "DensityTerms",
    "density_terms",
    "label_logit_fn",
    "score_matching_from_terms",
    "anti_score_matching_from_terms",
    "score_matching",
    "anti_score_matching",
    "implied_regularizer",
]

ScalarFn = Callable[[jax.Array], jax.Array]
Estimator = Literal["taylor", "hutchinson", "hutchpp", "exact"]
ESTIMATORS = ("taylor", "hutchinson", "hutchpp", "exact")
_FORMS = ("one_sided", "antithetic", "control_variate")


class DensityTerms(NamedTuple):
    """The per-example ingredients of the ch. 5 regularizers (each ``[B]`` except ``grad``)."""

    value: jax.Array
    """``f(x)`` — the label logit (the unnormalized log-density ``log p_θ(x|y) + const``)."""
    grad: Optional[jax.Array]
    """``∇_{x_b} f(x)_b``, shape of ``x`` (None when not needed)."""
    trace: Optional[jax.Array]
    """Estimate ``h`` of ``tr ∇²_{x_b} f(x)_b`` (None when not needed)."""

    @property
    def grad_sq_norm(self) -> jax.Array:
        """``‖∇_{x_b} f‖²`` per example, ``[B]``."""
        if self.grad is None:
            raise ValueError("these DensityTerms were computed without the gradient (need_grad=False).")
        return gradient_sq_norm(self.grad)


# ----------------------------------------------------------------------------------------------- validation
def _check_positive(v, name: str, allow_zero: bool = False) -> None:
    if V.is_concrete(v):
        a = np.asarray(v)
        if a.ndim != 0:
            raise ValueError(f"{name} must be a scalar; got shape {a.shape}.")
        ok = np.isfinite(a) and (a >= 0 if allow_zero else a > 0)
        if not ok:
            raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}; got {float(a)}.")


def _check_per_example(a, name: str, batch: Optional[int] = None) -> None:
    if jnp.ndim(a) != 1:
        raise ValueError(f"{name} must be per-example, shape [B]; got shape {tuple(jnp.shape(a))}.")
    if batch is not None and jnp.shape(a)[0] != batch:
        raise ValueError(f"{name} has {jnp.shape(a)[0]} entries for a batch of {batch}.")
    V.check_floating(a, name)


def _check_grad(grad, batch: Optional[int] = None) -> None:
    if jnp.ndim(grad) < 2:
        raise ValueError(f"grad must be per-example input-gradients [B, ...]; got shape {tuple(jnp.shape(grad))}.")
    if batch is not None and jnp.shape(grad)[0] != batch:
        raise ValueError(f"grad has batch size {jnp.shape(grad)[0]}, expected {batch}.")
    V.check_floating(grad, "grad")


# ----------------------------------------------------------------------------------- regularizers from terms
def score_matching_from_terms(trace: jax.Array, grad: jax.Array, *, mu: float) -> jax.Array:
    """Stabilized score-matching per example, thesis eq. 5.4 (bracketed term) with §5.3.3's stability term:

        reg_b = h_b + ½ ‖g_b‖² + μ h_b²,     h_b ≈ tr ∇²_x f_{y_b}(x_b),  g_b = ∇_x f_{y_b}(x_b).

    ``trace`` ``[B]``, ``grad`` ``[B, ...]``, ``mu`` ≥ 0 (thesis main text 1e-4; the authors' code 1e-3 and calls
    it ``tau``). Returns ``[B]``. Eq. 5.2 (Hyvärinen) without the stability term is ``mu=0``.
    """
    _check_per_example(trace, "trace")
    _check_grad(grad, jnp.shape(trace)[0])
    _check_positive(mu, "mu", allow_zero=True)
    return trace + 0.5 * gradient_sq_norm(grad) + mu * jnp.square(trace)


def anti_score_matching_from_terms(trace: jax.Array, *, tau: float) -> jax.Array:
    """Anti-score-matching per example (thesis §5.5): ``reg_b = -min(h_b, τ)``.

    Minimizing it *maximizes* the Hessian trace until it reaches the threshold ``τ`` (thesis 1000; the authors'
    code 1e4 and calls it ``thresh``); above ``τ`` the value is constant and its gradient exactly zero, per
    example. Returns ``[B]``.
    """
    _check_per_example(trace, "trace")
    if V.is_concrete(tau) and not np.isfinite(np.asarray(tau)):
        raise ValueError(f"tau must be finite; got {tau}.")
    return -jnp.minimum(trace, jnp.asarray(tau, trace.dtype))


# ------------------------------------------------------------------------------------------ model-level terms
def label_logit_fn(logits_fn: Callable[[jax.Array], jax.Array], labels: jax.Array) -> ScalarFn:
    """``x -> f_{y_b}(x)_b`` ``[B]``: the label logit, the implicit log-density of thesis §5.3."""
    labels = jnp.asarray(labels)
    if jnp.ndim(labels) != 1:
        raise ValueError(f"labels must be [B] class indices; got shape {tuple(jnp.shape(labels))}.")
    V.check_integer(labels, "labels")
    return lambda x: G.select(logits_fn(x), labels.astype(jnp.int32))


def density_terms(f: ScalarFn, x: jax.Array, key: Optional[jax.Array] = None, *, need_grad: bool = True,
                  need_trace: bool = True, estimator: Estimator = "taylor", sigma: float = 0.01,
                  num_probes: int = 1, form: Literal["one_sided", "antithetic", "control_variate"] = "one_sided",
                  distribution: Optional[str] = None, noisy_f: Optional[ScalarFn] = None,
                  value_and_grad: Optional[tuple[jax.Array, jax.Array]] = None, num_matvecs: Optional[int] = None,
                  probes: Optional[jax.Array] = None, chunk: Optional[int] = None,
                  memory_budget: Optional[int] = None) -> DensityTerms:
    """``f(x)``, ``∇_{x_b} f(x)_b`` and a Hessian-trace estimate ``h_b`` — what the ch. 5 regularizers need.

    ``f``: batched scalar function ``x [B, ...] -> [B]`` (e.g. :func:`label_logit_fn`), differentiable w.r.t.
    what it closes over (the parameters: these terms are trained through). Per-example gradients use the sum
    trick (``∇_x Σ_b f(x)_b``), which equals the per-example gradient when examples are independent — true for
    eval mode and frozen BatchNorm moments; in train-mode BatchNorm it is the authors' cross-example gradient.

    Trace (``need_trace``), keyword ``estimator``:

    * ``"taylor"`` — :func:`gradjax.trace.taylor_trace` with ``sigma`` (> 0), ``num_probes``, ``form``
      (``"one_sided"`` = thesis eq. 5.3/5.9; ``"antithetic"``, ``"control_variate"`` remove the first-order
      term, the latter re-using the gradient computed here). The probes are evaluated with ``noisy_f`` if given
      (the authors' BatchNorm policy: a train-mode pass per noisy batch) and the base value ``f(x)`` is re-used:
      ``h = 2/(Nσ²) Σ_n (noisy_f(x + σε_n) - f(x))``. One extra forward per probe (two for antithetic).
    * ``"hutchinson"`` (``num_probes``), ``"hutchpp"`` (``num_matvecs`` ≥ 3), ``"exact"`` — HVP-based, from ``f``
      (``noisy_f`` is not used: there are no noisy passes).

    ``distribution``: probe law (default Gaussian for Taylor as in the thesis, Rademacher for Hutchinson).
    ``value_and_grad``: ``(f(x), ∇f(x))`` if the caller already has them (skips one forward+backward).
    The randomized estimators need ``key`` — or explicit probe noise ``probes`` ``[num_probes, *x.shape]``
    (unit scale; Hutch++: ``[num_matvecs - num_matvecs // 3, *x.shape]``), e.g. another implementation's, in
    which case ``key`` is ``None`` and ``num_probes`` is taken from ``probes``. ``chunk``/``memory_budget``: probes
    per evaluation (``None``: sized from the budget; see :mod:`gradjax.trace`).
    """
    V.check_floating(x, "x")
    if jnp.ndim(x) < 2:
        raise ValueError(f"x must be a batch [B, ...] of rank >= 2; got shape {tuple(jnp.shape(x))}.")
    B = jnp.shape(x)[0]
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}.")
    if form not in _FORMS:
        raise ValueError(f"form must be one of {_FORMS}; got {form!r}.")
    if need_trace:
        if estimator == "taylor":
            _check_positive(sigma, "sigma")
        if estimator != "exact" and key is None and probes is None:
            raise ValueError(f"estimator={estimator!r} is randomized and needs a jax.random key (or probes=...).")
        if estimator == "exact" and probes is not None:
            raise ValueError("estimator='exact' uses no probes; drop probes=.")
        if estimator == "hutchpp" and num_matvecs is None:
            raise ValueError("estimator='hutchpp' needs num_matvecs=... (>= 3).")
        if noisy_f is not None and estimator != "taylor":
            raise ValueError("noisy_f (a separate function for the noisy passes) only applies to estimator='taylor'.")

    if value_and_grad is not None:
        fx, g = value_and_grad
        _check_per_example(fx, "value_and_grad[0]", B)
        if jnp.shape(g) != jnp.shape(x):
            raise ValueError(f"value_and_grad[1] must have the shape of x {tuple(jnp.shape(x))}; got {jnp.shape(g)}.")
    elif need_grad or (need_trace and estimator == "taylor" and form == "control_variate"):
        fx, g = G.value_and_input_gradient(f, x)
    else:
        fx, g = f(x), None
        _check_per_example(fx, "f(x)", B)
    if not need_trace:
        return DensityTerms(fx, g if need_grad else None, None)

    chunking = dict(chunk=chunk, memory_budget=memory_budget)
    n = None if probes is not None else num_probes
    if estimator == "taylor":
        tr = T.taylor_trace(noisy_f or f, x, key, sigma=sigma, num_probes=n, distribution=distribution or "gaussian",
                            form=form, fx=fx, grad_fx=g if form == "control_variate" else None, warn_rtol=None,
                            probes=probes, **chunking)
    elif estimator == "hutchinson":
        tr = T.hutchinson_trace(f, x, key, num_probes=n, distribution=distribution or "rademacher", probes=probes,
                                **chunking)
    elif estimator == "hutchpp":
        tr = T.hutchpp_trace(f, x, key, num_matvecs=num_matvecs, distribution=distribution or "rademacher",
                             probes=probes, **chunking)
    else:
        tr = T.exact_trace(f, x)
    return DensityTerms(fx, g if need_grad else None, tr)


def score_matching(f: ScalarFn, x: jax.Array, key: Optional[jax.Array] = None, *, mu: float = 1e-4,
                   **trace_options) -> tuple[jax.Array, DensityTerms]:
    """Stabilized score-matching regularizer per example (thesis eq. 5.4, §5.3.3): ``h + ½‖∇f‖² + μ h²``.

    ``f``: ``x -> [B]`` label logit; ``trace_options``: see :func:`density_terms` (default: one-sided Taylor,
    σ = 0.01, one probe — the authors' code; ``probes=`` instead of ``key`` for explicit probe noise). Returns
    ``(reg [B], terms)``. The training loss is
    ``CE + λ · mean(reg)`` (thesis λ = 1e-3, μ = 1e-4; the authors' code λ = 1e-5, μ = 1e-3). Note
    :func:`implied_regularizer`: with the one-sided estimator ``μ h²`` hides a ``4μ/(Nσ²) ‖∇f‖²`` term.
    """
    _check_positive(mu, "mu", allow_zero=True)
    terms = density_terms(f, x, key, need_grad=True, need_trace=True, **trace_options)
    return score_matching_from_terms(terms.trace, terms.grad, mu=mu), terms


def anti_score_matching(f: ScalarFn, x: jax.Array, key: Optional[jax.Array] = None, *, tau: float = 1000.0,
                        sigma: float = 1e-3, **trace_options) -> tuple[jax.Array, DensityTerms]:
    """Anti-score-matching regularizer per example (thesis §5.5): ``-min(h, τ)``, ``(reg [B], terms)``.

    Defaults: one-sided Taylor with σ = 1e-3 (the authors' code), τ = 1000 (thesis; the code uses 1e4). The
    gradient is computed only if a control-variate form needs it. The clamp is per example, after the
    estimate: with the one-sided form the estimate's spread ``2‖∇f‖/σ`` enters ``min`` too (Jensen: the
    expected value ``E[-min(h, τ)]`` exceeds ``-min(tr, τ)`` once the spread reaches ``τ - tr``).
    """
    terms = density_terms(f, x, key, need_grad=False, need_trace=True, sigma=sigma, **trace_options)
    return anti_score_matching_from_terms(terms.trace, tau=tau), terms


# ------------------------------------------------------------------------------------- what is really applied
def implied_regularizer(*, mu: float, sigma: Optional[float] = None, num_probes: int = 1,
                        estimator: Estimator = "taylor", form: str = "one_sided",
                        distribution: Optional[str] = None) -> dict:
    """Coefficients of the regularizer that score-matching *really* applies in expectation over the probes.

    For a quadratic ``f`` (exact for the probe noise of any smooth ``f`` up to ``O(σ)``),

        E[h + ½‖g‖² + μ h²] = tr H + c_g ‖g‖² + μ tr(H)² + c_F ‖H‖_F² + c_off Σ_{i≠j} H_ij²

    with ``E[μh²] = μ(tr H)² + μ Var(h)`` and ``Var(h)`` of ``N`` probes:

    * one-sided Taylor (thesis eq. 5.9), Gaussian: ``(4‖g‖²/σ² + 2‖H‖_F²)/N`` → ``c_g = ½ + 4μ/(Nσ²)``;
    * antithetic / control-variate Taylor, Hutchinson (Gaussian): ``2‖H‖_F²/N`` → ``c_g = ½``;
    * Rademacher probes: ``2 Σ_{i≠j} H_ij² / N`` (plus ``4‖g‖²/(Nσ²)`` one-sided);
    * exact trace: no variance; Hutch++: less than Hutchinson (not closed-form; reported as Hutchinson's bound).

    Returns ``{"trace": 1, "grad_sq_norm": c_g, "trace_sq": μ, "hessian_fro_sq": c_F,
    "hessian_offdiag_sq": c_off, "hidden_grad_sq_norm": c_g - ½, "hidden_to_explicit": (c_g - ½)/½}``.
    At the authors' σ = 0.01, μ = 1e-3, N = 1: ``c_g = 40.5`` — a hidden gradient penalty 80× the explicit one.
    """
    _check_positive(mu, "mu", allow_zero=True)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}.")
    if form not in _FORMS:
        raise ValueError(f"form must be one of {_FORMS}; got {form!r}.")
    if isinstance(num_probes, bool) or not isinstance(num_probes, (int, np.integer)) or num_probes < 1:
        raise ValueError(f"num_probes must be an int >= 1; got {num_probes!r}.")
    dist = distribution or ("gaussian" if estimator == "taylor" else "rademacher")
    if dist not in ("gaussian", "rademacher"):
        raise ValueError(f"distribution must be 'gaussian' or 'rademacher'; got {dist!r}.")
    hidden = 0.0
    if estimator == "taylor":
        if sigma is None:
            raise ValueError("estimator='taylor' needs sigma.")
        _check_positive(sigma, "sigma")
        if form == "one_sided":
            hidden = 4.0 * mu / (num_probes * float(sigma) ** 2)
    c_var = 0.0 if estimator == "exact" else 2.0 * mu / num_probes
    return {"trace": 1.0, "grad_sq_norm": 0.5 + hidden, "trace_sq": float(mu),
            "hessian_fro_sq": c_var if dist == "gaussian" else 0.0,
            "hessian_offdiag_sq": c_var if dist == "rademacher" else 0.0,
            "hidden_grad_sq_norm": hidden, "hidden_to_explicit": hidden / 0.5}
