"""Opt-in CPU implementations of the VGG's convolution and max-pool (issue 27: the convolution backward gap).

On XLA:CPU a small-channel 3x3 convolution's backward passes (``conv_general_dilated``'s transposes) run at a
fraction of a matrix product's rate, and the 2x2 max-pool's backward is a ``select_and_scatter``. These functions
compute the *same values* with other primitives; the models use them only when asked
(``create_model("vgg9", 10, conv_impl="im2col", pool_impl="mask")``), never by default and never by changing the
environment.

* :func:`conv_im2col` — ``z = W * x`` (thesis §2.12.1's 3x3 'SAME' convolutions, stride 1) as one matrix product of
  the im2col patches: ``cols[b, h, w, (i, j, c)] = x_pad[b, h + i, w + j, c]``, ``z = cols @ W.reshape(k*k*C, O)``.
  ``backward="gemm"``: a custom VJP keeps every backward pass a matrix product too: ``dW = cols^T g`` and
  ``dx = im2col(g) @ W'`` with ``W'`` the spatially flipped, in/out-transposed kernel (the transposed convolution
  is a convolution of ``g``); reverse mode only. ``backward="autodiff"``: JAX differentiates the slices and the
  product (every mode and order).
* :func:`max_pool_mask` — 2x2 / stride-2 max-pool as a reshape and a max, with a custom JVP that sends the tangent
  (and, transposed, the cotangent) to the *first* maximum of each window in row-major order — the element XLA's
  ``reduce_window`` / ``select_and_scatter`` pair selects — so gradients are identical, ties included.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

CONV_IMPLS = ("lax", "im2col", "im2col_gemm", "im2col_small")
"""Convolution implementations of :class:`gradjax.models.layers.TappedConv`: ``lax.conv_general_dilated``
(default), :func:`conv_im2col` with ``backward="autodiff"`` (every differentiation mode) or with
``backward="gemm"`` (custom VJP; reverse mode only: no ``jax.jvp``, no forward-over-reverse HVPs), or
``"im2col_small"``: ``"im2col"`` where the image is at most :data:`SMALL_SPATIAL` pixels (H x W), ``lax``
elsewhere (XLA:CPU's convolution is slowest, relative to a matrix product, on the 2x2 / 4x4 maps of a VGG's last
blocks: ``benchmarks/layer_profile.py``)."""

SMALL_SPATIAL = 16
"""``conv_impl="im2col_small"`` uses im2col for feature maps of at most this many pixels (4x4)."""

POOL_IMPLS = ("lax", "mask")
"""Max-pool implementations of :func:`gradjax.models.layers.max_pool`: ``flax.linen.max_pool`` (default) or
:func:`max_pool_mask`."""


def _patches(x: Array, kh: int, kw: int) -> Array:
    """im2col of an already padded NHWC ``x``: ``[B, H - kh + 1, W - kw + 1, kh * kw * C]``, feature index
    ``(i * kw + j) * C + c`` (the row-major flattening of an HWIO kernel's first three axes)."""
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    return jnp.concatenate([x[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)], axis=-1)


def _same_pad(x: Array, kh: int, kw: int) -> Array:
    return jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))


def _matmul(cols: Array, kernel2d: Array, precision) -> Array:
    return lax.dot_general(cols, kernel2d, (((cols.ndim - 1,), (0,)), ((), ())), precision=precision)


def _conv_fwd_impl(x: Array, kernel: Array, padding: str, precision) -> Array:
    kh, kw, c, o = kernel.shape
    xp = _same_pad(x, kh, kw) if padding == "SAME" else x
    return _matmul(_patches(xp, kh, kw), kernel.reshape(kh * kw * c, o), precision)


def conv_im2col(x: Array, kernel: Array, *, padding: str = "SAME", precision: Any = None,
                backward: str = "gemm") -> Array:
    """``lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))`` as an
    im2col matrix product (thesis §2.12.1's convolutions).

    ``x [B, H, W, C]``, ``kernel [kh, kw, C, O]`` (stride 1, no dilation); ``padding`` ``"SAME"`` (zero border,
    lax's split: ``(k - 1) // 2`` before) or ``"VALID"``; ``precision`` as ``lax.dot_general``'s. ``backward``:
    ``"gemm"`` (custom VJP: ``dW = cols^T g``, ``dx = im2col(g_pad) @ flip(W)``, every backward pass one matrix
    product; reverse mode only — ``jax.jvp`` through it raises) or ``"autodiff"`` (JAX differentiates the
    slices and the product: ``dx`` is ``g @ W^T`` scattered back by nine shifted adds; every mode, any order).
    Same values as ``lax.conv_general_dilated`` up to float32 summation order."""
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME' or 'VALID'; got {padding!r}.")
    if backward not in ("gemm", "autodiff"):
        raise ValueError(f"backward must be 'gemm' or 'autodiff'; got {backward!r}.")
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"need x [B, H, W, C] and kernel [kh, kw, C, O]; got {x.shape} and {kernel.shape}.")
    if backward == "autodiff":
        return _conv_fwd_impl(x, kernel, padding, precision)
    return _conv_gemm(padding, precision, x, kernel)


def conv(impl: str, x: Array, kernel: Array, *, padding: str = "SAME", precision: Any = None) -> Array:
    """The stride-1 convolution of :class:`gradjax.models.layers.TappedConv` by implementation name
    (:data:`CONV_IMPLS`); ``ValueError`` for an unknown name."""
    check_impl("conv_impl", impl, CONV_IMPLS)
    if impl == "im2col_small":
        impl = "im2col" if x.shape[1] * x.shape[2] <= SMALL_SPATIAL else "lax"
    if impl == "lax":
        return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=precision)
    return conv_im2col(x, kernel, padding=padding, precision=precision,
                       backward="gemm" if impl == "im2col_gemm" else "autodiff")


def _flip(kernel: Array) -> Array:
    """The kernel of the transposed convolution: spatially flipped, input/output channels swapped."""
    return jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _conv_gemm(padding, precision, x, kernel):
    return _conv_fwd_impl(x, kernel, padding, precision)


def _conv_gemm_fwd(padding, precision, x, kernel):
    kh, kw, c, o = kernel.shape
    xp = _same_pad(x, kh, kw) if padding == "SAME" else x
    cols = _patches(xp, kh, kw)
    return _matmul(cols, kernel.reshape(kh * kw * c, o), precision), (cols, kernel)


def _conv_gemm_bwd(padding, precision, res, g):
    cols, kernel = res
    kh, kw, c, o = kernel.shape
    dw = lax.dot_general(cols, g, (((0, 1, 2), (0, 1, 2)), ((), ())), precision=precision).reshape(kh, kw, c, o)
    # the transposed convolution: a convolution of g, padded by the complement of the forward padding, with the
    # flipped kernel
    if padding == "SAME":
        gp = jnp.pad(g, ((0, 0), (kh // 2, (kh - 1) // 2), (kw // 2, (kw - 1) // 2), (0, 0)))
    else:
        gp = jnp.pad(g, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
    dx = _matmul(_patches(gp, kh, kw), _flip(kernel).reshape(kh * kw * o, c), precision)
    return dx.astype(cols.dtype), dw.astype(kernel.dtype)


_conv_gemm.defvjp(_conv_gemm_fwd, _conv_gemm_bwd)


def max_pool_mask(x: Array) -> Array:
    """2x2 max-pooling with stride 2 ('VALID': an odd last row/column is dropped, as ``flax.linen.max_pool``),
    thesis §2.12.1, as a reshape and a max. Its derivative (custom JVP; reverse mode by transposition) routes each
    window's tangent / cotangent to the first maximal element in row-major window order — the same element as
    XLA's ``reduce_window`` max and its ``select_and_scatter`` backward — so maps and gradients are identical to
    ``flax.linen.max_pool(x, (2, 2), (2, 2))``'s, ties included. ``x [B, H, W, C]`` -> ``[B, H // 2, W // 2, C]``."""
    if x.ndim != 4:
        raise ValueError(f"max_pool_mask needs NHWC [B, H, W, C]; got shape {tuple(x.shape)}.")
    return _max_pool_mask(x)


def _windows(x: Array) -> tuple[Array, Array, Array, Array]:
    b, h, w, c = x.shape
    r = x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
    return r[:, :, 0, :, 0], r[:, :, 0, :, 1], r[:, :, 1, :, 0], r[:, :, 1, :, 1]


@jax.custom_jvp
def _max_pool_mask(x: Array) -> Array:
    a, b, c, d = _windows(x)
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _first_max(m: Array, a: Array, b: Array, c: Array, d: Array, va, vb, vc, vd) -> Array:
    """``v`` of the first of ``a, b, c, d`` (row-major window order) equal to the window maximum ``m``."""
    return jnp.where(a == m, va, jnp.where(b == m, vb, jnp.where(c == m, vc, vd)))


@_max_pool_mask.defjvp
def _max_pool_mask_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    a, b, c, d = _windows(x)
    m = lax.stop_gradient(jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d)))
    # the primal output as the selected element (not jnp.maximum, whose derivative splits ties evenly), so that
    # derivatives of this rule (forward-over-reverse HVPs, higher orders) route ties as XLA's select does too
    out = _first_max(m, a, b, c, d, a, b, c, d)
    return out, _first_max(m, a, b, c, d, *_windows(t))


def check_impl(name: str, value: Optional[str], choices: Sequence[str]) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


__all__ = ["CONV_IMPLS", "POOL_IMPLS", "SMALL_SPATIAL", "conv", "conv_im2col", "max_pool_mask", "check_impl"]
