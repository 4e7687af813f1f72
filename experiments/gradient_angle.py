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
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from experiments import common
from experiments import distill_fullgrad as DF
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
        r = {"student": student, "method": method, "n_per_class": n, "pairs": [list(q) for q in pairs],
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


if __name__ == "__main__":
    main()
