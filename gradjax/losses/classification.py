"""Cross-entropy with ground-truth labels — the "CE" term of every objective in the thesis — written once.

``cross_entropy`` is the per-example loss (optax style, ``[B]``, no hidden batch reduction);
``classification_loss`` wraps it into a training ``loss_fn(params, model_state, batch, ctx) -> (loss, aux)`` for
:mod:`gradjax.train` (the plain cross-entropy baseline). The Term factory
:func:`gradjax.losses.terms.cross_entropy_term` calls :func:`cross_entropy` too.

This module imports neither :mod:`gradjax.train` nor the rest of :mod:`gradjax.losses`, so both can import it.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from gradjax.model import apply_train


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy ``l(y, S(x)) = -sum_i y^i log S^i(x)`` ``[B]`` (thesis §2.12.2, "CE";
    the cross-entropy of Prop. 2's appendix form, eq. 2.10, and the ``l(f(x), i)`` of §5.2, eq. 5.4).

    ``y`` is the one-hot target of the integer ``labels`` ``[B]``, smoothed with ``optax.smooth_labels``
    (``y <- (1 - a) y + a / K``) when ``label_smoothing = a > 0``. ``logits``: ``[B, K]``.
    Raises ``ValueError`` on mismatched shapes or a smoothing outside ``[0, 1)``.
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy expects logits [B, K] and integer labels [B]; got logits "
                         f"{tuple(logits.shape)} and labels {tuple(labels.shape)}.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"cross_entropy expects integer class labels; got dtype {labels.dtype}.")
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1); got {label_smoothing}.")
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def classification_loss(apply_fn: Callable, *, weight_decay: float = 0.0,
                        label_smoothing: float = 0.0) -> Callable[..., tuple[jax.Array, dict]]:
    """The cross-entropy training objective ``mean_b CE(f(x_b), y_b) + weight_decay/2 * ||params||^2`` (thesis
    §2.12.2, "Cross-Entropy (CE) training") on ``batch["image"]``, ``batch["label"]``, with a train-mode pass
    (:func:`~gradjax.model.apply_train`, BatchNorm updates its running statistics).

    Returns ``loss_fn(params, model_state, batch, ctx) -> (loss, {"model_state", "metrics"})`` (the contract of
    :mod:`gradjax.train`); metrics: ``cross_entropy`` (the batch mean, without weight decay) and ``accuracy``.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay}.")

    def loss_fn(params: Any, model_state: Any, batch, ctx) -> tuple[jax.Array, dict]:
        del ctx
        logits, new_state, _ = apply_train(apply_fn, params, model_state, batch["image"])
        ce = jnp.mean(cross_entropy(logits, batch["label"], label_smoothing=label_smoothing))
        loss = ce
        if weight_decay:
            loss = loss + 0.5 * weight_decay * sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"model_state": new_state, "metrics": {"cross_entropy": ce, "accuracy": acc}}

    return loss_fn
