"""Flax Linen models of the thesis, with bias taps for full-gradients (see :mod:`gradjax.models.layers`).

``create_model(name, num_classes, ...)`` builds any of them by name:
``vgg4 | vgg6 | vgg9 | vgg11 | vgg13 | vgg16 | resnet18 | mlp``.
All take ``x [B, H, W, C]`` (the MLP any ``[B, ...]``) and ``train: bool`` and return logits ``[B, num_classes]``.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn

from gradjax.models.layers import (TAP, TAP_INFO, TAP_KINDS, Activation, TapInfo, TappedBatchNorm, TappedConv,
                                   TappedDense, bias_tap, softplus_beta)
from gradjax.precision import lax_precision as _lax_precision
from gradjax.models.mlp import MLP
from gradjax.models.resnet import BasicBlock, ResNet
from gradjax.models.vgg import VGG, VGG_CONFIGS, ConvBlock

MODEL_NAMES = tuple(VGG_CONFIGS) + ("resnet18", "mlp")


def create_model(name: str, num_classes: int, *, activation: str = "relu", beta: float = 10.0,
                 width: float = 1.0, axis_name: Optional[str] = None, hidden: tuple[int, ...] = (128, 128),
                 dropout: float = 0.0, padding: str = "zero", precision: Any = "highest", dtype: Any = None,
                 emulate: Optional[str] = None, conv_impl: str = "lax", pool_impl: str = "lax") -> nn.Module:
    """Build a model by name. ``width`` scales every channel count (1.0 = thesis); ``axis_name`` is
    BatchNorm's cross-device axis for ``pmap`` training; ``dropout`` (VGG only) the rate of a dropout layer after
    every max-pool (Table 2.2's baseline: 0.25); ``padding`` (VGG only) the convolutions' border rule, ``"zero"``,
    ``"reflect"`` or ``"circular"``.

    Precision (:mod:`gradjax.precision`): ``precision`` of every convolution / Dense product (default
    ``"highest"``: exact float32 on GPUs and TPUs too; ``"default"``: TF32 / bfloat16 speed; ``None``: follow
    ``jax.default_matmul_precision``); ``dtype`` the compute dtype (``jnp.bfloat16``: mixed precision, float32
    parameters, BatchNorm and logits); ``emulate`` ``"gpu"``/``"tpu"`` rounds the products' inputs as that chip
    would (reduced-precision tests on the CPU).

    CPU speed (VGG only; :mod:`gradjax.models.cpu_ops`, same values and gradients): ``conv_impl`` ``"lax"``
    (default), ``"im2col"`` or ``"im2col_gemm"`` (3x3 convolutions as im2col matrix products; the latter with a
    matrix-product custom VJP, reverse mode only), ``"im2col_small"`` (im2col on maps of <= 4x4 pixels only);
    ``pool_impl`` ``"lax"`` (default) or ``"mask"`` (max-pool
    whose derivative needs no ``select_and_scatter``, ties routed as XLA's)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout}.")
    if activation not in ("relu", "softplus"):
        raise ValueError(f"activation must be 'relu' or 'softplus'; got {activation!r}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}.")
    _lax_precision(precision)  # ValueError on an unknown name
    if emulate is not None and emulate not in ("gpu", "tpu"):
        raise ValueError(f"emulate must be None, 'gpu' or 'tpu'; got {emulate!r}.")
    if dtype is not None:
        import jax.numpy as jnp
        if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
            raise ValueError(f"dtype must be a floating dtype (e.g. jnp.bfloat16) or None; got {dtype!r}.")
    prec = dict(precision=precision, dtype=dtype, emulate=emulate)
    from gradjax.models import cpu_ops
    cpu_ops.check_impl("conv_impl", conv_impl, cpu_ops.CONV_IMPLS)
    cpu_ops.check_impl("pool_impl", pool_impl, cpu_ops.POOL_IMPLS)
    key = name.lower().replace("-", "").replace("_", "")
    if key in VGG_CONFIGS:
        return VGG(VGG_CONFIGS[key], num_classes, activation, beta, width, axis_name=axis_name, dropout=dropout,
                   padding=padding, conv_impl=conv_impl, pool_impl=pool_impl, **prec)
    if (conv_impl, pool_impl) != ("lax", "lax"):
        raise ValueError(f"conv_impl / pool_impl are VGG options; {name!r} has only 'lax'.")
    if padding != "zero":
        raise ValueError(f"padding is a VGG option; {name!r} has only zero padding.")
    if dropout:
        raise ValueError(f"dropout is a VGG option; {name!r} has none.")
    if key == "resnet18":
        return ResNet(num_classes, (2, 2, 2, 2), activation, beta, width, axis_name=axis_name, **prec)
    if key == "mlp":
        return MLP(tuple(int(max(1, round(h * width))) for h in hidden), num_classes, activation, beta, **prec)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}.")


__all__ = ["TAP", "TAP_INFO", "TAP_KINDS", "TapInfo", "Activation", "TappedBatchNorm", "TappedConv", "TappedDense", "bias_tap", "softplus_beta",
           "MLP", "BasicBlock", "ResNet", "VGG", "VGG_CONFIGS", "ConvBlock", "MODEL_NAMES", "create_model"]
