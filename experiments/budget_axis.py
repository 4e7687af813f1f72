"""Chapter-3 budget axes (issue 25 item 4): collect per-budget multi-seed runs of one chapter-3 script into one
numbers-only JSON with the paired verdicts at every budget and their trend from the first budget to the last.

Three kinds of runs (each budget = one run directory, or an already-collected JSON file, at its own ``--epochs``
or ``--width``: ``--axis epochs`` or ``--axis width``):

* ``table3_1`` — ``python -m experiments.fullgrad_digits --digit-flip-only --epochs E --seeds 0 1 2 --out DIR``
  (``DIR/results_seeds.json``): Table 3.1's digit flipping per method and seed, and FullGrad (no abs) against each
  method paired over the seeds (thesis L1269–1273: no abs flips best);

* ``table3_2`` — ``python -m experiments.fullgrad_digits --pixel-perturbation-only --epochs E --seeds 0 1 2 --out
  DIR`` (``DIR/results_seeds.json``): Table 3.2's pixel perturbation per method, RF and seed, and the thesis's order
  (IG < FullGrad < FullGrad (no abs) < gradient < random output change) paired over the seeds at each RF;
* ``road`` — ``python -m experiments.roar_sanity --road --epochs E --seeds 0 1 2 --out DIR`` (``DIR/road.json``):
  ROAD MoRF/LeRF scores per method and seed and FullGrad against each method, paired over the seeds (thesis Fig.
  3.2b: FullGrad removes the class evidence fastest).

The trend of a claim is :func:`gradjax.statistics.paired_comparison` of its per-seed differences at the last budget
against those at the first (same seeds): ``toward thesis`` (the difference in the thesis's direction grew), ``away
from thesis`` (it shrank) or ``no significant change``.

    python -m experiments.budget_axis --kind table3_2 --out docs/results/ch3_table3_2_budgets.json \\
        runs/c3/pp_e1 runs/c3/pp_e4 runs/c3/pp_e8
    python -m experiments.budget_axis --kind road --out docs/results/ch3_road_budgets.json \\
        runs/c3/road_e1 docs/results/ch3_road.json runs/c3/road_e8
    python -m experiments.budget_axis --kind road --out docs/results/ch3_road_budgets.json --markdown
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from gradjax.statistics import paired_comparison

KINDS = {"table3_1": "results_seeds.json", "table3_2": "results_seeds.json", "road": "road.json"}
AXES = ("epochs", "width")
DIRECTION = {"a>b": "toward thesis", "a<b": "away from thesis", "tie": "no significant change"}


def _load(path: str, kind: str) -> dict:
    file = os.path.join(path, KINDS[kind]) if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ValueError(f"{path}: no {KINDS[kind]} (a {kind} run directory or its JSON file is expected).")
    with open(file) as f:
        return json.load(f)


def _budget_table3_2(raw: dict) -> dict:
    if not raw.get("table_3_2_paired"):
        raise ValueError("a table3_2 budget needs fullgrad_digits --seeds (>= 2 seeds) with Table 3.2 "
                         "(--pixel-perturbation-only or the full run).")
    return {"epochs": raw["epochs"], "width": raw["width"], "seeds": raw["seeds"],
            "test_accuracy": raw["test_accuracy"], "table_3_2": raw["table_3_2"], "paired": raw["table_3_2_paired"]}


def _budget_table3_1(raw: dict) -> dict:
    if not raw.get("table_3_1_paired_noabs"):
        raise ValueError("a table3_1 budget needs fullgrad_digits --seeds (>= 2 seeds) with Table 3.1.")
    return {"epochs": raw["epochs"], "width": raw["width"], "seeds": raw["seeds"],
            "test_accuracy": raw["test_accuracy"], "num_eights": raw["num_eights"], "table_3_1": raw["table_3_1"],
            "paired": {"fullgrad_noabs vs": raw["table_3_1_paired_noabs"]}}


def _budget_road(raw: dict) -> dict:
    return {"epochs": raw["epochs"], "width": raw["width"], "seeds": raw["seeds"], "n_test": raw["n_test"],
            "fractions": raw["fractions"], "clean_accuracy": raw["clean_accuracy"],
            "score_per_seed": {o: {m: st["score_per_seed"] for m, st in ms.items()} for o, ms in raw["road"].items()},
            "mean_curve": {o: {m: st["mean"] for m, st in ms.items()} for o, ms in raw["road"].items()},
            "paired": raw["paired_vs_fullgrad"]}


def collect(paths: Sequence[str], kind: str, *, axis: str = "epochs") -> dict:
    """One summary of ``kind`` from the budgets' runs, in the order given (increasing ``axis`` is checked; the
    other of epochs / width must be the same in every budget)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}; got {kind!r}.")
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}; got {axis!r}.")
    if len(paths) < 2:
        raise ValueError("a budget axis needs >= 2 budgets (the issue asks for >= 3).")
    one = {"table3_1": _budget_table3_1, "table3_2": _budget_table3_2, "road": _budget_road}[kind]
    budgets = [one(_load(p, kind)) for p in paths]
    epochs = [b[axis] for b in budgets]
    if epochs != sorted(epochs) or len(set(epochs)) != len(epochs):
        raise ValueError(f"give the budgets in increasing --{axis} order, each once; got {axis} {epochs}.")
    fixed = [b[AXES[1 - AXES.index(axis)]] for b in budgets]
    if len(set(fixed)) != 1:
        raise ValueError(f"along the {axis} axis the other budget ({AXES[1 - AXES.index(axis)]}) must not change; "
                         f"got {fixed}.")
    seeds = [b["seeds"] for b in budgets]
    if any(s != seeds[0] for s in seeds):
        raise ValueError(f"every budget must use the same seeds (paired over budgets); got {seeds}.")
    first, last = budgets[0]["paired"], budgets[-1]["paired"]

    def trend_of(claim: str, col: str) -> dict:
        pc = paired_comparison(last[claim][col]["differences"], first[claim][col]["differences"])
        return {**pc.as_dict(), "direction": DIRECTION[pc.verdict]}

    trend = {claim: {col: trend_of(claim, col) for col in last[claim]} for claim in last}
    return {"kind": kind, "axis": axis, "sources": list(paths), axis: epochs, "seeds": seeds[0], "budgets": budgets,
            "trend": {f"from_{axis}": epochs[0], f"to_{axis}": epochs[-1], "claims": trend}}


def _table(header, rows) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def _mean_std(values, digits: int) -> str:
    """``"mean ± sample std"`` of per-seed values."""
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _cell(p: dict, digits: int) -> str:
    return f"{p['mean']:+.{digits}f} (t {p['t']:.2f}, {p['verdict']})"


def markdown(summary: dict) -> str:
    """RESULTS' tables, generated from the summary: values per budget (mean ± sample std over seeds), then every
    claim's paired difference at every budget and its trend first → last."""
    b0 = summary["budgets"][0]
    axis = summary.get("axis", "epochs")
    unit = " ep." if axis == "epochs" else ""
    if summary["kind"] == "table3_1":
        methods = list(b0["table_3_1"])
        vals = [[f"{b[axis]}", f"{100 * np.mean(b['test_accuracy']):.1f}"]
                + [_mean_std(b["table_3_1"][m], 2) for m in methods]
                for b in summary["budgets"]]
        first = _table([axis, "test accuracy %"] + methods, vals)
        digits, col_name = 2, "method"
    elif summary["kind"] == "table3_2":
        methods, rfs = list(b0["table_3_2"]), list(next(iter(b0["table_3_2"].values())))
        vals = [[f"{b[axis]}", rf] + [_mean_std(b["table_3_2"][m][rf], 3) for m in methods]
                for b in summary["budgets"] for rf in rfs]
        first = _table([axis, "RF"] + methods, vals)
        digits, col_name = 3, "RF"
    else:
        orders = list(b0["score_per_seed"])
        methods = list(b0["score_per_seed"][orders[0]])
        vals = [[f"{b[axis]}", o.upper()] + [_mean_std(b["score_per_seed"][o][m], 3) for m in methods]
                for b in summary["budgets"] for o in orders]
        first = _table([axis, "order"] + methods, vals)
        digits, col_name = 3, "method"
    names = [f"{b[axis]}{unit}" for b in summary["budgets"]]
    rows = []
    for claim, cols in summary["trend"]["claims"].items():
        for col, t in cols.items():
            rows.append([claim.upper() if summary["kind"] == "road" else claim, col]
                        + [_cell(b["paired"][claim][col], digits) for b in summary["budgets"]]
                        + [f"{t['direction']} ({t['mean']:+.{digits}f}, t {t['t']:.2f})"])
    header = ({"table3_1": ["claim"], "table3_2": ["claim"], "road": ["order"]}[summary["kind"]] + [col_name] + names
              + [f"trend {summary['trend'][f'from_{axis}']} → {summary['trend'][f'to_{axis}']}{unit}"])
    return first + "\n\n" + _table(header, rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="one run directory (or collected JSON) per budget, increasing epochs")
    p.add_argument("--kind", required=True, choices=sorted(KINDS))
    p.add_argument("--axis", default="epochs", choices=AXES, help="what changes between the budgets")
    p.add_argument("--out", required=True, help="the summary JSON (numbers only)")
    p.add_argument("--markdown", action="store_true", help="only print the RESULTS tables of --out")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if a.markdown:
        with open(a.out) as f:
            summary = json.load(f)
    else:
        summary = collect(a.runs, a.kind, axis=a.axis)
        summary["command"] = "python -m experiments.budget_axis " + " ".join(sys.argv[1:] if argv is None else argv)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
