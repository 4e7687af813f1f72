"""XLA:CPU flag presets compared: one process per preset (flags are process-wide), processes run round-robin.

Each process runs :mod:`benchmarks.chunking_cost` (the input-gradient and integrated gradients on the same VGG
batch) under one preset of :data:`benchmarks._common.XLA_PRESETS`; the presets take turns for ``--rounds`` rounds
so a load change on the shared machine is spread over all of them. Reported: the median over rounds of each row's
time, and its ratio to the ``default`` preset (< 1: the preset is faster).

    python -m benchmarks.xla_flags --presets default,onednn,xnnpack,xnnconv,ynn --rounds 2   # ~10 min, 2 cores

Writes ``benchmarks/results/xla_flags-cpu.json``. Adopt a preset in an entry point with ``--xla NAME`` (never on
``import gradjax``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="default,onednn,xnnpack,xnnconv,ynn")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    presets = args.presets.split(",")
    times: dict[str, dict[str, list[float]]] = {q: {} for q in presets}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for q in presets:
                out = os.path.join(tmp, f"{q}-{r}")
                cmd = [sys.executable, "-m", "benchmarks.chunking_cost", "--xla", q, "--batch-size",
                       str(args.batch_size), "--steps", str(args.steps), "--chunks", "auto,8", "--methods",
                       "integrated_gradients", "--repeats", str(args.repeats), "--out", out]
                subprocess.run(cmd, check=True, capture_output=True)
                name = os.listdir(out)[0]
                with open(os.path.join(out, name)) as f:
                    res = json.load(f)
                for row, v in res["rows"].items():
                    times[q].setdefault(row, []).append(v["run_s"])
                loads.append(os.getloadavg()[0])
    med = {q: {row: statistics.median(v) for row, v in rows.items()} for q, rows in times.items()}
    base = med[presets[0]]
    lines = [f"XLA:CPU presets, {args.batch_size} images, IG {args.steps} steps, {os.cpu_count()} cores, medians over "
             f"{args.rounds} round-robin rounds of {args.repeats} calls; load average "
             f"{statistics.median(loads):.1f} ({min(loads):.1f}-{max(loads):.1f}); ratio = time / time under "
             f"`{presets[0]}`.", "", "| preset | flags | " + " | ".join(base) + " |",
             "|---|---|" + "---|" * len(base)]
    from benchmarks._common import XLA_PRESETS  # noqa: PLC0415
    for q in presets:
        lines.append(f"| {q} | `{XLA_PRESETS[q] or '(none)'}` | " + " | ".join(
            f"{1e3 * med[q][row]:.0f} ms ({med[q][row] / base[row]:.2f})" for row in base) + " |")
    table = "\n".join(lines)
    print(table)
    result = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "times": times,
              "medians": med, "loads": loads, "table": table}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "xla_flags-cpu.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
