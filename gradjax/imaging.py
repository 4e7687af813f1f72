"""Image-array helpers shared by :mod:`gradjax.losses` and :mod:`gradjax.saliency`: bilinear resizing of per-example
maps (used by FullGrad's ``psi``, thesis eq. 3.2, Grad-CAM, and full-gradient matching, eq. 4.3).

A low-level module: it imports only JAX and NumPy, so both packages can use it without importing each other.
Pure array functions, jittable and differentiable.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["bilinear_upsample"]


def _interp_matrix(n_out: int, n_in: int, align_corners: bool) -> np.ndarray:
    """Linear-interpolation matrix ``[n_out, n_in]`` along one axis."""
    if n_in == 1:
        return np.ones((n_out, 1), np.float32)
    if align_corners:
        src = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    else:  # half-pixel centres, clamped at the border
        src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    i0 = np.clip(np.floor(src).astype(int), 0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - w1)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m.astype(np.float32)


def bilinear_upsample(maps: Array, size: Sequence[int], *, align_corners: bool = True) -> Array:
    """Bilinear resize of ``[B, h, w]`` (or ``[B, h, w, c]``) maps to spatial ``size = (H, W)``.

    ``align_corners=True`` (default) matches the reference FullGrad code
    (``F.interpolate(..., mode='bilinear', align_corners=True)``): corners map to corners. ``False`` uses
    half-pixel centres (as :func:`jax.image.resize`). Implemented as two small interpolation matrices, so it is
    linear, exact, jittable and differentiable.
    """
    if jnp.ndim(maps) not in (3, 4):
        raise ValueError(f"maps must be [B, h, w] or [B, h, w, c]; got shape {tuple(jnp.shape(maps))}.")
    H, W = int(size[0]), int(size[1])
    h, w = maps.shape[1], maps.shape[2]
    if (h, w) == (H, W):
        return maps
    mh = jnp.asarray(_interp_matrix(H, h, align_corners), maps.dtype)
    mw = jnp.asarray(_interp_matrix(W, w, align_corners), maps.dtype)
    if maps.ndim == 3:
        return jnp.einsum("Hh,bhw,Ww->bHW", mh, maps, mw)
    return jnp.einsum("Hh,bhwc,Ww->bHWc", mh, maps, mw)
