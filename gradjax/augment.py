"""Data augmentation for the chapter-5 training recipe: random shifts (random crops with padding), no flips.

The thesis authors' training code (idiap/rethinking-saliency, ``train.py``) augments CIFAR with
``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip()``. On digits a horizontal flip changes the class
(or makes a non-digit), so only the crop is kept here: the image is zero-padded by ``padding`` pixels on every side
and a window of the original size is cut at a uniformly random offset, i.e. the content moves by an integer shift
``(s_y, s_x)``, each uniform in ``{-padding, ..., padding}``, and the uncovered border is filled with ``fill``
(0 = MNIST's black background, as torchvision's zero padding).

Pure functions with explicit PRNG keys: :func:`random_shifts` draws the shifts, :func:`shift_images` applies given
shifts (deterministic), :func:`random_crop` is the two together, and :func:`augmented_loss_fn` wraps a training
``loss_fn(params, model_state, batch, ctx)`` so that the batch's images are cropped on device with a key folded from
the step's ``ctx.rng`` (a fresh crop every step, reproducible from the run's seed and step).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

AUGMENT_SALT = 0xA06
"""Folded into the step key ``ctx.rng`` by :func:`augmented_loss_fn` (keeps the crops independent of the keys the
loss terms fold from the same ``ctx.rng``)."""


def random_shifts(key: Array, n: int, *, max_shift: int) -> Array:
    """``[n, 2]`` int32 shifts ``(s_y, s_x)``, each uniform in ``{-max_shift, ..., max_shift}`` (independent)."""
    if int(max_shift) < 0:
        raise ValueError(f"max_shift must be >= 0; got {max_shift}.")
    if int(n) < 0:
        raise ValueError(f"n must be >= 0; got {n}.")
    return jax.random.randint(key, (int(n), 2), -int(max_shift), int(max_shift) + 1, dtype=jnp.int32)


def shift_images(images: Array, shifts: Array, *, max_shift: int, fill: float = 0.0) -> Array:
    """Move each image's content: ``out[b, i, j] = images[b, i + s_y, j + s_x]`` where that pixel exists, else
    ``fill`` (``shifts[b] = (s_y, s_x)``, ``|s| <= max_shift``; images ``[B, H, W, C]``).

    Equals cutting an ``H x W`` window at offset ``(p + s_y, p + s_x)`` out of the image zero-padded (with ``fill``)
    by ``p = max_shift`` on every side — torchvision's ``RandomCrop(H, padding=p)`` for that offset."""
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C]; got shape {tuple(images.shape)}.")
    shifts = jnp.asarray(shifts)
    if shifts.shape != (images.shape[0], 2):
        raise ValueError(f"shifts must be [B, 2] = [{images.shape[0]}, 2]; got {tuple(shifts.shape)}.")
    p = int(max_shift)
    if p < 0:
        raise ValueError(f"max_shift must be >= 0; got {max_shift}.")
    if p == 0:
        return images
    _, H, W, C = images.shape
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=jnp.asarray(fill, images.dtype))
    offsets = jnp.clip(shifts.astype(jnp.int32) + p, 0, 2 * p)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (H, W, C))

    return jax.vmap(crop)(padded, offsets)


def random_crop(key: Array, images: Array, *, padding: int, fill: float = 0.0) -> Array:
    """``RandomCrop(H, padding=padding)`` without a flip: :func:`shift_images` with :func:`random_shifts`
    (one independent shift per image)."""
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C]; got shape {tuple(images.shape)}.")
    shifts = random_shifts(key, images.shape[0], max_shift=padding)
    return shift_images(images, shifts, max_shift=padding, fill=fill)


def augmented_loss_fn(loss_fn: Callable, *, padding: int, fill: float = 0.0) -> Callable:
    """``loss_fn`` (``(params, model_state, batch, ctx) -> (loss, aux)``, :mod:`gradjax.train`) on randomly
    cropped images: ``batch["image"]`` is replaced by :func:`random_crop` with key
    ``fold_in(ctx.rng, AUGMENT_SALT)`` before ``loss_fn`` sees it (so every pass of the step, the clean one and
    the regularizer's, sees the same cropped batch). ``padding=0`` returns ``loss_fn`` itself."""
    if int(padding) < 0:
        raise ValueError(f"padding must be >= 0; got {padding}.")
    if int(padding) == 0:
        return loss_fn

    def wrapped(params, model_state, batch, ctx):
        if "image" not in batch:
            raise ValueError(f"the batch needs an 'image' entry; got keys {sorted(batch)}.")
        key = jax.random.fold_in(ctx.rng, AUGMENT_SALT)
        batch = {**batch, "image": random_crop(key, batch["image"], padding=padding, fill=fill)}
        return loss_fn(params, model_state, batch, ctx)

    if hasattr(loss_fn, "terms"):
        wrapped.terms = loss_fn.terms
    return wrapped
