"""Device placement: one mesh builder, one replicate, one shard — the same code for one process and for many.

* :func:`data_mesh` — the 1-D ``"data"`` mesh over every device of every process (``jax.devices()``, ordered by
  process, so each process's rows of a global batch are contiguous) or over the given devices;
* :func:`replicate` — one copy of a pytree (a train state, a teacher's variables for ``frozen``) on every device
  of a mesh (``NamedSharding(mesh, P())``); with ``device_axis=True`` the ``pmap`` layout instead (a leading
  axis with one copy per device);
* :func:`shard` — split every ``[B, ...]`` entry of a batch over a mesh along its leading axis
  (``jax.make_array_from_process_local_data``: a process passes *its* rows, one process the whole batch); with
  ``device_axis=True`` the ``pmap`` layout ``[devices, B / devices, ...]``;
* :func:`unreplicate` — the first copy of a ``pmap``-replicated pytree.

In a multi-process run (:mod:`gradjax.distributed`) every process calls these with the same mesh (and, for
:func:`replicate`, the same values); leaves that already are global arrays spanning other processes' devices are
kept (or resharded) rather than copied from the host.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any


def data_mesh(devices: Optional[Sequence] = None, axis: str = "data") -> Mesh:
    """A 1-D device mesh named ``axis`` for data parallelism, over ``devices`` (default: ``jax.devices()``, every
    device of every process, ordered by process)."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    if devices.size == 0:
        raise ValueError("data_mesh needs at least one device.")
    return Mesh(devices.reshape(-1), (axis,))


def _spans_processes(x) -> bool:
    """A global array with devices of other processes (only parts of it are readable here)."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def _put(x, sharding: NamedSharding):
    """Place one leaf with ``sharding``; host values (the same in every process) are copied, global arrays kept or
    resharded."""
    if _spans_processes(x):
        return x if x.sharding.is_equivalent_to(sharding, x.ndim) else jax.device_put(x, sharding)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # every process builds the global array from its own (identical) copy
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _only_axis(mesh: Mesh) -> str:
    if len(mesh.axis_names) != 1:
        raise ValueError(f"device_axis=True needs a 1-D mesh (data_mesh); got axes {mesh.axis_names}.")
    return mesh.axis_names[0]


def replicate(tree: PyTree, mesh: Optional[Mesh] = None, *, device_axis: bool = False,
              check_equal: bool = False) -> PyTree:
    """One copy of ``tree`` on every device of ``mesh`` (default :func:`data_mesh`).

    Default: every leaf placed with ``NamedSharding(mesh, P())`` — the state and ``frozen`` inputs of
    :func:`~gradjax.train.sharded_train_step`, in one process or in many. ``device_axis=True``: the ``pmap``
    layout, every leaf stacked to ``[devices, ...]`` (one copy per device, split over the 1-D mesh) — the state of
    :func:`~gradjax.train.pmap_train_step` (``mesh = data_mesh(devices)`` with the step's devices).

    Multi-process: every process must pass the same values (built from the same seed, or restored from the same
    checkpoint); ``check_equal=True`` verifies that across processes (one collective) and raises
    ``AssertionError`` naming the mismatch otherwise.
    """
    mesh = data_mesh() if mesh is None else mesh
    if check_equal and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        local = jax.tree.map(lambda x: x.addressable_data(0) if _spans_processes(x) else x, tree)
        multihost_utils.assert_equal(jax.tree.map(np.asarray, jax.device_get(local)),
                                     "gradjax.train.replicate: processes hold different values")
    if not device_axis:
        return jax.tree.map(lambda x: _put(x, NamedSharding(mesh, P())), tree)
    axis = _only_axis(mesh)
    n = mesh.shape[axis]
    sharding = NamedSharding(mesh, P(axis))

    def stack(x):
        if _spans_processes(x) or not sharding.is_fully_addressable:
            x = np.asarray(x.addressable_data(0) if _spans_processes(x) else x)
            return _put(np.broadcast_to(x, (n,) + x.shape), sharding)
        return _put(jnp.broadcast_to(jnp.asarray(x), (n,) + jnp.shape(x)), sharding)

    return jax.tree.map(stack, tree)


def unreplicate(tree: PyTree) -> PyTree:
    """The first copy of a pytree replicated with ``replicate(..., device_axis=True)`` (e.g. a ``pmap`` step's
    state or metrics)."""
    return jax.tree.map(lambda x: x[0], tree)


def shard(batch: Mapping[str, Any], mesh: Optional[Mesh] = None, *, axis: str = "data", device_axis: bool = False,
          global_batch_size: Optional[int] = None) -> dict:
    """Split every ``[B, ...]`` entry of ``batch`` over ``mesh`` (default :func:`data_mesh`) along its leading
    axis, with ``jax.make_array_from_process_local_data``.

    ``batch`` holds this process's rows of the global batch (:func:`gradjax.distributed.local_batches`); with one
    process, the whole batch. ``global_batch_size`` is inferred (rows x devices / this process's devices) unless
    given. ``device_axis=True``: the ``pmap`` layout ``[devices, B / devices, ...]`` (for
    :func:`~gradjax.train.pmap_train_step`). Raises ``ValueError`` if the global batch does not divide over the
    mesh's devices.
    """
    mesh = data_mesh(axis=axis) if mesh is None else mesh
    if axis not in mesh.shape:
        raise ValueError(f"the mesh has no axis {axis!r} (axes {mesh.axis_names}).")
    n = mesh.shape[axis]
    sharding = NamedSharding(mesh, P(axis))
    n_local = len(sharding.addressable_devices)  # this process's devices of the mesh
    if n_local == 0:
        raise ValueError("this process has no devices in the mesh.")

    def put(x):
        if _spans_processes(x):  # already a global array: kept or resharded
            return _put(x, sharding)
        x = x if isinstance(x, jax.Array) else np.asarray(x)
        shape = tuple(x.shape)
        if not shape:
            raise ValueError("every batch entry needs a leading batch axis; got a scalar.")
        rows = shape[0]
        total = rows * (n // n_local) if global_batch_size is None else int(global_batch_size)
        if total < 1 or total % n or rows % n_local:
            raise ValueError(f"global batch size {total} is not divisible by the {n} devices of the mesh.")
        if not device_axis:
            return jax.make_array_from_process_local_data(sharding, x, (total,) + shape[1:])
        local = x.reshape((n_local, rows // n_local) + shape[1:])
        return jax.make_array_from_process_local_data(sharding, local, (n, total // n) + shape[1:])

    return jax.tree.map(put, dict(batch))
