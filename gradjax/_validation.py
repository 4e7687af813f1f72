"""Boundary checks shared by the public functions: the one place gradjax validates inputs.

Every public function validates its inputs here *before* tracing into XLA, so that a wrong shape, dtype, a NaN
input or a target out of range raises a ``ValueError`` that says what was wrong instead of failing deep inside a
compiled computation or silently returning NaN. Checks on values (NaN, label range) run only on concrete arrays;
under ``jax.jit`` the arguments are tracers and only the static checks (rank, dtype, shape) apply.

Validation happens **once, at the public boundary**: a user-facing function checks ``x`` with :func:`check_input`
(the only check that copies ``x`` to the host, for NaN/inf) and then calls the low-level primitives
(:func:`gradjax.gradients.logits_and_target_gradient`, :func:`gradjax.fullgrad.tap_gradients`), which only run
static checks. Models do not validate inside ``__call__``.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """True when ``x`` holds values (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def check_rank(x, ranks: int | Sequence[int], name: str, what: str = "") -> None:
    ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if jnp.ndim(x) not in ranks:
        expect = " or ".join(str(r) for r in ranks)
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have rank {expect}{extra}; got shape {tuple(jnp.shape(x))}.")


def check_floating(x, name: str) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array; got dtype {dtype}. Cast it, e.g. x.astype(jnp.float32).")


def check_integer(x, name: str) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array of class indices; got dtype {dtype}.")


def check_finite(x, name: str) -> None:
    """Raise if a concrete array holds NaN or inf (skipped for tracers)."""
    if is_concrete(x):
        arr = np.asarray(x)
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            n_bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise ValueError(f"{name} contains {n_bad} non-finite value(s) (NaN or inf).")


def check_images(x, name: str = "x") -> None:
    """Images are float arrays of shape [B, H, W, C] (NHWC)."""
    check_rank(x, 4, name, "a batch of NHWC images [B, H, W, C]")
    check_floating(x, name)
    check_finite(x, name)


def check_labels(labels, num_classes: int | None, batch_size: int | None = None, name: str = "labels") -> None:
    """Labels are integer class indices of shape [B] with 0 <= label < num_classes."""
    check_rank(labels, 1, name, "one class index per example")
    check_integer(labels, name)
    if batch_size is not None and jnp.shape(labels)[0] != batch_size:
        raise ValueError(f"{name} has {jnp.shape(labels)[0]} entries but the batch has {batch_size} examples.")
    if num_classes is not None and is_concrete(labels):
        arr = np.asarray(labels)
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(
                f"{name} must lie in [0, {num_classes}); got values in [{arr.min()}, {arr.max()}].")


def check_input(x, name: str = "x", *, images: bool = False, min_rank: int = 1, finite: bool = True):
    """The input of a public function: an array (lists are converted) of rank ``>= min_rank`` with a leading batch
    axis (exactly rank 4, ``[B, H, W, C]``, with ``images=True``), floating point and — on concrete values, unless
    ``finite=False`` — free of NaN/inf. Returns ``x`` as an array."""
    if not hasattr(x, "shape"):
        x = jnp.asarray(x)
    if images:
        check_rank(x, 4, name, "a batch of NHWC images [B, H, W, C]")
    elif jnp.ndim(x) < min_rank:
        what = "a leading batch axis, shape [B, ...]" if min_rank <= 1 else f"rank >= {min_rank}, a batch [B, ...]"
        raise ValueError(f"{name} must have {what}; got shape {tuple(jnp.shape(x))}. Add a batch axis, e.g. x[None].")
    check_floating(x, name)
    if finite:
        check_finite(x, name)
    return x


def check_count(n, name: str, minimum: int = 1) -> int:
    """A Python int ``>= minimum`` (a count that fixes array shapes: steps, samples, probes, chunk sizes)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"{name} must be a Python int (it fixes array shapes); got {n!r}.")
    if n < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {n}.")
    return int(n)


def check_choice(value, choices, name: str):
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}.")
    return value


def check_key(key, what: str):
    """A ``jax.random`` key is given (``what`` names the stochastic function)."""
    if key is None:
        raise ValueError(f"{what} is stochastic: pass an explicit key=jax.random.key(seed) (or PRNGKey).")
    return key


def check_batch_match(a, b, name_a: str, name_b: str) -> None:
    if jnp.shape(a)[0] != jnp.shape(b)[0]:
        raise ValueError(f"{name_a} and {name_b} must have the same batch size; got {jnp.shape(a)[0]} and {jnp.shape(b)[0]}.")


PREDICTED = "predicted"
"""Target sentinel: explain / differentiate the arg-max class of each example (re-exported by
:mod:`gradjax.gradients` and :mod:`gradjax.fullgrad`)."""


def normalize_target(target, batch: int, num_classes: int | None = None, name: str = "target"):
    """``PREDICTED`` or an int array ``[batch]`` of class indices: Python ints / lists become arrays (int64 -> int32
    unless x64 is on), a scalar is broadcast to the batch; rank, dtype, batch size and (with ``num_classes``, on
    concrete values) range are checked."""
    if isinstance(target, str):
        if target != PREDICTED:
            raise ValueError(f"{name} must be an int array [B] of class indices or gradjax.gradients.PREDICTED "
                             f"({PREDICTED!r}); got {target!r}.")
        return target
    if target is None:
        raise ValueError(f"{name} must be an int array [B] of class indices or {PREDICTED!r}; got None.")
    if not hasattr(target, "dtype"):
        target = np.asarray(target)
        if target.dtype == np.int64 and not jax.config.jax_enable_x64:
            target = target.astype(np.int32)
    check_integer(target, name)
    if jnp.ndim(target) == 0:
        target = jnp.broadcast_to(target, (batch,))
    check_labels(target, num_classes, batch, name)
    return target


def normalize_classes(target_class, num_classes: int, name: str = "target_class"):
    """Classes for a per-class method: an int (one class), an int array ``[K']``, or ``"all"`` (every class).

    Returns ``(classes [K'] int array, single)`` where ``single`` says the caller asked for one class (so the result
    is returned without the class axis). Dtype and range ``[0, num_classes)`` are checked."""
    single = isinstance(target_class, (int, np.integer)) or (hasattr(target_class, "ndim") and target_class.ndim == 0)
    if isinstance(target_class, str):
        if target_class != "all":
            raise ValueError(f"{name} must be an int, an int array or 'all'; got {target_class!r}.")
        return jnp.arange(num_classes), False
    classes = target_class if hasattr(target_class, "dtype") else np.asarray(target_class)
    if getattr(classes, "dtype", None) == np.int64 and not jax.config.jax_enable_x64:
        classes = np.asarray(classes, np.int32)
    check_integer(classes, name)
    classes = jnp.reshape(classes, (-1,))
    check_labels(classes, num_classes, None, name)
    return classes, single
