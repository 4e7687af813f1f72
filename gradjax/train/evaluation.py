"""Evaluation: accuracy and mean cross-entropy of a train state over batches — one function for one process and
for many.

:func:`make_eval_step` builds the jitted step once (the caller keeps it and passes it to every
:func:`evaluate`, so repeated evaluations do not compile again; there is no hidden cache). The step returns *sums*
over the batch, weighted by an optional ``batch["mask"]`` (1 = real example, 0 = padding), so uneven or padded last
batches average correctly. The same step runs on host batches (one device) and on global arrays split over a mesh
(:func:`gradjax.distributed.global_batches` with ``drop_remainder=False`` pads the last batch and adds the mask):
``jax.jit`` follows the inputs' shardings and the sums are reduced across devices and processes by XLA, so every
process gets the same global result.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradjax.train.batch_spec import ArraySpec, image_batch_spec, validate_batch
from gradjax.train.placement import _spans_processes
from gradjax.train.steps import TrainState

Batch = Mapping[str, Any]

EVAL_SPEC = {**image_batch_spec(), "mask": ArraySpec(rank=1, kind="float", optional=True)}
"""The batches :func:`evaluate` takes: ``image`` [B, H, W, C], ``label`` [B] and an optional float ``mask`` [B]."""


def make_eval_step(apply_fn: Callable) -> Callable[[TrainState, Batch], dict]:
    """Jitted eval-mode step ``(state, batch) -> {"correct", "cross_entropy_sum", "count"}``: sums over the batch
    of ``argmax f(x) == y``, the cross-entropy ``-log softmax(f(x))_y`` and the example count, each weighted by
    ``batch["mask"]`` when present. Build it once per model and pass it to :func:`evaluate`."""

    @jax.jit
    def eval_step(state: TrainState, batch: Batch) -> dict:
        logits = apply_fn(state.variables, batch["image"], train=False)
        labels = batch["label"]
        w = batch["mask"].astype(logits.dtype) if "mask" in batch else jnp.ones(labels.shape, logits.dtype)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {"correct": jnp.sum(w * (jnp.argmax(logits, -1) == labels)), "cross_entropy_sum": jnp.sum(w * ce),
                "count": jnp.sum(w)}

    return eval_step


def _host_copy(state: TrainState) -> TrainState:
    """A state whose global (multi-process, replicated) leaves are replaced by this process's copy."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if _spans_processes(x) else x, state)


def evaluate(state: TrainState, batches: Iterable[Batch], eval_step: Optional[Callable] = None) -> dict:
    """Accuracy and mean cross-entropy of ``state`` over ``batches``: ``{"accuracy", "cross_entropy", "count"}``.

    ``batches``: host batches (e.g. :func:`gradjax.data.batches` with ``drop_remainder=False``), or global
    batches split over a mesh (:func:`gradjax.distributed.global_batches` with ``shuffle=False,
    drop_remainder=False``: each process reads its rows, padding is masked). ``eval_step``: from
    :func:`make_eval_step` (built once by the caller; without it a new step is compiled on every call). With host
    batches and a state replicated over several processes, every process evaluates all batches with its own copy.
    Raises ``ValueError`` on a malformed batch or when there are no examples.
    """
    eval_step = eval_step or make_eval_step(state.apply_fn)
    local_state = None
    tot = {"correct": 0.0, "cross_entropy_sum": 0.0, "count": 0.0}
    for batch in batches:
        validate_batch(batch, EVAL_SPEC)
        if any(_spans_processes(x) for x in jax.tree.leaves(batch)):
            out = eval_step(state, batch)
        else:
            if local_state is None:
                local_state = _host_copy(state)
            out = eval_step(local_state, batch)
        for k, v in jax.device_get(out).items():
            tot[k] += float(v)
    if tot["count"] == 0:
        raise ValueError("evaluate() got no examples.")
    return {"accuracy": tot["correct"] / tot["count"], "cross_entropy": tot["cross_entropy_sum"] / tot["count"],
            "count": int(round(tot["count"]))}
