"""Thesis Tables 4.1 / 4.2: few-shot distillation with full-gradient matching (§4.2, eq. 4.3; §4.4).

Objectives (thesis §4.4.1: ``alpha CE + beta Act + gamma iGrad + delta biasGrad``, every active weight 10):
``CE``; ``Act`` = CE + squared error of the logits; ``iG`` = CE + squared error of the correct-class logit's
input-gradients; ``Att`` = CE + attention matching (eq. 2.8 with the channel-wise absolute sum, p = 1, PROTOCOLS
"Decisions"); ``iG+Att``; ``FG`` = CE + iG + bias-gradient matching (eq. 4.3, full-gradients = input-gradient +
bias-gradients); ``FG+Att``. Bias-gradient and attention layers: the earliest conv of each of three resolutions
of each model, paired by module path (:func:`gradjax.losses.fullgrad_matching.default_pairs`). Every run goes
through the one training engine (:func:`gradjax.losses.make_loss_fn` -> :func:`gradjax.train.jit_train_step`),
the teacher's variables passed as the step's ``frozen`` argument.

    python -m experiments.distill_fullgrad --scale smoke|small|paper [--dataset D] [--seeds S] [--out DIR]

``paper``: CIFAR-100 (Table 4.1; ``--dataset cifar10`` for Table 4.2 with its n grid 50 ... 5000), teacher VGG-9, student VGG-11, Adam
1e-3 -> 1e-4 at epoch 250 of 300, batch 128 (L1496). ``small``/``smoke``: embedded digits at 32x32, widths 1/16,
fixed step budgets (small: measured results in docs/RESULTS.md, "Chapter 4"). The trained teacher is stored in
``--teacher-cache`` (default ``runs/ch4_teachers``) and reused by :mod:`experiments.gradient_angle` (Fig. 4.1);
``--weight`` changes the matching weights for a sensitivity diagnostic (the thesis setting is 10).
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
from flax import serialization

from experiments import common
from gradjax import data as gdata
from gradjax import distributed as gdist
from gradjax import gradients as G
from gradjax.losses import terms as LT
from gradjax.losses import fullgrad_matching as FM
from gradjax.model import ModelHandle
from gradjax.models import create_model

WEIGHT = 10.0  # thesis §4.4.1: every active regularization constant is 10

METHODS = {
    "CE": ("ce",),
    "Act": ("ce", "act"),
    "iG": ("ce", "jac"),
    "Att": ("ce", "att"),
    "iG+Att": ("ce", "jac", "att"),
    "FG": ("ce", "jac", "fg"),
    "FG+Att": ("ce", "jac", "fg", "att"),
}

THESIS = {  # reference values (CIFAR-100 Table 4.1: n = 5/10/50/100/500; CIFAR-10 Table 4.2: 50/100/500/1000/5000)
    "cifar100": {"n": [5, 10, 50, 100, 500], "teacher": 66.82, "rows": {
        "CE": [7.45, 11.83, 40.88, 51.19, 69.95], "Act": [23.72, 37.22, 59.43, 63.91, 66.99],
        "iG": [27.27, 41.47, 61.83, 65.43, 66.92], "Att": [38.18, 46.39, 60.27, 64.28, 66.53],
        "iG+Att": [42.75, 51.16, 62.62, 65.38, 67.25], "FG": [35.15, 48.00, 62.88, 65.84, 66.83],
        "FG+Att": [47.11, 54.59, 63.20, 65.49, 66.65]}},
    "cifar10": {"n": [50, 100, 500, 1000, 5000], "teacher": 90.49, "rows": {
        "CE": [49.29, 59.93, 79.36, 83.87, 91.95], "Act": [55.43, 65.33, 85.44, 88.77, 92.47],
        "iG": [55.73, 67.22, 85.84, 89.30, 92.04], "Att": [68.11, 74.44, 85.88, 88.61, 91.20],
        "iG+Att": [70.83, 77.06, 86.51, 89.63, 90.68], "FG": [58.88, 69.42, 86.55, 89.76, 91.49],
        "FG+Att": [72.75, 78.71, 87.31, 89.87, 90.68]}},
}


PAPER_N_PER_CLASS = {"cifar100": (5, 10, 50, 100, 500),      # Table 4.1 (L1380)
                     "cifar10": (50, 100, 500, 1000, 5000)}   # Table 4.2 (L1415)


def n_per_class_grid(scale: str, dataset: str) -> tuple:
    """The default n-per-class grid of ``scale`` for ``dataset``: at paper scale the thesis's grid of that dataset
    (:data:`PAPER_N_PER_CLASS`: CIFAR-10 -> Table 4.2's 50 ... 5000), else the preset's."""
    if scale == "paper" and dataset in PAPER_N_PER_CLASS:
        return PAPER_N_PER_CLASS[dataset]
    return tuple(PRESETS[scale].n_per_class)


PRESETS = {  # model: the student; extra: teacher, n per class, step budgets (paper: epochs), lr drop point
    "smoke": common.Scale(model="vgg4", width=1 / 16, seeds=1, batch_size=8, lr=1e-3, max_test=64,
                          extra=dict(teacher="vgg4", n_per_class=(2,), teacher_steps=3, student_steps=2, drop_at=0.8)),
    "small": common.Scale(model="vgg11", width=1 / 16, seeds=2, batch_size=32, lr=1e-3,
                          extra=dict(teacher="vgg9", n_per_class=(5, 10, 50, 100), teacher_steps=800,
                                     student_steps=200, drop_at=0.8)),
    "paper": common.Scale(model="vgg11", width=1.0, seeds=2, batch_size=128, lr=1e-3, epochs=300, dataset="cifar100",
                          extra=dict(teacher="vgg9", n_per_class=(5, 10, 50, 100, 500), teacher_steps=0,
                                     student_steps=0, drop_at=250 / 300)),
}


def _terms(keys, pairs, weight: float = WEIGHT):
    make = {
        "ce": lambda: LT.cross_entropy_term(WEIGHT),
        "act": lambda: LT.activation_matching_term(weight),
        "jac": lambda: LT.jacobian_matching_term(weight),
        "att": lambda: LT.attention_matching_term(weight, pairs=pairs, p=1.0),
        "fg": lambda: LT.full_gradient_matching_term(weight, pairs=pairs),
    }
    return [make[k]() for k in keys]


def input_gradient_angle(student_grad: jax.Array, teacher_grad: jax.Array) -> jax.Array:
    """``arccos(<g_s, g_t> / (||g_s|| ||g_t||))`` in degrees per example (``[B, ...] -> [B]``; 90 for a zero
    gradient) — the quantity of thesis Fig. 4.1a."""
    a = student_grad.reshape(student_grad.shape[0], -1)
    b = teacher_grad.reshape(teacher_grad.shape[0], -1)
    den = jnp.linalg.norm(a, axis=1) * jnp.linalg.norm(b, axis=1)
    cos = jnp.where(den > 0, jnp.sum(a * b, axis=1) / jnp.where(den > 0, den, 1.0), 0.0)
    return jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))


def gradient_angle_term(name: str = "angle") -> LT.Term:
    """A metric-only term (weight 0, no gradient): the angle between the student's (frozen-moments pass) and the
    teacher's correct-class input-gradients on the training batch, logged as ``term/angle`` (thesis Fig. 4.1a)."""
    def fn(inp):
        gs = G.logit_gradient(inp.student, inp.x, inp.labels)
        gt = G.logit_gradient(inp.teacher, inp.x, inp.labels)
        return jax.lax.stop_gradient(input_gradient_angle(gs, gt))
    return LT.term(name, fn, 0.0)


def train_teacher(pre: common.Scale, dataset: str, train, test, *, steps: int, cache_dir=None):
    """``(teacher model, variables, test accuracy)``: ``pre.teacher`` trained with CE on the whole training split
    through the one engine; with ``cache_dir`` the variables are stored there (msgpack) and reused by later runs of
    the chapter-4 scripts with the same dataset, architecture, width and step budget."""
    K = train.num_classes
    model = create_model(pre.teacher, K, width=pre.width)
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"{dataset}-{pre.teacher}-w{pre.width:g}-{steps}steps-lr{pre.lr:g}.msgpack")
    if path and os.path.exists(path):
        template = common.compiled_init(model)(jax.random.PRNGKey(0), train.images[:2])
        with open(path, "rb") as f:
            variables = serialization.from_bytes(template, f.read())
        print(f"teacher loaded from {path}", flush=True)
    else:
        trainer = common.Trainer(model, LT.make_loss_fn(model.apply, [LT.cross_entropy_term()]),
                               common.adam_step_decay(pre.lr, steps, pre.drop_at), steps=steps,
                               batch_size=pre.batch_size, num_classes=K)
        variables = trainer.run(train, seed=1000).variables
        if path and gdist.is_main_process():
            os.makedirs(cache_dir, exist_ok=True)
            with open(path, "wb") as f:
                f.write(serialization.to_bytes(variables))
    return model, variables, common.accuracy(model.apply, variables, test)[0]


def layer_pairs(student_model, teacher_model, teacher_vars, x0) -> tuple:
    """The default (student, teacher) layer pairs (earliest conv of three resolutions, by module path)."""
    s_vars = student_model.init(jax.random.PRNGKey(0), x0, train=False)
    return FM.default_pairs(ModelHandle(student_model.apply, s_vars),
                            ModelHandle(teacher_model.apply, common.local_copy(teacher_vars)), x0)


def student_trainer(student_model, teacher_model, method: str, pairs, *, pre: common.Scale, steps: int, num_classes: int,
                    angle: bool = False, weight: float = WEIGHT, init_fn=None) -> common.Trainer:
    """One compiled trainer for ``method`` (:data:`METHODS`); ``angle=True`` adds :func:`gradient_angle_term`;
    ``weight``: of every matching term (CE keeps :data:`WEIGHT`); ``init_fn``: a shared
    :func:`experiments.common.compiled_init` of ``student_model``."""
    terms = _terms(METHODS[method], pairs, weight) + ([gradient_angle_term()] if angle else [])
    loss = LT.make_loss_fn(student_model.apply, terms, teacher_apply_fn=teacher_model.apply)
    return common.Trainer(student_model, loss, common.adam_step_decay(pre.lr, steps, pre.drop_at), steps=steps,
                          batch_size=pre.batch_size, num_classes=num_classes, init_fn=init_fn)


steps_for = common.step_budget  # the step budget: --steps, else the preset's epochs (paper), else a fixed budget


def main(argv=None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0], default_dataset=None, seeds="count", overrides=("steps", "batch_size"),
                           methods=METHODS, per_class=True)
    p.add_argument("--teacher-cache", default=None, help="directory to store/reuse the trained teacher (default: "
                   "runs/ch4_teachers, none at smoke scale)")
    p.add_argument("--student-steps", type=int, default=None, help="the students' step budget only (the teacher keeps "
                   "--steps / the scale's; for experiments.scale_sweep)")
    p.add_argument("--weight", type=float, default=WEIGHT, help="weight of every matching term (thesis: 10; CE "
                   "keeps 10) — for sensitivity diagnostics, reported beside the thesis setting")
    p.add_argument("--angle", default="", help="comma list of methods that also log Fig. 4.1a's teacher/student "
                   "input-gradient angle (a metric-only term); their per-seed final angles go to results.json "
                   "'final_angle' (so a Table 4.1 run doubles as Fig. 4.1a's)")
    args = p.parse_args(argv)
    angle_methods = set(common.parse_methods(args.angle, METHODS)) if args.angle.strip() else set()
    t0 = time.time()
    if args.n_per_class is None:  # --dataset cifar10 at paper scale: Table 4.2's grid
        args.n_per_class = ",".join(map(str, n_per_class_grid(args.scale, args.dataset or PRESETS[args.scale].dataset)))
    pre, dataset, seeds, out, methods, train, test, ns = common.setup_per_class(args, PRESETS, "distill_fullgrad", METHODS)
    K = train.num_classes

    t_steps = steps_for(pre, len(train), pre.teacher_steps, args.steps)
    cache = args.teacher_cache or (None if args.scale == "smoke" else os.path.join("runs", "ch4_teachers"))
    teacher_model, teacher_vars, teacher_acc = train_teacher(pre, dataset, train, test, steps=t_steps,
                                                             cache_dir=cache)
    print(f"teacher {pre.teacher} test accuracy {100 * teacher_acc:.2f} % ({time.time() - t0:.0f} s)", flush=True)

    student_model = create_model(pre.model, K, width=pre.width)
    pairs = layer_pairs(student_model, teacher_model, teacher_vars, train.images[:2])
    print(f"layer pairs (student, teacher): {pairs}", flush=True)
    student_init = common.compiled_init(student_model)
    frozen = {"teacher": teacher_vars}
    trainers, results, last_terms = {}, {m: {} for m in methods}, {m: {} for m in methods}
    final_angle = {m: {} for m in methods if m in angle_methods}  # per-seed angle at the last log point (deg)
    for n in ns:
        for m in methods:
            accs, pen = [], []
            for s in range(seeds):
                sub = gdata.n_per_class_subset(train, n, seed=s)
                steps = steps_for(pre, len(sub), pre.student_steps, args.student_steps or args.steps)
                key = (m, steps)
                if key not in trainers:
                    trainers[key] = student_trainer(student_model, teacher_model, m, pairs, pre=pre, steps=steps,
                                                    num_classes=K, weight=args.weight, init_fn=student_init,
                                                    angle=m in angle_methods)
                st = trainers[key].run(sub, seed=s, frozen=frozen)
                accs.append(common.accuracy(student_model.apply, st.variables, test)[0])
                rec = trainers[key].last_records
                pen.append({k: (rec[0][k], rec[-1][k]) for k in rec[-1] if k.startswith("term/") or k == "accuracy"})
            results[m][n] = common.mean_std(accs)
            if m in angle_methods:
                final_angle[m][n] = common.mean_std([p_["term/angle"][1] for p_ in pen])
            last_terms[m][n] = pen  # (first, last) logged train-batch value of each term, per seed
            print(f"n={n:4d} {m:8s} {common.fmt(results[m][n])}  ({time.time() - t0:.0f} s)", flush=True)
        common.write_results(out, {"partial": True, "results": results, "teacher_accuracy": teacher_acc}, "partial\n")

    header = ["per class"] + [str(n) for n in ns]
    rows = [[m] + [common.fmt(results[m][n]) for n in ns] for m in methods]
    ref = THESIS.get(dataset, THESIS["cifar100"])
    ref_name = dataset if dataset in THESIS else "cifar100"
    thesis_rows = [[f"{m} (thesis, {ref_name})"] + [f"{ref['rows'][m][ref['n'].index(n)]:.2f}" if n in ref["n"]
                                                      else "—" for n in ns] for m in methods]
    table = (f"Tables 4.1/4.2 — {dataset}, teacher {pre.teacher} ({100 * teacher_acc:.2f} %), student {pre.model}, "
             f"width {pre.width:g}, {seeds} seed(s), CE weight {WEIGHT:g}, matching weights {args.weight:g}, pairs {list(pairs)}, test accuracy % "
             f"(mean ± std)\n\n" + common.markdown_table(header, rows)
             + f"\n\nThesis ({ref_name}, teacher {ref['teacher']} %):\n\n" + common.markdown_table(header, thesis_rows))
    common.plot_lines(os.path.join(out, "table4_1.png"), ns, {m: [results[m][n] for n in ns] for m in methods},
                    xlabel="examples per class", ylabel="student test accuracy (%)", logx=True,
                    title=f"Full-gradient distillation ({dataset}, {pre.teacher}->{pre.model})")
    res = {"table": "4.1/4.2", "scale": args.scale, "dataset": dataset, "teacher": pre.teacher,
           "student": pre.model, "width": pre.width, "seeds": seeds, "n_per_class": ns,
           "teacher_accuracy": teacher_acc, "teacher_steps": t_steps, "pairs": [list(p_) for p_ in pairs],
           "student_steps": sorted({k[1] for k in trainers}), "batch_size": pre.batch_size, "weight": args.weight, "ce_weight": WEIGHT,
           "optimizer": f"adam {pre.lr} -> {pre.lr / 10} at {pre.drop_at:.0%} of steps", "results": results,
           "train_terms_first_last": last_terms, "final_angle": final_angle, "thesis": THESIS,
           "wall_s": time.time() - t0}
    return common.finish(out, res, table, script="distill_fullgrad", argv=argv)


if __name__ == "__main__":
    main()
