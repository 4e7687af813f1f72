"""Checkpoints of a :class:`~gradjax.train.TrainState` with orbax, for one process and for many (resume = same run).

:class:`Checkpointer` saves the array fields of a state (:func:`state_to_pytree`: step, params, model state,
optimizer state, RNG, divergence flag) and restores them into a template state. In a multi-process run the
state's leaves are global arrays replicated over every device of every process (:func:`~gradjax.train.replicate`
on the all-device :func:`~gradjax.train.data_mesh`): orbax writes each once, with all processes taking part.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gradjax.train.placement import _spans_processes, data_mesh, replicate
from gradjax.train.steps import TrainState

_STATE_FIELDS = ("step", "params", "model_state", "opt_state", "rng", "diverged")


def state_to_pytree(state: TrainState) -> dict:
    """The array fields of a :class:`TrainState` as a plain dict (what a checkpoint stores)."""
    return {k: getattr(state, k) for k in _STATE_FIELDS}


def _restore_target(leaf: Any, multiprocess: bool):
    """What orbax restores one leaf into: a host array (one process), or a global array with the leaf's own
    global sharding, else replicated over every device of every process (multi-process)."""
    if not multiprocess:
        return np.asarray(jax.device_get(leaf))
    sharding = leaf.sharding if _spans_processes(leaf) else NamedSharding(data_mesh(), P())
    return jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf), sharding=sharding)


class Checkpointer:
    """Orbax ``CheckpointManager`` for TrainStates (async saves; :meth:`wait` before reading from disk).

    Multi-process (:mod:`gradjax.distributed`): every process constructs it with the same ``directory`` (on a
    filesystem all hosts reach, e.g. a GCS bucket or NFS) and calls :meth:`save` / :meth:`restore` together;
    the state's global (replicated) arrays are written once, and restored as global arrays replicated over all
    devices (or with the template's global sharding)."""

    def __init__(self, directory: str, *, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1; got {max_to_keep}.")
        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> Optional[int]:
        """The step of the newest checkpoint in the directory, or ``None`` if there is none."""
        return self.manager.latest_step()

    def save(self, state: TrainState, *, force: bool = True) -> None:
        """Save ``state`` under its step (asynchronously; a step already saved is skipped)."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        tree = state_to_pytree(state)
        if jax.process_count() > 1:  # global arrays: orbax writes each replicated array once, all processes take part
            tree = replicate(tree, data_mesh())
        else:
            tree = jax.device_get(tree)
        self.manager.save(step, args=self._ocp.args.StandardSave(tree), force=force)

    def restore(self, template: TrainState, step: Optional[int] = None) -> TrainState:
        """Restore into the structure (and dtypes) of ``template``; the latest step by default."""
        self.manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        multiprocess = jax.process_count() > 1
        target = jax.tree.map(lambda x: _restore_target(x, multiprocess), state_to_pytree(template))
        restored = self.manager.restore(step, args=self._ocp.args.StandardRestore(target))
        return template.replace(**{k: jax.tree.map(jnp.asarray, restored[k]) for k in _STATE_FIELDS})

    def wait(self) -> None:
        """Block until pending asynchronous saves are written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the checkpoint manager."""
        self.manager.wait_until_finished()
        self.manager.close()
