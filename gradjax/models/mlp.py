"""Small multi-layer perceptron: ``Dense -> activation`` repeated, then a Dense output layer.

Inputs of any shape ``[B, ...]`` are flattened. Useful for tests, toy densities and digits.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from gradjax.models.layers import Activation, TappedDense


class MLP(nn.Module):
    """``__call__(x [B, ...], train=False) -> [B, num_classes]``; hidden layers ``dense{i}``/``act{i}``."""

    hidden: Sequence[int] = (128, 128)
    num_classes: int = 10
    activation: str = "relu"
    beta: float = 10.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if jnp.ndim(x) < 2:  # static shape check only: values are validated at the library boundary
            raise ValueError(f"x must be a batch [B, ...] with rank >= 2; got shape {tuple(jnp.shape(x))}.")
        x = x.reshape((x.shape[0], -1))
        for i, h in enumerate(self.hidden):
            x = TappedDense(h, name=f"dense{i}")(x)
            x = Activation(self.activation, self.beta, name=f"act{i}")(x)
        return TappedDense(self.num_classes, name="head")(x)
