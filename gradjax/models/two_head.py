"""Two-head VGG student for Learning-without-Forgetting-style transfer (thesis §2.5, §2.12.2, Tables 2.3-2.5).

One VGG trunk (``block{i}`` as in :class:`gradjax.models.VGG`, so layer paths such as ``"block1"`` are shared),
global average pooling, then two Dense heads on the same features: ``head_target`` (the new task, trained with
cross-entropy) and ``head_source`` (the teacher's task, matched to the teacher on target images). The forward
pass returns the concatenation ``[B, num_target + num_source]`` — target logits first — so that the model fits
the library's single-output training engine; :func:`split_heads` (or the ``head=`` slices
:func:`target_slice` / :func:`source_slice` of :mod:`gradjax.losses.terms` terms) takes it apart.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gradjax.models.layers import PrecisionLike, TappedDense, global_average_pool
from gradjax.models.vgg import VGG_CONFIGS, Layer, vgg_trunk

__all__ = ["TwoHeadVGG", "split_heads", "target_slice", "source_slice"]


class TwoHeadVGG(nn.Module):
    """``__call__(x [B, H, W, C], train=False) -> [B, num_target + num_source]`` (target logits, then source).

    Attributes: ``layers`` (e.g. ``VGG_CONFIGS["vgg9"]``), ``num_target``, ``num_source``, ``width``,
    ``activation``, ``axis_name``, ``dropout``, ``precision``, ``dtype``, ``emulate`` — as in
    :class:`gradjax.models.VGG`.
    """

    layers: Sequence[Layer]
    num_target: int
    num_source: int
    width: float = 1.0
    activation: str = "relu"
    beta: float = 10.0
    axis_name: Optional[str] = None
    dropout: float = 0.0
    precision: PrecisionLike = "highest"
    dtype: Any = None
    emulate: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"TwoHeadVGG needs NHWC images [B, H, W, C]; got shape {tuple(x.shape)}.")
        if self.num_target < 1 or self.num_source < 1:
            raise ValueError(f"both heads need >= 1 class; got num_target={self.num_target}, "
                             f"num_source={self.num_source}.")
        x = vgg_trunk(x, self.layers, train=train, width=self.width, activation=self.activation, beta=self.beta,
                      axis_name=self.axis_name, dropout=self.dropout, precision=self.precision, dtype=self.dtype,
                      emulate=self.emulate)
        h = global_average_pool(x)
        kw = dict(precision=self.precision, dtype=self.dtype, emulate=self.emulate)
        out = jnp.concatenate([TappedDense(self.num_target, name="head_target", **kw)(h),
                               TappedDense(self.num_source, name="head_source", **kw)(h)], axis=-1)
        return out if self.dtype is None else out.astype(jnp.float32)


def target_slice(num_target: int) -> tuple[int, int]:
    """``(0, num_target)``: the target head's columns of a :class:`TwoHeadVGG` output."""
    return (0, num_target)


def source_slice(num_target: int, num_source: int) -> tuple[int, int]:
    """``(num_target, num_target + num_source)``: the source head's columns."""
    return (num_target, num_target + num_source)


def split_heads(logits: jax.Array, num_target: int) -> tuple[jax.Array, jax.Array]:
    """``(target_logits [B, num_target], source_logits [B, num_source])`` of a :class:`TwoHeadVGG` output."""
    if logits.ndim != 2 or not 0 < num_target < logits.shape[-1]:
        raise ValueError(f"expected two-head logits [B, num_target + num_source] with 0 < num_target < "
                         f"{logits.shape[-1] if logits.ndim == 2 else '?'}; got shape {tuple(logits.shape)}, "
                         f"num_target={num_target}.")
    return logits[:, :num_target], logits[:, num_target:]


def two_head_vgg(name: str, num_target: int, num_source: int, **kwargs) -> TwoHeadVGG:
    """``TwoHeadVGG(VGG_CONFIGS[name], ...)`` by name (``"vgg9"``, ...)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in VGG_CONFIGS:
        raise ValueError(f"unknown VGG {name!r}; choose one of {', '.join(VGG_CONFIGS)}.")
    return TwoHeadVGG(VGG_CONFIGS[key], num_target, num_source, **kwargs)
