"""Shared helpers of the benchmark entry points: XLA:CPU flag presets, interleaved timing, machine record.

XLA flags must be in ``XLA_FLAGS`` before JAX creates its backend, so :func:`configure_xla` is called at the top of
each benchmark module *before* ``import jax`` (this module imports no JAX at load time). gradjax itself never
touches the environment; only these entry points do.

Presets (``--xla PRESET`` on every benchmark's command line, or ``GRADJAX_BENCH_XLA=PRESET``):

* ``default`` — JAX's own defaults (nothing set);
* ``onednn`` — ``--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise`` (oneDNN for
  dots and their elementwise epilogues);
* ``xnnpack`` — ``--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_fusion_type=dot,eltwise`` (XNNPACK
  fusions);
* ``xnnconv`` — XNNPACK for dots, elementwise ops and individual convolutions;
* ``xnngraph`` — XNNPACK with greedy graph fusion (``xla_cpu_experimental_xnn_graph_fusion_mode``);
* ``ynn`` — YNNPACK fusions (dot, eltwise, reduce, individual convolutions);
* ``noparallel`` — ``--xla_cpu_multi_thread_eigen=false`` (one thread per op, a control for the thread pool).

:mod:`benchmarks.xla_flags` times every preset (one process each, round-robin over processes).

Timing on a shared machine: :func:`interleaved` runs the competitors round-robin (A, B, C, A, B, C, ...) in one
process, so a load change hits all of them alike, and reports medians plus the 1-minute load average seen during
the run (``os.getloadavg()``).

Trustworthy CPU numbers (issue 27): :func:`configure_xla` (the first call of every entry point) also pins the
threads (:func:`pin_threads`): the process's CPU affinity (``os.sched_setaffinity``) and ``PJRT_NPROC`` — the size
of XLA:CPU's intra-op thread pool, read once when the CPU client is created (jaxlib's ``DefaultThreadPoolSize``:
``PJRT_NPROC``, else ``NPROC``, else the schedulable CPUs; XLA_FLAGS has no thread-count flag in jaxlib 0.10.2) —
to ``--threads N`` / ``$GRADJAX_BENCH_THREADS`` cores (default: all schedulable cores); :func:`pin_torch_threads`
does the same for PyTorch (``torch.set_num_threads``, ``set_num_interop_threads``). It also records the load average
before the run; :func:`load_record` adds the load after and marks a run ``loaded`` when a 1-minute load average
seen before, during or after it exceeds half the core count (:func:`load_note` then says **LOADED** in every table
caption, and :func:`write_result` prefixes the JSON's table with that mark): such numbers are never a headline.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Callable

XLA_PRESETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise",
    "xnnpack": "--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_fusion_type=dot,eltwise",
    "xnnconv": "--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_fusion_type=dot,eltwise,individual_convolution",
    "xnngraph": "--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "ynn": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce,individual_convolution",
    "noparallel": "--xla_cpu_multi_thread_eigen=false",
}


THREADS: dict = {}
"""What :func:`pin_threads` set in this process (cores, affinity, PJRT_NPROC, torch threads, load before)."""


def pin_threads(argv: list[str] | None = None) -> dict:
    """Pin this process to ``--threads N`` (in ``argv``, default ``sys.argv``) or ``$GRADJAX_BENCH_THREADS`` cores
    (default: every schedulable core): CPU affinity to the first N schedulable cores, ``PJRT_NPROC=N`` (XLA:CPU's
    intra-op pool; must be set before JAX creates its CPU client), ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` (if
    unset; PyTorch's OpenMP pool, before torch is imported). Records the 1-minute load average now (before the
    run). Returns (and keeps in :data:`THREADS`) the settings."""
    argv = sys.argv if argv is None else argv
    n = os.environ.get("GRADJAX_BENCH_THREADS")
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            n = argv[i + 1]
        elif a.startswith("--threads="):
            n = a.split("=", 1)[1]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    n = len(cores) if n in (None, "", "all") else int(n)
    if not 1 <= n <= len(cores):
        raise SystemExit(f"--threads must be in [1, {len(cores)}] (schedulable cores); got {n}")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores[:n])
    os.environ["PJRT_NPROC"] = str(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("MKL_NUM_THREADS", str(n))
    before = os.environ.get("GRADJAX_BENCH_LOAD_BEFORE")  # benchmarks/idle_suite.sh: the load at the suite's start
    THREADS.update({"cores": n, "cpu_count": os.cpu_count(), "affinity": cores[:n], "PJRT_NPROC": n,
                    "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"],
                    "load_before": [float(v) for v in before.split(",")] if before else list(os.getloadavg()),
                    "load_before_source": "suite start" if before else "process start"})
    _CPU_START.update(_cpu_snapshot())
    return dict(THREADS)


_CPU_START: dict = {}


def _cpu_snapshot() -> dict:
    """Wall clock, the machine's busy CPU seconds (``/proc/stat``: all but idle and iowait) and this process's
    CPU seconds (``os.times``)."""
    busy = float("nan")
    try:
        with open("/proc/stat") as f:
            v = [int(a) for a in f.readline().split()[1:]]
        busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return {"wall": time.time(), "busy": busy, "own": t.user + t.system}


def other_cpu() -> float:
    """Cores' worth of CPU that *other* processes used since :func:`pin_threads` (machine busy time minus this
    process's, per wall second; NaN without ``/proc/stat``). Unlike the load average it excludes this run itself
    and has no 1-minute lag."""
    if not _CPU_START:
        return float("nan")
    now = _cpu_snapshot()
    wall = max(now["wall"] - _CPU_START["wall"], 1e-9)
    return max(0.0, (now["busy"] - _CPU_START["busy"] - (now["own"] - _CPU_START["own"])) / wall)


def pin_torch_threads(torch) -> dict:
    """``torch.set_num_threads`` (intra-op) and ``set_num_interop_threads`` to the pinned core count (the latter
    only works before torch's first parallel op; then it is left as is). Returns what torch reports."""
    n = THREADS.get("cores") or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # already started
        pass
    THREADS.update({"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()})
    return {k: THREADS[k] for k in ("torch_threads", "torch_interop_threads")}


def configure_xla(argv: list[str] | None = None) -> str:
    """Append the preset named by ``--xla NAME`` in ``argv`` (default ``sys.argv``) or ``$GRADJAX_BENCH_XLA`` to
    ``XLA_FLAGS`` and pin the threads (:func:`pin_threads`); returns the preset name. Must run before JAX
    initialises its backend."""
    argv = sys.argv if argv is None else argv
    if not THREADS:
        pin_threads(argv)
    name = os.environ.get("GRADJAX_BENCH_XLA", "default")
    for i, a in enumerate(argv):
        if a == "--xla" and i + 1 < len(argv):
            name = argv[i + 1]
        elif a.startswith("--xla="):
            name = a.split("=", 1)[1]
    if name not in XLA_PRESETS:
        raise SystemExit(f"--xla must be one of {sorted(XLA_PRESETS)}; got {name!r}")
    if XLA_PRESETS[name]:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + XLA_PRESETS[name]).strip()
    return name


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, sync: dict[str, Callable] | None = None,
                warmup: int = 1, rotate: bool = False) -> tuple[dict[str, float], dict[str, list[float]], list[float]]:
    """Median seconds of each zero-argument callable, timed round-robin.

    ``sync[name]`` (default: ``jax.block_until_ready``) waits for a result. ``rotate=True`` starts round ``r`` at
    the ``r``-th callable (A B C, B C A, C A B, ...), so that no callable always follows the same one: on this
    CPU the first, short call of each round (right after the previous round's longest call) came out 1.3-1.8x
    slower than the same program later in the round (benchmarks/remat_layouts.py, layouts). Returns
    ``(medians, all runs, 1-minute load averages read after each round)``."""
    import jax  # noqa: PLC0415  (after configure_xla)

    sync = sync or {}
    wait = {k: sync.get(k, jax.block_until_ready) for k in fns}
    for _ in range(warmup):
        for k, fn in fns.items():
            wait[k](fn())
    runs: dict[str, list[float]] = {k: [] for k in fns}
    loads = []
    names = list(fns)
    for r in range(repeats):
        shift = r % len(names) if rotate and names else 0
        for k in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            wait[k](fns[k]())
            runs[k].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
    return {k: statistics.median(v) for k, v in runs.items()}, runs, loads


def machine(extra: dict | None = None) -> dict:
    """Machine, versions, date and load for the result files."""
    import jax  # noqa: PLC0415

    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg()),
            "jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "threads": dict(THREADS)}
    info.update(extra or {})
    return info


def cores() -> int:
    """The pinned core count (:func:`pin_threads`), else the schedulable cores."""
    return THREADS.get("cores") or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                    else os.cpu_count() or 1)


def is_loaded(loads: list[float] | None = None) -> bool:
    """True when other processes shared the cores: the 1-minute load average before the run (:func:`pin_threads`;
    under ``benchmarks/idle_suite.sh`` the suite's start) exceeds half the core count, or a load average during
    (``loads``) or after it exceeds half the core count *plus this run's own threads* (a run on every core of an
    idle machine reads ~cores by itself), or other processes used more than
    ``cpu_count / 2`` cores' worth of CPU during the run (:func:`other_cpu`)."""
    half = (os.cpu_count() or 1) / 2
    before = (THREADS.get("load_before") or [0.0])[0]
    during = max(list(loads or []) + [os.getloadavg()[0]])
    others = other_cpu()
    return before > half or during > half + cores() or (others == others and others > half)


LOADED_MARK = "**LOADED** (other processes shared the cores: relative numbers only, never a headline)"


def load_note(loads: list[float]) -> str:
    """``"load average 3.1 (2.0-4.5)"`` for a table caption, plus :data:`LOADED_MARK` for a loaded run
    (:func:`is_loaded`)."""
    mark = f", other processes {other_cpu():.2f} cores, {cores()} threads" + (
        f"; {LOADED_MARK}" if is_loaded(loads) else "")
    if not loads:
        return "load average n/a" + mark
    return f"load average {statistics.median(loads):.1f} ({min(loads):.1f}-{max(loads):.1f})" + mark


def load_record(loads: list[float] | None = None) -> dict:
    """``{"cores", "cpu_count", "threads", "load_before", "load_after", "loads", "other_cpu_cores", "loaded"}``
    for a result file."""
    return {"cores": cores(), "cpu_count": os.cpu_count(), "threads": dict(THREADS),
            "load_before": THREADS.get("load_before"), "load_after": list(os.getloadavg()),
            "loads": list(loads or []), "other_cpu_cores": other_cpu(), "loaded": is_loaded(loads)}


def write_result(path: str, result: dict, loads: list[float] | None = None) -> dict:
    """Write ``result`` as JSON to ``path`` with ``result["load"] = load_record(loads)``; a loaded run gets
    ``result["loaded"] = True`` and its ``"table"`` (if any) starts with :data:`LOADED_MARK`. Prints the mark."""
    import json  # noqa: PLC0415

    rec = load_record(loads)
    result["load"], result["loaded"] = rec, rec["loaded"]
    if rec["loaded"]:
        if isinstance(result.get("table"), str) and not result["table"].startswith(LOADED_MARK):
            result["table"] = LOADED_MARK + "\n\n" + result["table"]
        print(f"{LOADED_MARK}: load before {rec['load_before']}, after {rec['load_after']}, {rec['cores']} cores",
              flush=True)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=float)
    return result


def nontrivial_batch_stats(model, variables, x) -> dict:
    """``variables`` with non-trivial BatchNorm statistics, the benchmarks' one network state: the running
    statistics of one train-mode pass over ``x``, times 1.05 (so the implicit BN biases, and with them FullGrad's
    bias maps and the IG path's non-homogeneity, are not zero, as they are at initialisation)."""
    import jax
    _, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return {"params": variables["params"], "batch_stats": jax.tree.map(lambda a: a * 1.05, updated["batch_stats"])}


def primitive_count(jaxpr, name: str = "conv_general_dilated") -> int:
    """How many times primitive ``name`` runs in a (closed) jaxpr: nested jaxprs (``pjit``, ``remat``,
    ``custom_jvp``, ...) are walked, a ``scan`` body counts ``length`` times; a ``while`` body once (its trip
    count is not static). Counting the convolutions of a train step counts its network passes."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        times = int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += times * primitive_count(inner, name)
    return total


def compiled_cost(jitted, *args) -> dict:
    """Compile ``jitted`` (a ``jax.jit`` object) for ``args`` and read its static cost: ``{"compiled",
    "compile_s", "flops"`` (XLA's ``cost_analysis``; a loop body counted once), ``"temp_bytes"`` (``memory_analysis``),
    ``"convs"`` (:func:`primitive_count` of its jaxpr), ``"compiled_convs"`` (convolutions in the optimised
    HLO text)``}``; NaN where the backend reports nothing."""
    import jax  # noqa: PLC0415

    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    out = {"compiled": compiled, "compile_s": time.perf_counter() - t0, "flops": float("nan"),
           "temp_bytes": float("nan")}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out["flops"] = float(cost.get("flops", float("nan")))
    except Exception:  # noqa: BLE001  (not every backend reports a cost)
        pass
    try:
        out["temp_bytes"] = float(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001
        pass
    out["convs"] = primitive_count(jax.make_jaxpr(jitted)(*args))
    try:  # convolutions left after XLA's optimisations (a loop body counted once)
        out["compiled_convs"] = compiled.as_text().count(" convolution(")
    except Exception:  # noqa: BLE001
        out["compiled_convs"] = -1
    return out
