"""Multi-process (multi-host) data-parallel training on JAX's own runtime, ``jax.distributed``.

TPU pod slices and multi-GPU clusters run **one JAX process per host**; every process runs the same program, sees
all devices of the job in ``jax.devices()`` (its own in ``jax.local_devices()``), and a ``jax.jit`` computation
over a mesh of all of them is one SPMD program whose collectives XLA inserts. gradjax works *on* that runtime:

1. :func:`initialize` (or :func:`initialize_from_env`, which the experiment scripts call through their
   ``--coordinator-address/--num-processes/--process-id`` flags) starts ``jax.distributed`` — with explicit
   values, from the environment, or auto-detected on TPU pods / SLURM / Open MPI — with a timeout and clear errors
   for an unreachable coordinator, a process that never shows up, and processes that disagree on the count.
2. The engine runs on that runtime unchanged, with the placement of :mod:`gradjax.train.placement`:
   :func:`gradjax.train.data_mesh` is by default a 1-D ``"data"`` mesh over every device of every process,
   :func:`gradjax.train.sharded_train_step` compiles for it (the loss is written for the global batch), and
   :func:`gradjax.train.replicate` puts the train state and frozen inputs (a teacher's variables) on every device
   of every process (optionally checking that all processes hold the same values).
3. :func:`local_batches` makes each process read only *its* rows of every global batch (the order is
   :func:`gradjax.data.epoch_permutation` of ``(seed, epoch)``, so the global batch — and the result — does not
   depend on the number of processes), and :func:`global_batches` assembles them into global arrays with
   :func:`gradjax.train.shard` (``jax.make_array_from_process_local_data``). With ``shuffle=False,
   drop_remainder=False`` (padded last batch with a ``mask``) they are the input of :func:`gradjax.train.evaluate`,
   which then computes global accuracy/cross-entropy sums, identical on every process.
4. Checkpoints (:class:`gradjax.train.Checkpointer`, orbax) are written by all processes together (one copy on
   disk, in a directory every host can reach); metrics files and progress bars come from process 0 only
   (:func:`is_main_process`, :func:`main_print`).

Try it on one machine with fake CPU devices (see README, "Multi-host training")::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m experiments.train_classifier \\
        --coordinator-address 127.0.0.1:12345 --num-processes 2 --process-id 0 &
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m experiments.train_classifier \\
        --coordinator-address 127.0.0.1:12345 --num-processes 2 --process-id 1

(on CPU, :func:`initialize` selects the gloo collectives that cross-process CPU computations need).
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gradjax.train.placement import shard

ENV_COORDINATOR = "GRADJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "GRADJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "GRADJAX_PROCESS_ID"
ENV_TIMEOUT = "GRADJAX_DISTRIBUTED_TIMEOUT"
"""Environment variables read by :func:`initialize_from_env` when a flag is not given (JAX's own
``JAX_COORDINATOR_ADDRESS`` is honoured too)."""

INIT_FAILED_EXIT_CODE = 75
"""Exit status of a process whose distributed start timed out (see :func:`initialize`)."""


class DistributedInitError(RuntimeError):
    """``jax.distributed`` could not be started (bad configuration, unreachable coordinator, count mismatch)."""


# ------------------------------------------------------------------------------------------------- start-up
def _parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedInitError(f"coordinator address must be 'host:port' (e.g. 10.0.0.1:1234); got {address!r}.")
    return host.strip("[]"), int(port)


def _wait_for_coordinator(address: str, deadline: float) -> None:
    """Block until a TCP connection to ``address`` succeeds; raise a clear error at ``deadline``."""
    host, port = _parse_address(address)
    last = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.time()))):
                return
        except OSError as e:
            last = e
        if time.time() >= deadline:
            raise DistributedInitError(
                f"cannot reach the jax.distributed coordinator at {address} (last error: {last}). Start process 0 "
                "(it hosts the coordinator) on that host and port, check the address and the firewall, or raise the "
                "timeout.")
        time.sleep(0.2)


def _watchdog(timeout_s: float, message: str) -> threading.Timer:
    """A timer that prints ``message`` and ends the process with :data:`INIT_FAILED_EXIT_CODE`.

    ``jax.distributed.initialize`` cannot be interrupted from Python, and when its own timeout expires JAX aborts
    the process with a C++ stack trace ("DEADLINE_EXCEEDED ... RegisterTask"); this says what is wrong instead."""

    def fire():
        sys.stderr.write(f"\ngradjax.distributed: {message}\n")
        sys.stderr.flush()
        os._exit(INIT_FAILED_EXIT_CODE)

    timer = threading.Timer(timeout_s, fire)
    timer.daemon = True
    timer.start()
    return timer


def _check_consistent(num_processes: int, timeout_s: float) -> None:
    """Every process publishes the process count it was given; all compare (through the coordinator's key-value
    store) and fail together on a mismatch, so that no process is left waiting in a collective."""
    from jax._src import distributed as _dist

    client = _dist.global_state.client
    count = jax.process_count()
    client.key_value_set(f"gradjax/num_processes/{jax.process_index()}", str(num_processes))
    claims = {p: int(client.blocking_key_value_get(f"gradjax/num_processes/{p}", int(timeout_s * 1000)))
              for p in range(count)}
    if any(c != count for c in claims.values()):
        raise DistributedInitError(
            f"processes disagree on the process count: the coordinator (process 0) expects {count}, but the processes "
            f"were started with num_processes {claims} (process id -> value). Give every process the same "
            "--num-processes.")


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, timeout_s: float = 300.0, auto: bool = False,
               cpu_collectives: str = "gloo", heartbeat_timeout_s: Optional[int] = None,
               local_device_ids: Optional[Sequence[int]] = None) -> bool:
    """Start JAX's multi-process runtime (``jax.distributed.initialize``), before any other JAX computation.

    Either give all three of ``coordinator_address`` (``host:port`` of process 0), ``num_processes`` and
    ``process_id`` (in ``[0, num_processes)``), or ``auto=True`` to let JAX detect them (Cloud TPU pod slices,
    SLURM, Open MPI; then ``None`` values are filled in by JAX). With nothing given (and ``auto=False``) this is a
    single-process run and nothing happens (returns ``False``); ``num_processes=1`` too.

    Waits at most ``timeout_s`` for the coordinator and for all processes to connect:

    * a coordinator that cannot be reached raises :class:`DistributedInitError` (processes other than 0);
    * if not all processes connect in time (one was not started, or processes disagree on ``num_processes``
      so that the coordinator waits for a process that never comes), JAX would abort the process with a C++
      stack trace; a watchdog prints what to check and exits with status :data:`INIT_FAILED_EXIT_CODE` instead;
    * processes that connected but were given different ``num_processes`` raise :class:`DistributedInitError`
      in every process.

    On CPU, cross-process collectives need ``jax_cpu_collectives_implementation`` (``cpu_collectives``,
    default ``"gloo"``; set before the backend starts). ``heartbeat_timeout_s``: how long a process waits for a
    dead peer before aborting (JAX's default 100 s). Returns ``True`` if the runtime was started.
    """
    from jax._src import distributed as _dist

    if _dist.global_state.client is not None:
        raise DistributedInitError("jax.distributed is already initialized in this process; call initialize once.")
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if not auto:
        if all(v is None for v in given.values()):
            return False
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise DistributedInitError(
                f"multi-process training needs coordinator_address, num_processes and process_id (or auto "
                f"detection); missing {missing}.")
    if num_processes is not None:
        if not isinstance(num_processes, (int, np.integer)) or num_processes < 1:
            raise DistributedInitError(f"num_processes must be a positive integer; got {num_processes!r}.")
        num_processes = int(num_processes)
    if process_id is not None:
        if not isinstance(process_id, (int, np.integer)) or not 0 <= process_id < (num_processes or np.inf):
            raise DistributedInitError(f"process_id must be an integer in [0, num_processes={num_processes}); "
                                       f"got {process_id!r}.")
        process_id = int(process_id)
    if not auto and num_processes == 1:
        return False
    if coordinator_address is not None:
        _parse_address(coordinator_address)
    if timeout_s <= 0:
        raise DistributedInitError(f"timeout_s must be positive; got {timeout_s}.")
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)

    deadline = time.time() + timeout_s
    if coordinator_address is not None and process_id not in (None, 0):
        _wait_for_coordinator(coordinator_address, deadline)
    who = f"process {process_id}" if process_id is not None else "this process"
    timer = _watchdog(
        max(1.0, deadline - time.time()),
        f"{who} timed out after {timeout_s:g} s waiting for all {num_processes or '(auto-detected)'} processes to "
        f"connect to the coordinator at {coordinator_address or '(auto-detected)'}. Check that every process was "
        "started, with the same --num-processes and a distinct --process-id in [0, num-processes), and that this "
        "host can reach the coordinator.")
    kwargs = dict(initialization_timeout=int(timeout_s) + 30)  # our watchdog fires first, with a clear message
    if heartbeat_timeout_s is not None:
        kwargs["heartbeat_timeout_seconds"] = int(heartbeat_timeout_s)
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        raise DistributedInitError(f"jax.distributed.initialize failed: {e}") from e
    finally:
        timer.cancel()
    if num_processes is not None:
        _check_consistent(num_processes, max(5.0, deadline - time.time()))
    return True


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise DistributedInitError(f"environment variable {name} must be an integer; got {v!r}.") from None


def initialize_from_env(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                        process_id: Optional[int] = None, *, timeout_s: Optional[float] = None,
                        auto: bool = False, **kwargs) -> bool:
    """:func:`initialize` with every value not given taken from the environment:
    ``GRADJAX_COORDINATOR_ADDRESS`` (or JAX's ``JAX_COORDINATOR_ADDRESS``), ``GRADJAX_NUM_PROCESSES``,
    ``GRADJAX_PROCESS_ID``, ``GRADJAX_DISTRIBUTED_TIMEOUT`` (seconds, default 300). ``auto=True`` (also
    ``--coordinator-address auto`` or the environment value ``auto``) uses JAX's cluster auto-detection."""
    address = (coordinator_address or os.environ.get(ENV_COORDINATOR) or os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if address == "auto":
        auto, address = True, None
    num = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if timeout_s is None:
        timeout_s = float(os.environ.get(ENV_TIMEOUT) or 300.0)
    return initialize(address, num, pid, timeout_s=timeout_s, auto=auto, **kwargs)


def add_arguments(parser) -> None:
    """Add ``--coordinator-address``, ``--num-processes``, ``--process-id`` and ``--distributed-timeout`` to an
    ``argparse`` parser (defaults from the environment, see :func:`initialize_from_env`)."""
    g = parser.add_argument_group("multi-process training (jax.distributed)")
    g.add_argument("--coordinator-address", default=None,
                   help=f"host:port of process 0's coordinator, or 'auto' (TPU pod / SLURM detection); env "
                        f"{ENV_COORDINATOR}. Unset: one process")
    g.add_argument("--num-processes", type=int, default=None,
                   help=f"number of processes (hosts); env {ENV_NUM_PROCESSES}")
    g.add_argument("--process-id", type=int, default=None, help=f"this process's index in [0, n); env {ENV_PROCESS_ID}")
    g.add_argument("--distributed-timeout", type=float, default=None,
                   help=f"seconds to wait for the coordinator and all processes; env {ENV_TIMEOUT} (default 300)")


def initialize_from_args(args) -> bool:
    """:func:`initialize_from_env` from the attributes :func:`add_arguments` defines."""
    return initialize_from_env(getattr(args, "coordinator_address", None), getattr(args, "num_processes", None),
                               getattr(args, "process_id", None), timeout_s=getattr(args, "distributed_timeout", None))


# ------------------------------------------------------------------------------------ process-0 helpers
def is_main_process() -> bool:
    """``True`` on process 0 (the one that writes metrics, results and progress)."""
    return jax.process_index() == 0


def main_print(*args, **kwargs) -> None:
    """``print`` on process 0 only."""
    if is_main_process():
        print(*args, **kwargs)


def sync(name: str) -> None:
    """Barrier: wait until every process reaches ``sync(name)`` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------ per-process input
def process_rows(global_batch_size: int, mesh: Mesh, axis: str = "data") -> slice:
    """The rows ``[start, stop)`` of a global batch that live on this process's devices of ``mesh`` (batch split
    along ``axis``). Raises ``ValueError`` if the batch does not divide over the mesh's devices."""
    n = mesh.shape[axis]
    if global_batch_size < 1 or global_batch_size % n:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {n} devices of the global mesh "
            f"({jax.process_count()} process(es) x {jax.local_device_count()} local device(s)); use a multiple of {n}.")
    index_map = NamedSharding(mesh, P(axis)).addressable_devices_indices_map((global_batch_size,))
    rows = sorted({(idx[0].start or 0, global_batch_size if idx[0].stop is None else idx[0].stop)
                   for idx in index_map.values()})
    if not rows:
        raise ValueError("this process has no devices in the mesh.")
    for (_, stop), (start, _) in zip(rows, rows[1:]):
        if start != stop:
            raise ValueError(f"this process's rows of the global batch are not contiguous ({rows}); build the mesh "
                             "with devices ordered by process (gradjax.train.data_mesh()).")
    return slice(rows[0][0], rows[-1][1])


def _fetch(source, idx: np.ndarray, transform: Optional[Callable]) -> dict:
    if hasattr(source, "images") and hasattr(source, "labels"):  # gradjax.data.ArrayDataset
        out = {"image": source.images[idx], "label": source.labels[idx]}
    else:  # a random-access source, e.g. tfds.data_source(...): records are dicts of arrays
        records = [source[int(i)] for i in idx]
        out = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
    return transform(out) if transform is not None else out


def local_batches(source, global_batch_size: int, mesh: Mesh, *, seed: int = 0, epoch: int = 0, start: int = 0,
                  shuffle: bool = True, drop_remainder: bool = True, axis: str = "data",
                  transform: Optional[Callable[[dict], dict]] = None) -> Iterator[dict]:
    """This process's slices of the global batches of :func:`gradjax.data.batches` ``(source, global_batch_size,
    seed=seed, epoch=epoch, start=start)``: the same global order (a function of ``(seed, epoch)`` only), of which
    this process reads only its rows (:func:`process_rows`), so the run does not depend on the process count.

    ``source``: a :class:`gradjax.data.ArrayDataset`, or any random-access source with ``len()`` and
    ``source[i] -> dict`` (e.g. ``tfds.data_source(name, split=...)``; ``transform(batch) -> batch`` decodes /
    normalizes). With ``drop_remainder=False`` the last global batch is padded to a multiple of the device count
    by repeating its first example, and every batch gets a float ``"mask"`` entry (1 = real, 0 = padding), as
    :func:`gradjax.train.evaluate` expects."""
    rows = process_rows(global_batch_size, mesh, axis)
    n = len(source)
    from gradjax.data import epoch_permutation

    order = epoch_permutation(n, seed=seed, epoch=epoch) if shuffle else np.arange(n)
    stop = (n // global_batch_size) * global_batch_size if drop_remainder else n
    for s in range(start * global_batch_size, stop, global_batch_size):
        idx = order[s:s + global_batch_size]
        mask = np.ones(global_batch_size, np.float32)
        if len(idx) < global_batch_size:  # (drop_remainder=False) pad the last batch
            mask[len(idx):] = 0.0
            idx = np.concatenate([idx, np.full(global_batch_size - len(idx), idx[0])])
        batch = _fetch(source, idx[rows], transform)
        if not drop_remainder:
            batch["mask"] = mask[rows]
        yield batch


def global_batches(source, global_batch_size: int, mesh: Mesh, *, seed: int = 0, epoch: int = 0, start: int = 0,
                   axis: str = "data", **kwargs) -> Iterator[dict]:
    """:func:`local_batches` assembled into global arrays split along ``axis`` of ``mesh`` with
    :func:`gradjax.train.shard`: the input of a sharded step, e.g. for :func:`gradjax.train.fit`
    ``(epoch_batches=lambda e, s: global_batches(ds, B, mesh, seed=0, epoch=e, start=s))``, or with
    ``shuffle=False, drop_remainder=False`` of :func:`gradjax.train.evaluate`. With one process this is
    :func:`gradjax.data.batches` placed on the mesh."""
    for b in local_batches(source, global_batch_size, mesh, seed=seed, epoch=epoch, start=start, axis=axis, **kwargs):
        yield shard(b, mesh, axis=axis, global_batch_size=global_batch_size)
