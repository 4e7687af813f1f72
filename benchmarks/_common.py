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


def configure_xla(argv: list[str] | None = None) -> str:
    """Append the preset named by ``--xla NAME`` in ``argv`` (default ``sys.argv``) or ``$GRADJAX_BENCH_XLA`` to
    ``XLA_FLAGS``; returns the preset name. Must run before JAX initialises its backend."""
    argv = sys.argv if argv is None else argv
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
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    info.update(extra or {})
    return info


def load_note(loads: list[float]) -> str:
    """``"load average 3.1 (2.0-4.5)"`` for a table caption."""
    if not loads:
        return "load average n/a"
    return f"load average {statistics.median(loads):.1f} ({min(loads):.1f}-{max(loads):.1f})"


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
