"""Chapter-3 budget axes (issue 25 item 4): collect per-budget multi-seed runs of one chapter-3 script into one
numbers-only JSON with the paired verdicts at every budget and their trend from the first budget to the last.

Two kinds of runs (each budget = one run directory, or an already-collected JSON file, at its own ``--epochs``):

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

KINDS = {"table3_2": "results_seeds.json", "road": "road.json"}
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


def _budget_road(raw: dict) -> dict:
    return {"epochs": raw["epochs"], "width": raw["width"], "seeds": raw["seeds"], "n_test": raw["n_test"],
            "fractions": raw["fractions"], "clean_accuracy": raw["clean_accuracy"],
            "score_per_seed": {o: {m: st["score_per_seed"] for m, st in ms.items()} for o, ms in raw["road"].items()},
            "mean_curve": {o: {m: st["mean"] for m, st in ms.items()} for o, ms in raw["road"].items()},
            "paired": raw["paired_vs_fullgrad"]}


def collect(paths: Sequence[str], kind: str) -> dict:
    """One summary of ``kind`` from the budgets' runs, in the order given (sorted by epochs is checked)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}; got {kind!r}.")
    if len(paths) < 2:
        raise ValueError("a budget axis needs >= 2 budgets (the issue asks for >= 3).")
    budgets = [(_budget_table3_2 if kind == "table3_2" else _budget_road)(_load(p, kind)) for p in paths]
    epochs = [b["epochs"] for b in budgets]
    if epochs != sorted(epochs) or len(set(epochs)) != len(epochs):
        raise ValueError(f"give the budgets in increasing --epochs order, each once; got epochs {epochs}.")
    seeds = [b["seeds"] for b in budgets]
    if any(s != seeds[0] for s in seeds):
        raise ValueError(f"every budget must use the same seeds (paired over budgets); got {seeds}.")
    first, last = budgets[0]["paired"], budgets[-1]["paired"]
    trend = {claim: {col: {**paired_comparison(last[claim][col]["differences"],
                                               first[claim][col]["differences"]).as_dict(),
                           "direction": DIRECTION[paired_comparison(last[claim][col]["differences"],
                                                                    first[claim][col]["differences"]).verdict]}
                     for col in last[claim]} for claim in last}
    return {"kind": kind, "sources": list(paths), "epochs": epochs, "seeds": seeds[0], "budgets": budgets,
            "trend": {"from_epochs": epochs[0], "to_epochs": epochs[-1], "claims": trend}}


def _table(header, rows) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def _cell(p: dict, digits: int) -> str:
    return f"{p['mean']:+.{digits}f} (t {p['t']:.2f}, {p['verdict']})"


def markdown(summary: dict) -> str:
    """RESULTS' tables, generated from the summary: values per budget (mean ± sample std over seeds), then every
    claim's paired difference at every budget and its trend first → last."""
    b0 = summary["budgets"][0]
    if summary["kind"] == "table3_2":
        methods, rfs = list(b0["table_3_2"]), list(next(iter(b0["table_3_2"].values())))
        vals = [[f"{b['epochs']}", rf] + [f"{np.mean(b['table_3_2'][m][rf]):.3f} ± {np.std(b['table_3_2'][m][rf], ddof=1):.3f}"
                                          for m in methods] for b in summary["budgets"] for rf in rfs]
        first = _table(["epochs", "RF"] + methods, vals)
        digits, col_name = 3, "RF"
    else:
        orders = list(b0["score_per_seed"])
        methods = list(b0["score_per_seed"][orders[0]])
        vals = [[f"{b['epochs']}", o.upper()] + [f"{np.mean(b['score_per_seed'][o][m]):.3f} ± "
                                                 f"{np.std(b['score_per_seed'][o][m], ddof=1):.3f}" for m in methods]
                for b in summary["budgets"] for o in orders]
        first = _table(["epochs", "order"] + methods, vals)
        digits, col_name = 3, "method"
    names = [f"{b['epochs']} ep." for b in summary["budgets"]]
    rows = []
    for claim, cols in summary["trend"]["claims"].items():
        for col, t in cols.items():
            rows.append([claim.upper() if summary["kind"] == "road" else claim, col]
                        + [_cell(b["paired"][claim][col], digits) for b in summary["budgets"]]
                        + [f"{t['direction']} ({t['mean']:+.{digits}f}, t {t['t']:.2f})"])
    header = (["claim" if summary["kind"] == "table3_2" else "order", col_name] + names
              + [f"trend {summary['trend']['from_epochs']} → {summary['trend']['to_epochs']} ep."])
    return first + "\n\n" + _table(header, rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="one run directory (or collected JSON) per budget, increasing epochs")
    p.add_argument("--kind", required=True, choices=sorted(KINDS))
    p.add_argument("--out", required=True, help="the summary JSON (numbers only)")
    p.add_argument("--markdown", action="store_true", help="only print the RESULTS tables of --out")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if a.markdown:
        with open(a.out) as f:
            summary = json.load(f)
    else:
        summary = collect(a.runs, a.kind)
        summary["command"] = "python -m experiments.budget_axis " + " ".join(sys.argv[1:] if argv is None else argv)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
