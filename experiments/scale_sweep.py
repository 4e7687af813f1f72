"""Scale sweep: one table script run at several budgets with the same seeds and data subsets, every thesis ordering
claim tested by a paired comparison at each budget, and its trend over the budgets (issue 24).

The runner is thin: it calls ``experiments.<script>.main`` once per budget (the budget's extra arguments appended
to the shared ones), reads the per-seed accuracies ``results[row][column]["runs"]`` of each run (seed ``s`` of one
budget is seed ``s`` of every budget: same subset, same initialisation), and for each claim ``"a>b"`` (a thesis
ordering) and each column reports :func:`gradjax.statistics.paired_comparison` of ``a`` against ``b`` over the
seeds: the mean difference ``a - b`` in percentage points, its sample std, t, wins and the verdict. The trend of a
claim over the budgets is the paired comparison of its per-seed differences at the largest budget against those at
the smallest (``"toward thesis"``: the difference ``a - b`` grew; ``"away from thesis"``: it fell; ``"no
significant change"``: tie). Everything goes to one JSON file (numbers only), rewritten after every budget.

    python -m experiments.scale_sweep --script distill_fewshot --out docs/results/ch2_table2_1_sweep.json \\
        --budget "x1=--student-steps 150" --budget "x4=--student-steps 600" --budget "x16=--student-steps 2400" \\
        --claim "CE + A>CE" --claim "CE + J>CE" --claim "CE + {A+J}>CE + A" --claim "CE + {A+J}>CE" \\
        -- --scale small --dataset mnist_digits --seeds 3 --n-per-class 5,10,50 \\
           --methods "CE,CE + A,CE + J,CE + {A+J}" --teacher-cache runs/sweep/t21_teacher.msgpack

Everything after ``--`` goes to the script at every budget. ``--results-key table2_3`` reads
``results["table2_3"]`` (lwf_transfer). The commands for the other tables are in docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone

import numpy as np

from gradjax.statistics import paired_comparison

SCRIPTS = ("distill_fewshot", "distill_fullgrad", "bias_regularization", "noise_robustness", "lwf_transfer")


def parse_budget(text: str) -> tuple[str, list[str]]:
    """``"x4=--student-steps 600"`` -> ``("x4", ["--student-steps", "600"])``."""
    if "=" not in text:
        raise ValueError(f"a budget is NAME=ARGS (e.g. 'x4=--student-steps 600'); got {text!r}.")
    name, args = text.split("=", 1)
    if not name.strip():
        raise ValueError(f"a budget needs a name before '='; got {text!r}.")
    return name.strip(), shlex.split(args)


def parse_claim(text: str) -> tuple[str, str]:
    """``"CE + A>CE"`` -> ``("CE + A", "CE")``: the thesis says row ``a`` beats row ``b``."""
    parts = text.split(">")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ValueError(f"a claim is 'A>B' (row A beats row B in the thesis); got {text!r}.")
    return parts[0].strip(), parts[1].strip()


def per_seed(results: dict, row: str, column) -> np.ndarray:
    """The per-seed values ``results[row][column]["runs"]`` (column keys compared as strings)."""
    if row not in results:
        raise ValueError(f"row {row!r} not in the results (rows: {list(results)}).")
    cells = {str(k): v for k, v in results[row].items()}
    if str(column) not in cells:
        raise ValueError(f"column {column!r} not in row {row!r} (columns: {list(cells)}).")
    return np.asarray(cells[str(column)]["runs"], float)


def compare_budget(results: dict, claims: Sequence[tuple[str, str]], *, scale: float = 100.0) -> dict:
    """``{claim: {column: paired_comparison(a, b).as_dict()}}`` for one budget's results (differences in
    ``scale`` units: percentage points for accuracies)."""
    out = {}
    for a, b in claims:
        cols = [str(k) for k in results[a]]
        out[f"{a}>{b}"] = {c: paired_comparison(scale * per_seed(results, a, c),
                                                scale * per_seed(results, b, c)).as_dict() for c in cols}
    return out


def trend(first: dict, last: dict) -> dict:
    """Paired comparison of one claim's per-seed differences at the last budget against the first (same seeds):
    ``direction`` "toward thesis" / "away from thesis" / "no significant change"."""
    pc = paired_comparison(last["differences"], first["differences"])
    direction = {"a>b": "toward thesis", "a<b": "away from thesis", "tie": "no significant change"}[pc.verdict]
    return {**pc.as_dict(), "direction": direction}


def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def run_sweep(script: str, budgets: Sequence[tuple[str, list[str]]], claims: Sequence[tuple[str, str]],
              shared: Sequence[str], *, out: str, results_key: str = "results", workdir: str | None = None,
              resume: bool = False) -> dict:
    """Run ``script`` once per budget, compare, write ``out`` (after every budget) and return the summary.
    ``resume``: budgets already in ``out`` with the same arguments (and the same shared arguments) are kept, not
    re-run (an interrupted sweep continues; a budget can be added later)."""
    if len(budgets) < 1:
        raise ValueError("give at least one --budget.")
    mod = importlib.import_module(f"experiments.{script}")
    workdir = workdir or tempfile.mkdtemp(prefix=f"sweep-{script}-")
    summary = {"script": script, "shared_args": list(shared), "claims": [f"{a}>{b}" for a, b in claims],
               "budgets": {}, "trend": {}, "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": "python -m experiments.scale_sweep " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
               "units": "differences in percentage points (accuracy x 100)"}
    done = {}
    if resume and os.path.exists(out):
        with open(out) as f:
            old = json.load(f)
        if old.get("script") != script or old.get("shared_args") != list(shared):
            raise ValueError(f"--resume: {out} is a sweep of {old.get('script')} with other shared arguments.")
        done = old["budgets"]
        summary["started_utc"] = old.get("started_utc", summary["started_utc"])
        summary["commands"] = old.get("commands", [old.get("command")]) + [summary["command"]]
    for name, extra in budgets:
        if name in done and done[name]["args"] == list(extra):
            summary["budgets"][name] = done[name]
            print(f"budget {name}: kept from {out}", flush=True)
            continue
        t0, load0 = time.time(), _load()
        res = mod.main(list(shared) + list(extra) + ["--out", os.path.join(workdir, name)])
        results = res[results_key] if results_key == "results" else res["results"][results_key]
        summary["budgets"][name] = {
            "args": extra, "wall_s": round(time.time() - t0, 1), "load_before": load0, "load_after": _load(),
            "teacher_accuracy": res.get("teacher_accuracy", (res.get("results") or {}).get("teacher_accuracy")),
            "student_steps": res.get("student_steps"),
            "accuracy": {r: {str(c): {"mean": v["mean"], "std": v["std"], "runs": v["runs"]}
                             for c, v in cols.items()} for r, cols in results.items() if isinstance(cols, dict)},
            "paired": compare_budget(results, claims)}
        print(f"budget {name}: {summary['budgets'][name]['wall_s']} s", flush=True)
        _summarize(summary, out)
    _summarize(summary, out, quiet=True)
    return summary


def _summarize(summary: dict, out: str, quiet: bool = False) -> None:
    """Print the last budget's verdicts, recompute the trend (first vs last budget) and the mean difference of
    every claim at every budget (``gap_by_budget``), and write ``out``."""
    if summary["budgets"] and not quiet:
        name = list(summary["budgets"])[-1]
        for claim, cols in summary["budgets"][name]["paired"].items():
            print("  " + claim + ": " + ", ".join(f"n={c} {v['mean']:+.1f}±{v['std']:.1f} t={v['t']:.2f} "
                                                  f"{v['verdict']}" for c, v in cols.items()), flush=True)
    names = list(summary["budgets"])
    summary["gap_by_budget"] = {cl: {c: {b: round(summary["budgets"][b]["paired"][cl][c]["mean"], 2) for b in names}
                                     for c in summary["budgets"][names[-1]]["paired"][cl]}
                                for cl in summary["claims"]} if names else {}
    if len(names) >= 2:
        first, last = summary["budgets"][names[0]]["paired"], summary["budgets"][names[-1]]["paired"]
        summary["trend"] = {"from": names[0], "to": names[-1],
                            "claims": {cl: {c: trend(first[cl][c], last[cl][c]) for c in last[cl]} for cl in last}}
    summary["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(summary, f, indent=1, default=float)


def _cell(v: dict) -> str:
    return f"{v['mean']:+.1f} ± {v['std']:.1f} (t {v['t']:.2f}, {v['verdict']})"


def markdown(summary: dict) -> str:
    """The sweep's two RESULTS tables, generated from the summary JSON: (1) test accuracy % (mean ± sample std over
    seeds) of every row (as columns) at every budget and column (as rows); (2) every claim's paired difference a − b (percentage points,
    mean ± std, t, verdict) at every budget and its trend from the first budget to the last."""
    names = list(summary["budgets"])
    first = summary["budgets"][names[0]]
    cols = list(next(iter(first["accuracy"].values())))
    rows_ = list(first["accuracy"])
    acc_header = ["budget", "n"] + rows_
    acc_rows = [[b, c] + [f"{100 * summary['budgets'][b]['accuracy'][r][c]['mean']:.1f} ± "
                          f"{100 * summary['budgets'][b]['accuracy'][r][c]['std']:.1f}" for r in rows_]
                for b in names for c in cols]
    pair_header = ["claim (thesis)", "n"] + [f"{b}: a − b (t, verdict)" for b in names]
    if summary.get("trend"):
        pair_header.append(f"trend {summary['trend']['from']} → {summary['trend']['to']} (mean, t)")
    pair_rows = []
    for cl in summary["claims"]:
        for c in cols:
            row = [cl.replace(">", " > "), c] + [_cell(summary["budgets"][b]["paired"][cl][c]) for b in names]
            if summary.get("trend"):
                t = summary["trend"]["claims"][cl][c]
                row.append(f"{t['direction']} ({t['mean']:+.1f}, t {t['t']:.2f})")
            pair_rows.append(row)

    def table(header, rows):
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(map(str, r)) + " |" for r in rows])

    return table(acc_header, acc_rows) + "\n\n" + table(pair_header, pair_rows)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    shared = []
    if "--" in argv:
        i = argv.index("--")
        argv, shared = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--script", required=True, choices=SCRIPTS)
    p.add_argument("--budget", action="append", required=True, help="NAME=ARGS, repeated (>= 3 for a trend)")
    p.add_argument("--claim", action="append", required=True, help="A>B: a thesis ordering to test, repeated")
    p.add_argument("--results-key", default="results", help="'results' or a key inside it (lwf_transfer: table2_3)")
    p.add_argument("--out", required=True, help="the summary JSON")
    p.add_argument("--workdir", default=None, help="where each budget's run writes (default: a temp dir)")
    p.add_argument("--resume", action="store_true", help="keep the budgets already in --out (same arguments)")
    p.add_argument("--markdown", action="store_true", help="only print the RESULTS tables of --out (no runs)")
    a = p.parse_args(argv)
    if a.markdown:
        with open(a.out) as f:
            summary = json.load(f)
        print(markdown(summary))
        return summary
    return run_sweep(a.script, [parse_budget(b) for b in a.budget], [parse_claim(c) for c in a.claim], shared,
                     out=a.out, results_key=a.results_key, workdir=a.workdir, resume=a.resume)


if __name__ == "__main__":
    main()
