"""CIFAR ResNet-18 (He et al. 2016; the network of thesis ch. 5, §5.5).

3x3 stem (64 channels, stride 1, no max-pool, as for 32x32 CIFAR images), four stages of two basic blocks
with 64/128/256/512 channels (stride 2 at stages 2-4, with a 1x1 conv + BN projection shortcut), global average
pooling and one Dense layer. Convolutions carry no bias (BatchNorm's implicit bias takes that role), as in the
standard implementation. Activation ``relu`` or ``softplus`` (thesis ch. 5: softplus with beta = 10).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from gradjax.models.layers import (Activation, PrecisionLike, TappedBatchNorm, TappedConv, TappedDense,
                                   global_average_pool)


class BasicBlock(nn.Module):
    """``act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x))``. Each conv and its BatchNorm declare one tap group
    (``conv_bn1``, ``conv_bn2``, ``shortcut_conv_bn``) for ``merge="conv_bn"``."""

    features: int
    strides: int = 1
    activation: str = "relu"
    beta: float = 10.0
    axis_name: Optional[str] = None
    precision: PrecisionLike = "highest"
    dtype: Any = None
    emulate: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        s = (self.strides, self.strides)
        kw = dict(use_bias=False, precision=self.precision, dtype=self.dtype, emulate=self.emulate)
        y = TappedConv(self.features, (3, 3), s, tap_group="conv_bn1", name="conv1", **kw)(x)
        y = TappedBatchNorm(axis_name=self.axis_name, tap_group="conv_bn1", name="bn1")(y, train=train)
        y = Activation(self.activation, self.beta, name="act1")(y)
        y = TappedConv(self.features, (3, 3), tap_group="conv_bn2", name="conv2", **kw)(y)
        y = TappedBatchNorm(axis_name=self.axis_name, tap_group="conv_bn2", name="bn2")(y, train=train)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = TappedConv(self.features, (1, 1), s, tap_group="shortcut_conv_bn", name="shortcut_conv", **kw)(x)
            x = TappedBatchNorm(axis_name=self.axis_name, tap_group="shortcut_conv_bn",
                                name="shortcut_bn")(x, train=train)
        return Activation(self.activation, self.beta, name="act2")(y + x)


class ResNet(nn.Module):
    """CIFAR-style ResNet; ``stage_sizes=(2, 2, 2, 2)`` is ResNet-18.

    ``__call__(x [B, H, W, C], train=False) -> logits [B, num_classes]``. ``precision``, ``dtype``, ``emulate``:
    as :class:`gradjax.models.VGG` (default exact float32; :mod:`gradjax.precision`).
    """

    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    activation: str = "relu"
    beta: float = 10.0
    width: float = 1.0
    axis_name: Optional[str] = None
    precision: PrecisionLike = "highest"
    dtype: Any = None
    emulate: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4:  # static shape check only: values are validated at the library boundary (gradjax._validation)
            raise ValueError(f"ResNet needs NHWC images [B, H, W, C] (rank 4); got shape {tuple(x.shape)}.")
        c0 = max(1, int(round(64 * self.width)))
        kw = dict(precision=self.precision, dtype=self.dtype, emulate=self.emulate)
        x = TappedConv(c0, (3, 3), use_bias=False, tap_group="stem_conv_bn", name="stem_conv", **kw)(x)
        x = TappedBatchNorm(axis_name=self.axis_name, tap_group="stem_conv_bn", name="stem_bn")(x, train=train)
        x = Activation(self.activation, self.beta, name="stem_act")(x)
        for stage, n_blocks in enumerate(self.stage_sizes):
            for j in range(n_blocks):
                x = BasicBlock(c0 * 2 ** stage, 2 if (stage > 0 and j == 0) else 1, self.activation, self.beta,
                               self.axis_name, name=f"stage{stage}_block{j}", **kw)(x, train=train)
        x = global_average_pool(x)
        logits = TappedDense(self.num_classes, name="head", **kw)(x)
        return logits if self.dtype is None else logits.astype(jnp.float32)
