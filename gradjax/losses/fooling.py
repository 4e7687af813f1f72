"""Fooling gradient explanations (thesis ch. 5: §5.2 Observation, §5.7, eq. 5.7).

* :func:`shift_logits` — the §5.2/§5.7 Observation: adding one scalar function ``g(x)`` to every logit,
  ``f̃_i = f_i + g``, leaves softmax, the cross-entropy and the loss-gradients unchanged, but moves every
  logit-gradient by ``∇g``.
* :func:`fooling_loss` — eq. 5.7 (Heo et al. 2019): ``L_fool = ‖s - m‖²`` per example with the normalized
  unsigned saliency ``s = |∇_x f_i| / (1ᵀ|∇_x f_i|)`` and a normalized binary mask ``m``; fine-tuning with
  ``CE + λ L_fool`` (the term :func:`gradjax.losses.terms.fooling_loss_term`) pushes the logit-gradients into
  the mask (§5.7.2: 83.85 % of the energy in a 15×15 top-left square, which holds 22 % of a 32×32 image).
* :func:`energy_fraction` — the §5.7.2 measurement: the share of ``Σ_c |g|`` inside the mask, for logit-,
  loss- and high-temperature (T = 1e3) loss-gradients (:func:`gradjax.gradients.loss_gradient` with
  ``temperature``).

Images are NHWC; a saliency/energy map sums ``|g|`` over channels (``[B, H, W]``), and masks are ``[H, W]``.
All functions are per-example (``[B]``), pure, jittable and differentiable (double backprop through the
logit-gradient when trained).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gradjax import _validation as V
from gradjax import gradients as G

__all__ = ["corner_mask", "saliency_distribution", "normalized_mask", "fooling_loss", "fooling_loss_of_model",
           "energy_fraction", "shift_logits"]

LogitsFn = Callable[[jax.Array], jax.Array]


def corner_mask(height: int, width: Optional[int] = None, *, side: Optional[int] = None) -> np.ndarray:
    """Binary ``[H, W]`` float32 mask with a top-left square of ones (thesis §5.7.2, Fig. 5.5a).

    ``side`` defaults to ``round(15/32 · H)`` — the thesis's 15×15 square on 32×32 CIFAR images (22 % of the
    pixels)."""
    width = height if width is None else width
    for n, name in ((height, "height"), (width, "width")):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be an int >= 1; got {n!r}.")
    side = int(round(15 / 32 * height)) if side is None else side
    if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or not 1 <= side <= min(height, width):
        raise ValueError(f"side must be an int in [1, {min(height, width)}]; got {side!r}.")
    m = np.zeros((height, width), np.float32)
    m[:side, :side] = 1.0
    return m


def _energy_map(grad: jax.Array) -> jax.Array:
    """``Σ_c |g|``: ``[B, H, W, C] -> [B, H, W]`` (a ``[B, H, W]`` map is taken as already channel-free)."""
    if jnp.ndim(grad) == 4:
        return jnp.sum(jnp.abs(grad), axis=-1)
    if jnp.ndim(grad) == 3:
        return jnp.abs(grad)
    raise ValueError(f"grad must be NHWC [B, H, W, C] or [B, H, W]; got shape {tuple(jnp.shape(grad))}.")


def _check_mask(mask, hw) -> jax.Array:
    mask = jnp.asarray(mask)
    if jnp.shape(mask) != tuple(hw):
        raise ValueError(f"mask must have shape [H, W] = {tuple(hw)}; got {tuple(jnp.shape(mask))}.")
    if V.is_concrete(mask):
        a = np.asarray(mask)
        if np.any(a < 0) or not np.all(np.isfinite(a)) or a.sum() <= 0:
            raise ValueError("mask must be finite, non-negative and not all zero.")
    return mask


def saliency_distribution(grad: jax.Array, *, eps: float = 1e-12) -> jax.Array:
    """``s = Σ_c|g| / (1ᵀ Σ_c|g|)`` per example, ``[B, H, W]`` summing to one (thesis §5.7.2).

    ``eps`` guards an all-zero gradient (its ``s`` is then 0, not NaN)."""
    e = _energy_map(grad)
    total = jnp.sum(e, axis=(1, 2), keepdims=True)
    return e / (total + eps)


def normalized_mask(mask) -> jax.Array:
    """``m / (1ᵀ m)`` — the thesis's "normalized binary mask" (a distribution over pixels)."""
    mask = jnp.asarray(mask, jnp.float32)
    if jnp.ndim(mask) != 2:
        raise ValueError(f"mask must be [H, W]; got shape {tuple(jnp.shape(mask))}.")
    return mask / jnp.sum(mask)


def fooling_loss(grad: jax.Array, mask) -> jax.Array:
    """Eq. 5.7 per example: ``L_fool = ‖s - m‖² = Σ_{h,w} (s_hw - m_hw)²``, ``[B]``.

    ``grad``: input-gradients ``[B, H, W, C]`` (thesis: the label's logit-gradient), ``mask``: ``[H, W]`` binary
    (normalized here). The thesis's ``E_x`` is the batch mean the caller takes."""
    s = saliency_distribution(grad)
    m = normalized_mask(_check_mask(mask, s.shape[1:])).astype(s.dtype)
    return jnp.sum(jnp.square(s - m[None]), axis=(1, 2))


def fooling_loss_of_model(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array, mask) -> tuple[jax.Array, jax.Array]:
    """``(L_fool [B], logits [B, K])`` for the label logit-gradient of ``logits_fn`` at ``x`` (eq. 5.7).

    One forward and one backward pass (:func:`gradjax.gradients.logits_and_logit_gradient`, sum trick: use an
    eval-mode or frozen-moments ``logits_fn``); differentiable w.r.t. the parameters ``logits_fn`` closes over.
    The logits are returned so the caller's cross-entropy needs no second forward pass."""
    logits, g = G.logits_and_logit_gradient(logits_fn, x, labels)
    return fooling_loss(g, mask), logits


def energy_fraction(grad: jax.Array, mask) -> jax.Array:
    """Share of the gradient energy inside the mask, ``Σ_{mask} Σ_c|g| / Σ Σ_c|g|`` per example, ``[B]``
    (thesis §5.7.2: 22 % for a uniform map and the 15×15 top-left mask; 83.85 % for fooled logit-gradients)."""
    e = _energy_map(grad)
    m = (_check_mask(mask, e.shape[1:]) > 0).astype(e.dtype)
    return jnp.sum(e * m[None], axis=(1, 2)) / jnp.maximum(jnp.sum(e, axis=(1, 2)), jnp.finfo(e.dtype).tiny)


def shift_logits(logits_fn: LogitsFn, g: Callable[[jax.Array], jax.Array]) -> LogitsFn:
    """``x -> f(x) + g(x)[:, None]``: the same scalar ``g(x) [B]`` added to every logit (thesis §5.2 Observation).

    Softmax is shift-invariant, so probabilities, the cross-entropy (eq. 5.5) and loss-gradients (eq. 5.6) are
    unchanged, while every logit-gradient becomes ``∇f_i + ∇g`` — a logit-gradient can be made anything."""

    def shifted(x):
        logits = logits_fn(x)
        gx = g(x)
        if jnp.shape(gx) != (jnp.shape(logits)[0],):
            raise ValueError(f"g must return one value per example, shape ({jnp.shape(logits)[0]},); "
                             f"got {tuple(jnp.shape(gx))}.")
        return logits + gx[:, None].astype(logits.dtype)

    return shifted
