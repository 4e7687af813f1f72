"""Compact summary of an ``experiments.backdoor_calibrated`` run: ``docs/results/backdoor_calibrated.json`` (numbers
only) and the markdown tables of docs/RESULTS.md (section "Input-agnostic saliency and backdoor discovery").

    python -m experiments.backdoor_summary docs/results/backdoor_calibrated.json RUN/results.json [RUN2/results.json]

(several runs are merged head by head, later files replacing earlier heads; the paired comparisons recomputed;
the ROC figure goes to ``backdoor_roc.png`` in the parent folder of OUT.json's folder, i.e. ``docs/``).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from experiments import common

METHODS = {"input_agnostic": "IA", "neural_cleanse": "NC", "input_agnostic_area": "IA (success area)"}


def _mean(v):
    return float(np.mean(v)) if len(v) else None


def _best_at(v: dict, clean_scores, false_alarm: float) -> float:
    """The ROC's highest detection (right target) among thresholds whose false-alarm rate on the clean evaluated
    models is ``<= false_alarm`` (an oracle threshold: what the statistic allows, not what the calibrated rule
    achieved)."""
    from gradjax import backdoor as bd

    curve = bd.roc(v["scores"], v["suspect_is_target"], clean_scores)
    return float(np.max(curve.detection[curve.false_alarm <= false_alarm + 1e-12]))


def compact(res: dict) -> dict:
    out = {"dataset": res["dataset"], "scale": res["scale"], "false_alarm": res["false_alarm"],
           "radius": res["radius"], "total_seconds": res["total_seconds"], "heads": {},
           "comparisons": {k: {f: v[f] for f in ("n", "mean", "std", "t", "wins", "verdict")}
                           for k, v in res["comparisons"].items()}}
    for head, h in res["heads"].items():
        o = {"models": h["models"], "train_seconds": h["train_seconds"],
             "seconds_per_model": h["seconds_per_model"], "compile_seconds": h["compile_seconds"],
             "clean_accuracy": h["clean_accuracy"],
             "attack_success": {k: _mean(v) for k, v in h["attack_success"].items()},
             "moved_success": {k: _mean(v) for k, v in h["moved_success"].items()},
             "iou": {k: {m: _mean(v) for m, v in loc.items()} for k, loc in h["localization"].items()},
             "iou_ge_0.5": {k: {m: float(np.mean(np.asarray(v) >= 0.5)) for m, v in loc.items() if m != "chance_iou_area"}
                            for k, loc in h["localization"].items()},
             "decision": {}}
        for meth, d in h["decision"].items():
            o["decision"][meth] = {"mad2": d["fixed_mad_2"]}
            for rule in ("reference", "within"):
                r = d[rule]
                o["decision"][meth][rule] = {
                    "threshold": r["threshold"], "reference_false_alarm": r["reference_false_alarm"],
                    "clean_false_alarm": r["clean_false_alarm"], "reference_scores": r["reference_scores"],
                    "clean_scores": r["clean_scores"],
                    "kinds": {k: {**{f: v[f] for f in ("n", "detection", "auc", "scores", "suspect_is_target")},
                                  "best_detection_at_false_alarm": _best_at(v, r["clean_scores"], res["false_alarm"])}
                              for k, v in r["kinds"].items()}}
        cm = h["class_maps"]
        o["class_maps"] = {"own_accuracy": _mean(cm["own_accuracy"]), "cross_model_accuracy": _mean(cm["cross_model_accuracy"]),
                           "chance": cm["chance"], "cosine_same_class": _mean(cm["cosine_same_class_across_seeds"]),
                           "cosine_other_class": _mean(cm["cosine_other_class_across_seeds"]),
                           "same_vs_other": {f: cm["same_vs_other"][f] for f in ("n", "mean", "std", "t", "verdict")}
                           if cm["same_vs_other"] else None,
                           "fidelity": h["ia_fidelity_clean"]}
        out["heads"][head] = o
    return out


def tables(c: dict) -> str:
    f2 = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    rows = []
    for head, h in c["heads"].items():
        for meth, short in METHODS.items():
            if meth not in h["decision"]:
                continue
            for rule in ("reference", "within"):
                r = h["decision"][meth][rule]
                cells = [f"{head}", short, "per-class vs references" if rule == "reference" else "within-model MAD",
                         f"{r['threshold']:.2f}", f"{r['reference_false_alarm']:.2f}", f"{r['clean_false_alarm']:.2f}"]
                for k in ("corner", "random", "blend"):
                    v = r["kinds"].get(k)
                    cells.append("—" if v is None else f"{v['detection']:.2f} / {v['best_detection_at_false_alarm']:.2f} / "
                                 f"{v['auc']:.2f} (n={v['n']})")
                rows.append(cells)
    det = common.markdown_table(["head", "method", "score", "threshold", "FA refs", "FA clean eval",
                                 "corner: det. / best det. at FA <= 0.1 / AUC", "random: same", "blend: same"], rows)
    rows = []
    for head, h in c["heads"].items():
        for k in ("corner", "random", "blend"):
            i, g = h["iou"][k], h["iou_ge_0.5"][k]
            rows.append([head, k, f"{h['attack_success'][k]:.2f}", f2(h["moved_success"][k]) if k != "blend" else "—",
                         f"{i['ia_iou']:.2f}", f"{i['ia_iou_area']:.2f}", f"{g['ia_iou_area']:.2f}",
                         f"{i['nc_iou']:.2f}", f"{i['nc_iou_area']:.2f}", f"{g['nc_iou_area']:.2f}",
                         f"{i['chance_iou_area']:.2f}"])
    loc = common.markdown_table(["head", "trigger", "attack success", "mirrored-trigger success", "IA IoU (0.5 max)",
                                 "IA IoU (area)", "IA share >= 0.5", "NC IoU (0.5 max)", "NC IoU (area)",
                                 "NC share >= 0.5", "chance IoU (area)"], rows)
    rows = [[head, f"{h['clean_accuracy']['clean']:.3f}", f"{h['seconds_per_model']['input_agnostic']:.2f}",
             f"{h['seconds_per_model']['neural_cleanse']:.2f}",
             f"{h['seconds_per_model']['input_agnostic'] / h['seconds_per_model']['neural_cleanse']:.2f}",
             f"{h['train_seconds']:.0f}"] for head, h in c["heads"].items()]
    tim = common.markdown_table(["head", "clean accuracy (eval)", "IA s / model", "NC s / model", "IA / NC",
                                 "training s (all models)"], rows)
    rows = [[head, f"{m['own_accuracy']:.2f}", f"{m['cross_model_accuracy']:.2f}", f"{m['chance']:.2f}",
             f"{m['fidelity']:.2f}", f"{m['cosine_same_class']:.3f}", f"{m['cosine_other_class']:.3f}",
             m["same_vs_other"]["verdict"] if m["same_vs_other"] else "—"]
            for head, h in c["heads"].items() for m in [h["class_maps"]]]
    maps = common.markdown_table(["head", "own accuracy on maps", "other seeds' accuracy on maps", "chance",
                                  "fidelity", "cos same class, across seeds", "cos other class, across seeds",
                                  "paired verdict (same vs other)"], rows)
    rows = [[k, v["n"], f"{v['mean']:.3f}", f"{v['t']:.2f}", v["wins"], v["verdict"]] for k, v in c["comparisons"].items()]
    comp = common.markdown_table(["comparison (a vs b, same seeds)", "n", "mean a - b", "t", "wins of a", "verdict"],
                                 rows)
    return "\n\n".join([det, loc, tim, maps, comp])


def plot_roc(c: dict, path: str) -> None:
    """ROC curves (detected with the right target vs false alarms on the clean evaluated models) of every head x
    method, both scoring rules (solid: per-class vs references; dashed: within-model MAD), one colour per trigger."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from gradjax import backdoor as bd

    heads = list(c["heads"])
    fig = Figure(figsize=(6.6, 3.0 * len(heads)))
    FigureCanvasAgg(fig)
    colours = {"corner": "C0", "random": "C1", "blend": "C2"}
    for i, head in enumerate(heads):
        for j, meth in enumerate(("input_agnostic", "neural_cleanse")):
            ax = fig.add_subplot(len(heads), 2, 2 * i + j + 1)
            for rule, ls in (("reference", "-"), ("within", "--")):
                r = c["heads"][head]["decision"][meth][rule]
                for kind, v in r["kinds"].items():
                    curve = bd.roc(v["scores"], v["suspect_is_target"], r["clean_scores"])
                    ax.step(curve.false_alarm, curve.detection, where="post", ls=ls, color=colours[kind],
                            label=f"{kind} {'ref' if rule == 'reference' else 'MAD'} ({curve.auc:.2f})")
            ax.axvline(c["false_alarm"], color="gray", lw=0.5, ls=":")
            ax.set_xlabel("false alarms (clean evaluated models)", fontsize=7)
            ax.set_ylabel("detected, right target", fontsize=7)
            ax.set_title(f"{METHODS[meth]}, {head} head", fontsize=8)
            ax.legend(fontsize=5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")


def merge(paths) -> dict:
    """One results dict from several runs of ``experiments.backdoor_calibrated`` (e.g. ``--heads flatten`` and
    ``--heads gap``): the heads of later files replace earlier ones; the paired comparisons are recomputed."""
    from experiments.backdoor_calibrated import _comparisons

    runs = [json.load(open(p)) for p in paths]
    res = dict(runs[0])
    res["heads"] = {}
    for r in runs:
        res["heads"].update(r["heads"])
    res["total_seconds"] = sum(r.get("total_seconds", 0.0) for r in runs)
    res["comparisons"] = _comparisons(res)
    return res


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        raise SystemExit("usage: python -m experiments.backdoor_summary OUT.json RUN/results.json [RUN2/results.json ...]")
    c = compact(merge(argv[1:]))
    with open(argv[0], "w") as f:
        json.dump(c, f, indent=1)
    plot_roc(c, os.path.join(os.path.dirname(os.path.abspath(argv[0])), "..", "backdoor_roc.png"))
    print(tables(c))


if __name__ == "__main__":
    main()
