"""VGG networks as in thesis §2.12.1 / §4.7.1.

Blocks of ``3x3 conv (stride 1) -> BatchNorm -> activation``; ``"M"`` is 2x2 max-pooling with stride 2; after the
last block a global average pool and a single Dense layer give the logits.

* VGG-9:  ``[64-M-128-M-256-256-M-512-512-M-512-512-M]`` (thesis §2.12.1)
* VGG-4:  ``[64-M-128-M-512-M]`` (thesis §2.12.1)
* VGG-6, VGG-11, VGG-13, VGG-16: the same style, five or fewer pooling stages with 64/128/256/512 channels.

As in the thesis, the number counts the weight layers: convolutions plus the single Dense layer (so the thesis's
VGG-9 is the conv stack that Simonyan & Zisserman's 3-FC-layer VGG-11 uses; our VGG-11/13/16 have 10/12/15
convolutions). The thesis does not list VGG-6/11/13/16 layer by layer; these are our reconstruction.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import flax.linen as nn

from gradjax.models.layers import (Activation, PrecisionLike, TappedBatchNorm, TappedConv, TappedDense,
                                   global_average_pool, max_pool)

Layer = Union[int, str]

VGG_CONFIGS: dict[str, tuple[Layer, ...]] = {
    "vgg4": (64, "M", 128, "M", 512, "M"),
    "vgg6": (64, "M", 128, "M", 256, 256, "M", 512, "M"),
    "vgg9": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg11": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, "M"),
}


class ConvBlock(nn.Module):
    """``conv3x3 -> BatchNorm -> activation``; submodules ``conv``, ``bn``, ``act`` (taps at each). With BatchNorm,
    the conv and BN taps declare the block itself as their layer (``tap_group=""``: ``merge="conv_bn"`` names it
    ``block{i}``). ``precision``, ``dtype``, ``emulate``: the convolution's (:class:`TappedConv`)."""

    features: int
    activation: str = "relu"
    beta: float = 10.0
    use_bn: bool = True
    conv_bias: bool = True
    axis_name: Optional[str] = None
    padding: str = "zero"
    precision: PrecisionLike = "highest"
    dtype: Any = None
    emulate: Optional[str] = None
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        group = "" if self.use_bn else None
        x = TappedConv(self.features, (3, 3), use_bias=self.conv_bias, padding=self.padding,
                       precision=self.precision, dtype=self.dtype, emulate=self.emulate, tap_group=group,
                       conv_impl=self.conv_impl, name="conv")(x)
        if self.use_bn:
            x = TappedBatchNorm(axis_name=self.axis_name, tap_group=group, name="bn")(x, train=train)
        return Activation(self.activation, self.beta, name="act")(x)


def vgg_trunk(x: jax.Array, layers: Sequence[Layer], *, train: bool, width: float = 1.0, activation: str = "relu",
              beta: float = 10.0, use_bn: bool = True, axis_name: Optional[str] = None,
              dropout: float = 0.0, dropout_block: Optional[int] = None,
              dropout_block_rate: float = 0.5, padding: str = "zero", precision: PrecisionLike = "highest",
              dtype: Any = None, emulate: Optional[str] = None, conv_impl: str = "lax",
              pool_impl: str = "lax") -> jax.Array:
    """The VGG feature stack ``[B, H, W, C] -> [B, h, w, c]``: a :class:`ConvBlock` per channel count (named
    ``block{i}``) and 2x2 max-pooling (then ``Dropout(dropout)`` when ``dropout > 0``) per ``"M"``. Called inside a
    compact ``__call__`` (:class:`VGG`, :class:`gradjax.models.two_head.TwoHeadVGG`), so the blocks are submodules of
    that model and their paths (``"block1"``, ...) are the same in every VGG-based model.

    ``dropout_block=i``: ``Dropout(dropout_block_rate)`` on the output of ``block{i}`` only (after its activation)
    — the "dropout on that layer" baseline of thesis Table 4.3 (p = 0.5). Dropout has no parameters, so module
    paths do not change. ``ValueError`` when ``i`` is not a block index. ``padding``: the convolutions' border
    rule (:data:`gradjax.models.layers.PADDINGS`). ``precision``, ``dtype``, ``emulate``: every convolution's
    (:class:`gradjax.models.layers.TappedConv`, :mod:`gradjax.precision`). ``conv_impl`` / ``pool_impl``: the
    convolutions' and max-pools' implementation (:mod:`gradjax.models.cpu_ops`; default ``"lax"``)."""
    n_blocks = sum(1 for layer in layers if layer != "M")
    if dropout_block is not None and not 0 <= dropout_block < n_blocks:
        raise ValueError(f"dropout_block must be a block index in [0, {n_blocks}); got {dropout_block}.")
    if dropout_block is not None and not 0.0 <= dropout_block_rate < 1.0:
        raise ValueError(f"dropout_block_rate must be in [0, 1); got {dropout_block_rate}.")
    i = 0
    for layer in layers:
        if layer == "M":
            x = max_pool(x, impl=pool_impl)
            if dropout:
                x = nn.Dropout(dropout, deterministic=not train)(x)
        else:
            x = ConvBlock(max(1, int(round(layer * width))), activation, beta, use_bn, axis_name=axis_name,
                          padding=padding, precision=precision, dtype=dtype, emulate=emulate,
                          conv_impl=conv_impl, name=f"block{i}")(x, train=train)
            if i == dropout_block and dropout_block_rate > 0:
                x = nn.Dropout(dropout_block_rate, deterministic=not train)(x)
            i += 1
    return x


class VGG(nn.Module):
    """VGG with BatchNorm, global average pooling and one Dense layer.

    Attributes:
      layers: channel counts and ``"M"`` (max-pool), e.g. ``VGG_CONFIGS["vgg9"]``.
      num_classes: size of the output.
      activation: ``"relu"`` or ``"softplus"`` (with sharpness ``beta``; thesis ch. 5 uses 10).
      width: channel multiplier (1.0 = the thesis; smaller for CPU-sized runs).
      axis_name: BatchNorm's cross-device axis under ``pmap``.
      dropout: rate of a ``Dropout`` layer after every max-pool (0 = none; the dropout baseline of thesis Table 2.2
        uses 0.25 — its position is unstated there, after each pooling stage is our choice). Active when
        ``train=True``; the caller passes ``rngs={"dropout": key}`` (``gradjax.losses.make_loss_fn(dropout=True)``).
      dropout_block: index ``i`` of the one block whose output gets ``Dropout(dropout_block_rate)`` (``None`` =
        none; thesis Table 4.3's per-layer dropout baseline); module paths unchanged.
      dropout_block_rate: that dropout's rate (0.5 in Table 4.3).
      padding: the convolutions' border rule, ``"zero"`` (default), ``"reflect"`` or ``"circular"``
        (:data:`gradjax.models.layers.PADDINGS`).
      precision: of every convolution and the Dense layer (default ``"highest"``: exact float32 on GPU/TPU too;
        ``"default"`` = TF32 on GPUs / bfloat16 on TPUs; ``None`` follows ``jax.default_matmul_precision``), see
        :mod:`gradjax.precision`.
      dtype: compute dtype (``None``: float32; ``jnp.bfloat16`` = mixed precision: bfloat16 products, float32
        parameters and BatchNorm, float32 logits).
      emulate: ``"gpu"`` / ``"tpu"``: round the products' inputs as that chip would (CPU tests of reduced precision,
        :func:`gradjax.precision.emulate_rounding`).
      conv_impl: ``"lax"`` (default) or an im2col form of :data:`gradjax.models.cpu_ops.CONV_IMPLS` (CPU speed,
        same values); pool_impl: ``"lax"`` or ``"mask"`` (:func:`gradjax.models.cpu_ops.max_pool_mask`).

    ``__call__(x [B, H, W, C], train=False) -> logits [B, num_classes]``. Blocks are named ``block{i}``, the
    Dense layer ``head``.
    """

    layers: Sequence[Layer]
    num_classes: int
    activation: str = "relu"
    beta: float = 10.0
    width: float = 1.0
    use_bn: bool = True
    axis_name: Optional[str] = None
    dropout: float = 0.0
    dropout_block: Optional[int] = None
    dropout_block_rate: float = 0.5
    padding: str = "zero"
    precision: PrecisionLike = "highest"
    dtype: Any = None
    emulate: Optional[str] = None
    conv_impl: str = "lax"
    pool_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4:  # static shape check only: values are validated at the library boundary (gradjax._validation)
            raise ValueError(f"VGG needs NHWC images [B, H, W, C] (rank 4); got shape {tuple(x.shape)}.")
        x = vgg_trunk(x, self.layers, train=train, width=self.width, activation=self.activation, beta=self.beta,
                      use_bn=self.use_bn, axis_name=self.axis_name, dropout=self.dropout,
                      dropout_block=self.dropout_block, dropout_block_rate=self.dropout_block_rate,
                      padding=self.padding, precision=self.precision, dtype=self.dtype, emulate=self.emulate,
                      conv_impl=self.conv_impl, pool_impl=self.pool_impl)
        logits = TappedDense(self.num_classes, precision=self.precision, dtype=self.dtype, emulate=self.emulate,
                             name="head")(global_average_pool(x))
        return logits if self.dtype is None else logits.astype(jnp.float32)
