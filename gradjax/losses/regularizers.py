"""Noise-robustness regularizers of thesis ch. 2: the input-gradient-norm penalty (Prop. 2 logit form, eq. 2.3
cross-entropy form; also the chapter-5 "Gradient-Norm" regularizer, §5.5) and the l2 weight-decay baseline of
Table 2.2. (The dropout baseline is a model option: ``gradjax.models.create_model(..., dropout=0.25)``.)

The squared input-gradient norm is written once, :func:`gradient_sq_norm`: :func:`gradient_norm` and the
score-matching family (:mod:`gradjax.losses.score_matching`, eq. 5.4's ``½‖∇f‖²``) use it. Per-example functions
return ``[B]``; :func:`l2` is a parameter-level scalar. Their training terms:
:func:`gradjax.losses.terms.gradient_norm_term`, :func:`gradjax.losses.terms.l2_term`.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Optional

import jax
import jax.numpy as jnp

from gradjax import _validation as V
from gradjax._chunking import chunked_sum
from gradjax.losses.distillation import _check_x, _sum_per_example, jacobian_rows

Array = jax.Array
LogitsFn = Callable[[Array], Array]

__all__ = ["gradient_sq_norm", "gradient_norm", "l2", "noisy_cross_entropy"]


def gradient_sq_norm(grad: Array) -> Array:
    """``‖g_b‖²`` per example, ``[B]``, of per-example input-gradients ``grad`` ``[B, ...]`` — the one squared
    gradient norm of :mod:`gradjax.losses` (:func:`gradient_norm`, score-matching's ``½‖∇f‖²``, eq. 5.4)."""
    if jnp.ndim(grad) < 2:
        raise ValueError(f"grad must be per-example input-gradients [B, ...]; got shape {tuple(jnp.shape(grad))}.")
    return _sum_per_example(jnp.square(grad))


def gradient_norm(logits_fn: LogitsFn, x: Array, labels: Optional[Array] = None, *,
                          form: Literal["cross_entropy", "logit"] = "cross_entropy",
                          output: Literal["target", "top", "full"] = "target", temperature: float = 1.0) -> Array:
    """Input-gradient-norm penalty, the regularizer that input noise ``xi ~ N(0, sigma^2 I)`` induces.

    * ``form="cross_entropy"`` — thesis eq. 2.3 with one-hot ``y``:
      ``l_b = sum_i y^i ||grad_x S_s^i||^2 / (S_s^i)^2 = ||grad_x log softmax(f(x_b)/T)_{y_b}||^2``, the squared
      norm of the input-gradient of the per-example cross-entropy (double backprop). Its proof (§2.9, a Fisher
      approximation) gives the coefficient ``sigma^2 / 2`` — ``E CE(x + xi) ~ CE(x) + sigma^2/2 * l_b`` — while
      the printed eq. 2.3 says ``sigma^2``; the test suite checks ``sigma^2/2`` numerically (exact at second
      order when the labels follow the model's own distribution). ``output`` must be ``"target"`` (the label
      class; ``labels`` required) or ``"top"`` (the arg-max class, no labels).
    * ``form="logit"`` — Prop. 2 with squared error on the logits: ``l_b = sum_{i in I_b} ||grad_x S^i(x_b)||^2``
      with ``I_b`` the label (``"target"``), arg-max (``"top"``) or all classes (``"full"``, Prop. 2 exactly:
      ``E sum_i (y^i - S^i(x+xi))^2 = sum_i (y^i - S^i)^2 + sigma^2 l_b + O(sigma^4)``). Half of it with
      ``output="target"`` is the chapter-5 "Gradient-Norm" regularizer ``½ ||grad_x f_{y_b}(x_b)||^2`` (§5.5).

    ``logits_fn`` must treat examples independently (eval mode or frozen BatchNorm moments). Returns ``[B]``.
    """
    _check_x(x)
    if form not in ("cross_entropy", "logit"):
        raise ValueError(f"form must be 'cross_entropy' (eq. 2.3) or 'logit' (Prop. 2); got {form!r}.")
    if output not in ("target", "top", "full"):
        raise ValueError(f"output must be 'target', 'top' or 'full'; got {output!r}.")
    if output == "target" and labels is None:
        raise ValueError("output='target' needs labels [B] (the correct class, thesis §2.4.1); or use output='top'.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}.")

    def rows(logits):
        if output == "target":
            y = jnp.asarray(labels)
            V.check_labels(y, logits.shape[-1], logits.shape[0], "labels")
            return y.astype(jnp.int32)
        return jnp.argmax(jax.lax.stop_gradient(logits), axis=-1).astype(jnp.int32)

    if form == "logit":
        _, g = jacobian_rows(logits_fn, x, None if output == "full" else rows)
        return gradient_sq_norm(g)
    if output == "full":
        raise ValueError("form='cross_entropy' (eq. 2.3) sums over the label class only; use output='target' or 'top'.")
    log_probs = lambda z: jax.nn.log_softmax(logits_fn(z) / temperature, axis=-1)
    _, g = jacobian_rows(log_probs, x, lambda lp: rows(lp))
    return gradient_sq_norm(g)


def noisy_cross_entropy(logits_fn: LogitsFn, x: Array, targets: Array, key: Array, *, sigma: float,
                        num_samples: int = 1, antithetic: bool = True, chunk: Optional[int] = None,
                        memory_budget: Optional[int] = None) -> Array:
    """Monte-Carlo ``E_xi [ -sum_i y^i log softmax(f(x_b + xi))_i ]``, ``xi ~ N(0, sigma^2 I)`` — the left-hand
    side of eq. 2.3, for checking its coefficient. ``targets``: soft or one-hot ``[B, K]``. Returns ``[B]``.
    Noise samples are evaluated ``chunk`` at a time (:func:`gradjax._chunking.chunked_sum`; ``chunk=None``: sized
    from ``memory_budget`` bytes, default :data:`gradjax._chunking.DEFAULT_MEMORY_BUDGET`)."""
    _check_x(x)
    xi = sigma * jax.random.normal(key, (num_samples,) + tuple(x.shape), dtype=x.dtype)
    if antithetic:
        xi = jnp.concatenate([xi, -xi], axis=0)
    one = lambda e: -jnp.sum(targets * jax.nn.log_softmax(logits_fn(x + e), axis=-1), axis=-1)
    return chunked_sum(jax.vmap(one), xi, chunk=chunk, memory_budget=memory_budget) / xi.shape[0]


def l2(params: Any, *, include_bias: bool = True) -> Array:
    """``0.5 * sum_w ||w||^2`` over the parameter pytree (the l2 baseline of Table 2.2, gamma = 1e-3; a scalar,
    not per-example). ``include_bias=False`` skips leaves named ``bias`` and BatchNorm ``scale``."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError("l2: params has no array leaves.")
    total = jnp.zeros((), jnp.float32)
    for path, leaf in leaves:
        name = str(getattr(path[-1], "key", path[-1]))
        if not include_bias and name in ("bias", "scale"):
            continue
        total = total + jnp.sum(jnp.square(leaf))
    return 0.5 * total
