"""Small multi-layer perceptron: ``Dense -> activation`` repeated, then a Dense output layer.

Inputs of any shape ``[B, ...]`` are flattened. Useful for tests, toy densities and digits.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from gradjax.models.layers import Activation, PrecisionLike, TappedDense


class MLP(nn.Module):
    """``__call__(x [B, ...], train=False) -> [B, num_classes]``; hidden layers ``dense{i}``/``act{i}``.
    ``precision``, ``dtype``, ``emulate``: as :class:`gradjax.models.VGG` (:mod:`gradjax.precision`)."""

    hidden: Sequence[int] = (128, 128)
    num_classes: int = 10
    activation: str = "relu"
    beta: float = 10.0
    precision: PrecisionLike = "highest"
    dtype: Any = None
    emulate: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if jnp.ndim(x) < 2:  # static shape check only: values are validated at the library boundary
            raise ValueError(f"x must be a batch [B, ...] with rank >= 2; got shape {tuple(jnp.shape(x))}.")
        x = x.reshape((x.shape[0], -1))
        kw = dict(precision=self.precision, dtype=self.dtype, emulate=self.emulate)
        for i, h in enumerate(self.hidden):
            x = TappedDense(h, name=f"dense{i}", **kw)(x)
            x = Activation(self.activation, self.beta, name=f"act{i}")(x)
        logits = TappedDense(self.num_classes, name="head", **kw)(x)
        return logits if self.dtype is None else logits.astype(jnp.float32)
