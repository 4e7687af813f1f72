"""The training loop shared by every objective (:func:`fit`) and its JSON-lines metrics (:class:`MetricsLogger`).

:func:`fit` runs any step of :mod:`gradjax.train.steps` over deterministic epochs of batches, resumes from the
latest checkpoint (:class:`~gradjax.train.Checkpointer`), checks the divergence guard's flag at every log
interval, logs mean metrics and evaluations, and shows a tqdm progress bar (process 0 only).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gradjax.train.checkpoint import Checkpointer
from gradjax.train.placement import unreplicate
from gradjax.train.steps import TrainingDivergedError, TrainState

PyTree = Any
Batch = Mapping[str, Any]


def _place_like(restored: PyTree, template: PyTree) -> PyTree:
    """Put every restored leaf where the template's leaf lives (its sharding; stacked to the template's leading
    device axis for a ``pmap`` state), so a resumed run calls the already compiled step with the same input
    placement (no recompile)."""

    def put(r, t):
        if not isinstance(t, jax.Array):
            return r
        if jnp.ndim(t) == jnp.ndim(r) + 1:  # pmap layout: one copy per device
            r = jnp.broadcast_to(jnp.asarray(r), t.shape)
        return jax.device_put(r, t.sharding)

    return jax.tree.map(put, restored, template)


class MetricsLogger:
    """Append JSON lines ``{"step":..., ...}`` to ``path`` (or keep them in memory only if ``path`` is None).

    In a multi-process run only process 0 writes the file (every process keeps the same records in memory)."""

    def __init__(self, path: Optional[str]):
        self.path = path if jax.process_index() == 0 else None
        self.records: list[dict] = []
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, record: dict) -> None:
        """Keep ``record`` (array values converted to floats) and append it to the file as one JSON line."""
        record = {k: (float(v) if isinstance(v, (np.floating, np.integer, jax.Array, np.ndarray)) else v)
                  for k, v in record.items()}
        self.records.append(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def fit(state: TrainState, train_step: Callable, epoch_batches: Callable[[int, int], Iterator[Batch]], *,
        num_epochs: int, steps_per_epoch: int, checkpoint_dir: Optional[str] = None,
        checkpoint_every: Optional[int] = None, log_path: Optional[str] = None, log_every: int = 20,
        eval_fn: Optional[Callable[[TrainState], dict]] = None, max_steps: Optional[int] = None,
        progress: bool = True, to_device: Callable[[Batch], Batch] = lambda b: b,
        frozen: PyTree = None) -> tuple[TrainState, list[dict]]:
    """The training loop shared by every objective.

    ``epoch_batches(epoch, start)`` yields the batches of ``epoch`` from batch ``start`` on (a deterministic
    order, e.g. :func:`gradjax.data.batches`); ``train_step`` is any step of :mod:`gradjax.train` (for ``pmap``
    pass ``to_device=lambda b: shard(b, mesh, device_axis=True)`` and ``replicate(state, mesh, device_axis=True)``).
    With ``checkpoint_dir`` the run resumes from the latest checkpoint there and saves every ``checkpoint_every``
    steps (default: each epoch) and at the end, so an interrupted run continues to the same result.
    ``max_steps`` stops early (used to simulate interruption). Metrics (train every ``log_every`` steps,
    ``eval_fn(state)`` each epoch) go to JSON lines at ``log_path``.
    ``frozen`` (e.g. a teacher's variables) is passed to every step as ``train_step(state, batch, frozen)``
    (un-replicated, also under ``pmap``; see :func:`~gradjax.train.validate_frozen`).
    Raises :class:`TrainingDivergedError` if a step was non-finite, after saving the last good state.

    Multi-process (:mod:`gradjax.distributed`): every process calls ``fit`` with the same arguments, a
    :func:`~gradjax.train.sharded_train_step` on the all-device :func:`~gradjax.train.data_mesh`, a state placed
    with :func:`~gradjax.train.replicate` and ``epoch_batches`` from :func:`gradjax.distributed.global_batches`
    (each process reads its rows); checkpoints are written by all processes together, metrics (``log_path``) and
    the progress bar by process 0 only.
    """
    from tqdm.auto import tqdm

    if num_epochs < 0 or steps_per_epoch < 1 or log_every < 1 or (checkpoint_every or 1) < 1:
        raise ValueError(f"fit needs num_epochs >= 0 and steps_per_epoch, log_every, checkpoint_every >= 1; got "
                         f"{num_epochs}, {steps_per_epoch}, {log_every}, {checkpoint_every}.")

    is_pmapped = jnp.ndim(state.step) == 1
    host = (lambda s: unreplicate(s)) if is_pmapped else (lambda s: s)
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir else None
    if ckpt is not None and ckpt.latest_step() is not None:
        state = _place_like(ckpt.restore(host(state)), state)
    logger = MetricsLogger(log_path)
    total = num_epochs * steps_per_epoch if max_steps is None else min(max_steps, num_epochs * steps_per_epoch)
    step0 = int(jax.device_get(host(state).step))
    checkpoint_every = checkpoint_every or steps_per_epoch
    pbar = tqdm(total=total, initial=min(step0, total), disable=not progress or jax.process_index() != 0, desc="train",
                dynamic_ncols=True)
    pending: list[dict] = []
    t0 = time.time()

    def check_and_log(step_now: int, epoch: int):
        nonlocal pending
        if not pending:
            return
        metrics = jax.device_get(pending)
        pending = []
        if is_pmapped:
            metrics = [unreplicate(m) for m in metrics]
        bad = [i for i, m in enumerate(metrics) if not bool(m["finite"])]
        if bad:
            good = host(state)
            if ckpt is not None:
                ckpt.save(good)
                ckpt.close()
            pbar.close()
            where = f"; the last good state (step {int(good.step)}) is saved in {ckpt.directory}" if ckpt else ""
            raise TrainingDivergedError(
                f"training diverged: non-finite loss or gradient within the {len(metrics)} steps before step "
                f"{step_now} (loss={float(metrics[bad[0]]['loss'])}); updates stopped at step {int(good.step)}{where}. "
                "Lower the learning rate, check the inputs for NaN, or increase the estimator's noise scale.")
        mean = {k: float(np.mean([float(m[k]) for m in metrics])) for k in metrics[0] if k != "finite"}
        logger.log({"step": step_now, "epoch": epoch, **mean, "elapsed_s": time.time() - t0})
        pbar.set_postfix({k: f"{v:.4g}" for k, v in mean.items() if k in ("loss", "accuracy")})

    step = step0
    try:
        while step < total:
            epoch, start = divmod(step, steps_per_epoch)
            for batch in epoch_batches(epoch, start):
                state, metrics = (train_step(state, to_device(batch)) if frozen is None
                                  else train_step(state, to_device(batch), frozen))
                pending.append(metrics)
                step += 1
                pbar.update(1)
                if step % log_every == 0:
                    check_and_log(step, epoch)
                if ckpt is not None and step % checkpoint_every == 0:
                    check_and_log(step, epoch)
                    ckpt.save(host(state))
                if step % steps_per_epoch == 0 or step >= total:
                    check_and_log(step, epoch)
                    if eval_fn is not None and step % steps_per_epoch == 0:
                        evaluation = eval_fn(host(state))
                        logger.log({"step": step, "epoch": epoch, **{f"eval_{k}": v for k, v in evaluation.items()}})
                if step >= total:
                    break
        check_and_log(step, step // steps_per_epoch)
        if ckpt is not None:
            ckpt.save(host(state))
            ckpt.close()
    finally:
        pbar.close()
    return state, logger.records
