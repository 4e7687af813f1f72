"""Post-processing of saliency maps: channel reductions, bilinear upsampling and FullGrad's ``psi`` (thesis §3.4.2,
eq. 3.2, and the §3.6 variants). Pure array functions, jittable and differentiable."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gradjax import _validation as V
from gradjax.imaging import bilinear_upsample  # re-exported: the one bilinear resize, shared with gradjax.losses

Array = jax.Array

__all__ = ["REDUCTIONS", "POSTPROCESS", "RESCALE_EPS", "reduce_channels", "bilinear_upsample", "rescale",
           "postprocess_map"]

REDUCTIONS = ("abs_sum", "sum", "abs_max", "sq_sum")
"""Channel reductions of a gradient-type attribution ``[B, H, W, C] -> [B, H, W]`` (or ``None``: no reduction)."""

POSTPROCESS = ("abs_rescale", "abs", "rescale", "none")
"""FullGrad post-processing ``psi`` before the bilinear upsampling (thesis §3.4.2 and §3.6):
``"abs_rescale"`` = ``rescale(abs(.))`` (eq. 3.2, the thesis default), ``"abs"`` (``psi_mnist``, §3.6),
``"rescale"`` (min-max rescale of the signed map), ``"none"`` (``psi_m``, the minimal post-processing of §3.6 /
§3.10.1: bilinear upsampling only, signed)."""

RESCALE_EPS = 1e-6
"""The reference FullGrad code's rescaling epsilon: ``(m - min) / (max - min + 1e-6)`` (idiap/fullgrad-saliency,
``FullGrad._postProcess``). It is absolute (in the units of the map, i.e. of the logit): a layer map whose range is
far below ``1e-6`` (e.g. the bias-gradient of a conv bias that BatchNorm makes redundant and training leaves at
~1e-9) gets a weight ``~range / 1e-6`` instead of being stretched to [0, 1]."""


def reduce_channels(a: Array, reduce: Optional[str] = "abs_sum") -> Array:
    """Reduce the channel axis of an attribution ``[B, H, W, C] -> [B, H, W]``.

    ``"abs_sum"``: ``sum_c |a_c|``; ``"sum"``: ``sum_c a_c`` (signed); ``"abs_max"``: ``max_c |a_c|`` (Simonyan
    et al. 2013); ``"sq_sum"``: ``sum_c a_c^2``; ``None``: ``a`` unchanged (any shape).
    """
    if reduce is None:
        return a
    V.check_choice(reduce, REDUCTIONS + (None,), "reduce")
    if jnp.ndim(a) != 4:
        raise ValueError(f"reduce={reduce!r} needs NHWC images [B, H, W, C]; got an attribution of shape "
                         f"{tuple(jnp.shape(a))}. Use reduce=None for non-image inputs.")
    if reduce == "abs_sum":
        return jnp.sum(jnp.abs(a), axis=-1)
    if reduce == "sum":
        return jnp.sum(a, axis=-1)
    if reduce == "abs_max":
        return jnp.max(jnp.abs(a), axis=-1)
    return jnp.sum(jnp.square(a), axis=-1)


def rescale(a: Array, axes: tuple, eps: float = RESCALE_EPS) -> Array:
    """Min-max rescale over ``axes`` (per example): ``(a - min) / (max - min + eps)``.

    ``eps=1e-6`` (default, :data:`RESCALE_EPS`) is the reference FullGrad code's formula: values lie in
    ``[0, 1)`` and a map with a range ``<< eps`` stays ``<< 1``. ``eps=0`` stretches every non-constant map to
    exactly [0, 1] however small its range (gradjax before 2026-11-23; it gives round-off-sized maps full weight);
    a constant map becomes 0 (no NaN) either way.
    """
    eps = float(eps)
    if not (eps >= 0 and np.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}.")
    lo = jnp.min(a, axis=axes, keepdims=True)
    hi = jnp.max(a, axis=axes, keepdims=True)
    rng = hi - lo
    if eps > 0:
        return (a - lo) / (rng + jnp.asarray(eps, a.dtype))
    return jnp.where(rng > 0, (a - lo) / jnp.where(rng > 0, rng, 1), 0)


_rescale = rescale  # old private name


def postprocess_map(m: Array, size: Sequence[int], *, postprocess: str = "abs_rescale", rescale: str = "layer",
                    align_corners: bool = True, eps: float = RESCALE_EPS) -> Array:
    """FullGrad's ``sum_c psi(m_c)`` for one layer map ``m`` ``[B, h, w, c]`` -> ``[B, H, W]`` (thesis eq. 3.2).

    ``psi = bilinearUpsample o rescale o abs`` for ``postprocess="abs_rescale"`` (thesis §3.4.2); see
    :data:`POSTPROCESS` for the §3.6 variants. ``rescale="layer"`` rescales each example's whole layer map (all
    channels jointly) to [0, 1], as the reference code does; ``"channel"`` rescales every channel separately, the
    literal reading of eq. 3.2's ``sum_c psi(f^b_c)``. The rescaling is ``(m - min) / (max - min + eps)``
    (:func:`rescale`; ``eps=1e-6`` is the reference code's, ``eps=0`` the exact [0, 1] stretch gradjax used before
    2026-11-23). The channel sum is taken before upsampling (upsampling is linear, so the order does not matter).
    """
    V.check_choice(postprocess, POSTPROCESS, "postprocess")
    V.check_choice(rescale, ("layer", "channel"), "rescale")
    if m.ndim != 4:
        raise ValueError(f"a FullGrad layer map must be [B, h, w, c]; got shape {m.shape}.")
    if postprocess in ("abs_rescale", "abs"):
        m = jnp.abs(m)
    if postprocess in ("abs_rescale", "rescale"):
        m = _rescale(m, (1, 2, 3) if rescale == "layer" else (1, 2), eps)
    return bilinear_upsample(jnp.sum(m, axis=-1), size, align_corners=align_corners)
