"""Thesis Fig. 4.1: the angle between teacher and student input-gradients during distillation (§4.4.1, L1395–1409).

* **(a)** student VGG-11, 5 examples per class (thesis: CIFAR-100, 5 per class), objectives ``iG`` (CE + input-
  gradient matching), ``FG`` (= iG + bias-gradient matching, "iG+FG") and ``iG+Att``, the input-gradient weight
  unchanged (10) in all three. The thesis: with iG alone the angle "hardly drops below 85°" on the training set;
  adding bias-gradient or attention matching lowers it.
* **(b)** students VGG-4, VGG-6, VGG-11 with full-gradient matching (``FG``) at 50 per class; the thesis reports
  test accuracies 50.87 / 58.08 / 62.95 % and better alignment for the larger student.

The angle is ``arccos`` of the cosine between the correct-class logit's input-gradients of the student (frozen-
moments pass) and of the teacher (eval mode), per training example, averaged over the training batches between
log points (:func:`experiments.distill_fullgrad.gradient_angle_term`, a metric-only term: weight 0, no
gradient). Teacher, objectives, layer pairs and optimizer are those of :mod:`experiments.distill_fullgrad`
(same presets, same cached teacher), every run through the one engine.

    python -m experiments.gradient_angle --scale smoke|small|paper [--parts a,b] [--seeds S] [--out DIR]
    python -m experiments.gradient_angle sweep --out SUMMARY.json --budget "x1=A_RESULTS,B_RESULTS" ... [--markdown]

``sweep`` (issue 24): Fig. 4.1 over several student budgets — one run per budget with the same seeds (panel (a)
from this script or from ``distill_fullgrad --angle iG,FG,iG+Att``, whose runs are Table 4.1's; panel (b) from this
script with ``--parts b``); :func:`sweep_summary` pairs the per-seed final angles and test accuracies of every
thesis claim (:data:`SWEEP_CLAIMS`) with :func:`gradjax.statistics.paired_comparison` at each budget, and the
trend first -> last budget as in :mod:`experiments.scale_sweep`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone

import numpy as np

from experiments import common
from experiments import distill_fullgrad as DF
from experiments.scale_sweep import trend as _trend
from gradjax.statistics import paired_comparison
from gradjax import data as gdata
from gradjax.models import create_model

FIG_A_METHODS = ("iG", "FG", "iG+Att")
FIG_B_STUDENTS = ("vgg4", "vgg6", "vgg11")
FIG_N = {"smoke": (2, 2), "small": (5, 50), "paper": (5, 50)}  # (a, b) examples per class
THESIS_B = {"vgg4": 50.87, "vgg6": 58.08, "vgg11": 62.95}  # Fig. 4.1b text, CIFAR-100, 50 per class (reference)


def _curve(records) -> tuple[list, list]:
    pts = [(r["step"], r["term/angle"]) for r in records if "term/angle" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(path: str, curves: dict, *, title: str) -> None:
    """Angle (degrees) vs training step, mean ± std band over seeds, one line per entry of ``curves``
    (``{name: {"steps": [...], "runs": [[...] per seed]}}``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        a = np.asarray(c["runs"], float)
        m, s = a.mean(0), common.sample_std(a, 0)
        ax.plot(c["steps"], m, marker="o", ms=3, label=name)
        ax.fill_between(c["steps"], m - s, m + s, alpha=0.15)
    ax.axhline(85.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("training step")
    ax.set_ylabel("angle(grad_x student, grad_x teacher) (deg)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    argv_ = list(sys.argv[1:] if argv is None else argv)
    if argv_[:1] == ["sweep"]:
        return sweep_main(argv_[1:])
    p = common.base_parser(__doc__.splitlines()[0], default_dataset=None, seeds="count", overrides=("steps", "batch_size"))
    p.add_argument("--student-steps", type=int, default=None, help="the students' step budget only (the cached "
                   "teacher keeps --steps / the scale's)")
    p.add_argument("--parts", default="a,b", help="which panels: a, b or a,b")
    p.add_argument("--methods", default=",".join(FIG_A_METHODS), help="panel (a) objectives (distill_fullgrad "
                   "method names)")
    p.add_argument("--students", default=",".join(FIG_B_STUDENTS), help="panel (b) student architectures")
    p.add_argument("--teacher-cache", default=None, help="as in experiments.distill_fullgrad")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if not parts or any(s not in ("a", "b") for s in parts):
        raise ValueError(f"--parts must list 'a' and/or 'b'; got {args.parts!r}.")
    methods = common.parse_methods(args.methods, DF.METHODS)
    students = [m.strip().lower() for m in args.students.split(",")]
    pre, dataset, seeds, out = common.setup(args, DF.PRESETS, "gradient_angle")
    t0 = time.time()

    train, test = common.load(dataset, data_dir=args.data_dir, max_test=pre.max_test)
    K = train.num_classes
    t_steps = DF.steps_for(pre, len(train), pre.teacher_steps, args.steps)
    cache = args.teacher_cache or (None if args.scale == "smoke" else os.path.join("runs", "ch4_teachers"))
    teacher_model, teacher_vars, teacher_acc = DF.train_teacher(pre, dataset, train, test, steps=t_steps,
                                                                cache_dir=cache)
    print(f"teacher {pre.teacher} test accuracy {100 * teacher_acc:.2f} % ({time.time() - t0:.0f} s)", flush=True)
    frozen = {"teacher": teacher_vars}
    n_a, n_b = FIG_N[args.scale]

    def run(student: str, method: str, n: int) -> dict:
        model = create_model(student, K, width=pre.width)
        pairs = DF.layer_pairs(model, teacher_model, teacher_vars, train.images[:2])
        accs, curves, terms, steps_axis, steps = [], [], {}, None, None
        trainer = None
        for s in range(seeds):
            sub = gdata.n_per_class_subset(train, n, seed=s)
            steps = DF.steps_for(pre, len(sub), pre.student_steps, args.student_steps or args.steps)
            if trainer is None or trainer.steps != steps:
                trainer = DF.student_trainer(model, teacher_model, method, pairs, pre=pre, steps=steps,
                                             num_classes=K, angle=True)
            st = trainer.run(sub, seed=s, frozen=frozen)
            accs.append(common.accuracy(model.apply, st.variables, test)[0])
            steps_axis, c = _curve(trainer.last_records)
            curves.append(c)
            for k in trainer.last_records[-1]:
                if k.startswith("term/") and k != "term/angle" or k == "accuracy":
                    terms.setdefault(k, []).append([r.get(k) for r in trainer.last_records])
        r = {"student": student, "method": method, "n_per_class": n, "student_steps": steps,
             "pairs": [list(q) for q in pairs],
             "steps": steps_axis, "runs": curves, "train_curves": terms,
             "final_angle": common.mean_std([c[-1] for c in curves]),
             "test_accuracy": common.mean_std(accs)}
        trend = ", ".join(f"{k} {np.mean([c[0] for c in v]):.3g} -> {np.mean([c[-1] for c in v]):.3g}"
                          for k, v in terms.items())
        print(f"{student} {method:7s} n={n}: final angle {r['final_angle']['mean']:.1f} ± "
              f"{r['final_angle']['std']:.1f} deg, test {common.fmt(r['test_accuracy'])}  ({time.time() - t0:.0f} s); "
              f"train {trend}", flush=True)
        return r

    res = {"figure": "4.1", "scale": args.scale, "dataset": dataset, "teacher": pre.teacher,
           "teacher_accuracy": teacher_acc, "width": pre.width, "seeds": seeds, "batch_size": pre.batch_size,
           "weight": DF.WEIGHT, "optimizer": f"adam {pre.lr} -> {pre.lr / 10} at {pre.drop_at:.0%} of steps",
           "a": {}, "b": {}}
    lines = []
    if "a" in parts:
        for m in methods:
            res["a"][m] = run(pre.model, m, n_a)
            common.write_results(out, {**res, "partial": True}, "partial\n")
        plot_curves(os.path.join(out, "fig4_1a.png"), res["a"],
                    title=f"(a) {pre.model} student, {n_a}/class, {dataset}")
        rows = [[m, f"{r['final_angle']['mean']:.1f} ± {r['final_angle']['std']:.1f}",
                 f"{min(np.mean(r['runs'], 0)):.1f}", common.fmt(r["test_accuracy"])] for m, r in res["a"].items()]
        lines.append(f"Fig. 4.1a — {dataset}, teacher {pre.teacher} ({100 * teacher_acc:.2f} %), student "
                     f"{pre.model}, {n_a} per class, {seeds} seed(s)\n\n"
                     + common.markdown_table(["objective", "final angle (deg)", "min of mean curve (deg)", "test acc %"],
                                     rows) + "\n\nThesis: iG alone stays above 85 deg; iG+FG and iG+Att go lower.")
    if "b" in parts:
        for stu in students:
            prev = res["a"].get("FG")
            if prev is not None and stu == pre.model and n_b == n_a:
                res["b"][stu] = prev
            else:
                res["b"][stu] = run(stu, "FG", n_b)
            common.write_results(out, {**res, "partial": True}, "partial\n")
        plot_curves(os.path.join(out, "fig4_1b.png"), res["b"],
                    title=f"(b) FG matching, {n_b}/class, {dataset}, teacher {pre.teacher}")
        rows = [[s, f"{r['final_angle']['mean']:.1f} ± {r['final_angle']['std']:.1f}", common.fmt(r["test_accuracy"]),
                 f"{THESIS_B[s]:.2f}" if s in THESIS_B else "—"] for s, r in res["b"].items()]
        lines.append(f"Fig. 4.1b — FG students, {n_b} per class, {seeds} seed(s)\n\n"
                     + common.markdown_table(["student", "final angle (deg)", "test acc %", "thesis acc % (CIFAR-100)"],
                                     rows))
    res["wall_s"] = time.time() - t0
    res["environment"] = common.environment()
    res["command"] = "python -m experiments.gradient_angle " + " ".join(argv if argv is not None else sys.argv[1:])
    table = "\n\n".join(lines)
    common.write_results(out, res, table)
    print(table)
    return res


# ---------------------------------------------------------------------------------- budget sweep (issue 24)
ANGLE_FLOOR = 85.0  # L1397: with iG alone "the cosine angle hardly drops below 85°"
SWEEP_CLAIMS = (  # (panel, quantity, a, b): the thesis's claim "a's quantity exceeds b's" (b may be a constant)
    ("a", "angle", "iG", ANGLE_FLOOR),      # iG alone stays above 85° (L1397)
    ("a", "angle", "iG", "FG"),             # adding bias-gradient matching lowers the angle (L1398)
    ("a", "angle", "iG", "iG+Att"),         # adding attention matching lowers the angle (L1398)
    ("b", "accuracy", "vgg11", "vgg6"),     # larger students are better (L1401: 62.95 > 58.08 > 50.87 %)
    ("b", "accuracy", "vgg6", "vgg4"),
    ("b", "accuracy", "vgg11", "vgg4"),
    ("b", "angle", "vgg6", "vgg11"),        # ... and better aligned: smaller angle for the larger student
    ("b", "angle", "vgg4", "vgg6"),
)


def claim_name(panel: str, quantity: str, a: str, b) -> str:
    """``"b accuracy: vgg11>vgg6"`` — the key of one :data:`SWEEP_CLAIMS` entry in the summary."""
    return f"{panel} {quantity}: {a}>{b:g}" if isinstance(b, (int, float)) else f"{panel} {quantity}: {a}>{b}"


def panel_rows(res: dict, panel: str) -> tuple[dict, int, int]:
    """``({row: {"angle": [...], "accuracy": [...]}}, n per class, student steps)`` of one run's results: per seed,
    the final logged angle (deg) and the test accuracy (%). ``res``: this script's results (``res[panel]``) or, for
    panel (a), a :mod:`experiments.distill_fullgrad` run with ``--angle`` (its ``final_angle``; its only n must
    be :data:`FIG_N`'s panel-(a) n of the run's scale)."""
    if res.get(panel):
        rows = {row: {"angle": [float(c[-1]) for c in r["runs"]], "accuracy": [100 * a for a in r["test_accuracy"]["runs"]]}
                for row, r in res[panel].items()}
        r0 = next(iter(res[panel].values()))
        return rows, int(r0["n_per_class"]), int(r0["student_steps"])
    if panel == "a" and res.get("final_angle"):
        n = FIG_N[res["scale"]][0]
        if n not in [int(k) for k in res["n_per_class"]]:
            raise ValueError(f"panel (a) needs n = {n} per class; the run has {res['n_per_class']}.")
        cell = lambda cols: {str(k): v for k, v in cols.items()}[str(n)]["runs"]  # int keys in memory, str in JSON
        rows = {m: {"angle": list(cell(cols)), "accuracy": [100 * a for a in cell(res["results"][m])]}
                for m, cols in res["final_angle"].items()}
        (steps,) = res["student_steps"]
        return rows, n, int(steps)
    raise ValueError(f"no panel ({panel}) in these results (keys: {sorted(res)}).")


def sweep_summary(budgets: dict, *, sources: dict | None = None, claims=SWEEP_CLAIMS) -> dict:
    """Fig. 4.1 over student budgets. ``budgets``: ``{name: {"a": results or None, "b": results or None}}`` in
    budget order (same seeds at every budget). For each budget and claim ``(panel, quantity, a, b)``: the
    paired comparison (:func:`gradjax.statistics.paired_comparison`) of the per-seed values of ``a`` against ``b``
    (angles in degrees, accuracies in percentage points; a constant ``b`` is compared seed by seed); the trend of
    each claim is the paired comparison of its per-seed differences at the last budget that has it against the
    first (:func:`experiments.scale_sweep.trend`: "toward thesis" when ``a - b`` grew)."""
    out = {"figure": "4.1", "claims": [claim_name(*c) for c in claims], "budgets": {}, "trend": {},
           "units": "angles in degrees (final logged value), accuracies in % (test); differences a - b in those units",
           "angle_floor": ANGLE_FLOOR, "written_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for name, panels in budgets.items():
        b = {"student_steps": None, "sources": (sources or {}).get(name, {}), "paired": {}}
        for panel in ("a", "b"):
            if panels.get(panel) is None:
                continue
            rows, n, steps = panel_rows(panels[panel], panel)
            if b["student_steps"] not in (None, steps):
                raise ValueError(f"budget {name}: panels ran {b['student_steps']} and {steps} student steps.")
            b["student_steps"] = steps
            b["teacher_accuracy"] = panels[panel]["teacher_accuracy"]
            b[panel] = {"n_per_class": n, "rows": {r: {q: common.mean_std(v) for q, v in d.items()}
                                                   for r, d in rows.items()}}
            for c in claims:
                if c[0] != panel or c[2] not in rows or not (isinstance(c[3], (int, float)) or c[3] in rows):
                    continue
                va = rows[c[2]][c[1]]
                vb = [float(c[3])] * len(va) if isinstance(c[3], (int, float)) else rows[c[3]][c[1]]
                b["paired"][claim_name(*c)] = paired_comparison(va, vb).as_dict()
        out["budgets"][name] = b
    names = list(out["budgets"])
    for cl in out["claims"]:
        have = [nm for nm in names if cl in out["budgets"][nm]["paired"]]
        out.setdefault("gap_by_budget", {})[cl] = {nm: round(out["budgets"][nm]["paired"][cl]["mean"], 2) for nm in have}
        if len(have) >= 2:
            out["trend"][cl] = {"from": have[0], "to": have[-1],
                                **_trend(out["budgets"][have[0]]["paired"][cl], out["budgets"][have[-1]]["paired"][cl])}
    return out


def sweep_markdown(summary: dict) -> str:
    """The RESULTS tables of a :func:`sweep_summary`: per budget and row, the per-seed final angles, angle and
    test accuracy (mean ± sample std); then every claim's paired difference a − b at every budget and its trend."""
    names = list(summary["budgets"])

    def table(header, rows):
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(map(str, r)) + " |" for r in rows])

    parts = []
    for panel, label in (("a", "objective"), ("b", "student")):
        rows = []
        for nm in names:
            bud = summary["budgets"][nm]
            if panel not in bud:
                continue
            for r, v in bud[panel]["rows"].items():
                rows.append([f"{nm} ({bud['student_steps']})", bud[panel]["n_per_class"], r,
                             " / ".join(f"{x:.1f}" for x in v["angle"]["runs"]),
                             f"{v['angle']['mean']:.1f} ± {v['angle']['std']:.1f}",
                             f"{v['accuracy']['mean']:.1f} ± {v['accuracy']['std']:.1f}"])
        if rows:
            parts.append(table([f"({panel}) budget (steps)", "n", label, "final angle per seed (deg)",
                                "final angle (deg)", "test acc %"], rows))
    header = ["claim (thesis)"] + [f"{nm}: a − b (t, verdict)" for nm in names] + ["trend (mean, t)"]
    rows = []
    for cl in summary["claims"]:
        cells = []
        for nm in names:
            v = summary["budgets"][nm]["paired"].get(cl)
            cells.append("—" if v is None else f"{v['mean']:+.1f} ± {v['std']:.1f} (t {v['t']:.2f}, {v['verdict']})")
        t = summary["trend"].get(cl)
        rows.append([cl.replace(">", " > ")] + cells
                    + ["—" if t is None else f"{t['direction']} ({t['mean']:+.1f}, t {t['t']:.2f})"])
    parts.append(table(header, rows))
    return "\n\n".join(parts)


def sweep_main(argv) -> dict:
    """``sweep --out FILE --budget "NAME=A_RESULTS,B_RESULTS" ...`` (``-`` for a panel not run at that budget):
    write :func:`sweep_summary` of those results.json files to ``FILE``; ``--markdown``: print its tables only."""
    p = argparse.ArgumentParser(description="Fig. 4.1 budget sweep summary (paired statistics)")
    p.add_argument("--out", required=True, help="the summary JSON")
    p.add_argument("--budget", action="append", default=[], help="NAME=A_RESULTS,B_RESULTS in budget order")
    p.add_argument("--markdown", action="store_true", help="only print the RESULTS tables of --out")
    a = p.parse_args(argv)
    if a.markdown:
        with open(a.out) as f:
            summary = json.load(f)
        print(sweep_markdown(summary))
        return summary
    if not a.budget:
        raise ValueError("give at least one --budget NAME=A_RESULTS,B_RESULTS.")
    budgets, sources = {}, {}
    for text in a.budget:
        name, _, paths = text.partition("=")
        files = [q.strip() for q in paths.split(",")]
        if not name or len(files) != 2:
            raise ValueError(f"a budget is NAME=A_RESULTS,B_RESULTS ('-' for none); got {text!r}.")
        budgets[name], sources[name] = {}, {}
        for panel, f in zip("ab", files):
            if f != "-":
                with open(f) as fh:
                    budgets[name][panel] = json.load(fh)
                sources[name][panel] = budgets[name][panel].get("command", f)
    summary = sweep_summary(budgets, sources=sources)
    summary["command"] = "python -m experiments.gradient_angle sweep " + " ".join(argv)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(summary, f, indent=1, default=float)
    print(sweep_markdown(summary))
    return summary


if __name__ == "__main__":
    main()
