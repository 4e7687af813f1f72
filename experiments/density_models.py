"""Implicit density models I (thesis ch. 5, §5.5): baseline, score-matched, anti-score-matched and gradient-norm
regularized ResNet-18s (softplus β = 10), trained through the one engine (:mod:`gradjax.train`) with the
combinator's terms (:mod:`gradjax.losses.terms`, :mod:`gradjax.losses.score_matching`).

    python -m experiments.density_models --scale small --seeds 0 1 2 --out runs/density-small
    python -m experiments.density_models --scale paper --out runs/density-paper          # TFDS CIFAR-100, GPU/TPU

Recipe (the thesis gives none; the authors' code): SGD lr 0.1, momentum 0.9, weight decay 5e-4, lr ÷10 at 50 % and
75 % of the epochs (200 epochs, steps 100/150 at paper scale), batch 128, inputs in [0, 1] without normalization,
loss ``CE + λ · mean_b reg_b``. Regularizer settings, ``--preset``:

* ``thesis`` (default; PROTOCOLS "Decisions"): score-matching λ = 1e-3, μ = 1e-4, σ = 0.01 (one-sided Taylor, one
  probe); anti-score-matching λ = 1e-4, τ = 1000, σ = 1e-3; gradient norm λ = 1e-3;
* ``authors``: the authors' code — score-matching λ = 1e-5, μ = 1e-3 (the sweep's best), anti τ = 1e4.

``--estimator/--form/--num-probes`` switch the trace estimator (e.g. ``--form antithetic`` removes the hidden
gradient-norm penalty ``4μ/(Nσ²)‖∇f‖²`` of the one-sided form; :func:`gradjax.losses.score_matching.implied_regularizer`
reports the coefficients each run really applies). ``--bn-policy frozen|train`` picks the BatchNorm policy of the
extra passes (frozen moments: per-example traces, gradjax's default; train: the authors', each extra pass
normalized by its own batch moments; the running statistics are updated by the clean pass only).
``--augment-pad p`` trains on random crops of the zero-padded images (:mod:`gradjax.augment`: the authors'
``RandomCrop(padding=4)`` at 32 px, without their horizontal flip, which does not suit digits; ``p = 0``, the default,
trains on the images as they are). ``--authors-training`` is ``--bn-policy train --augment-pad <image size / 8>``:
the authors' training recipe at any scale (their 200 epochs are ``--epochs``). Every run also measures
the difference between the two policies' trace estimates on its final model (``bn_policy_gap``).

Output under ``--out``: ``<objective>/seed<k>/{checkpoints/, config.json, metrics.jsonl}`` (orbax checkpoints that
the evaluation experiments reuse through :func:`load_trained`), ``results.json`` and ``results.md``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from experiments.common import environment, markdown_table, write_results
from gradjax import augment as GA
from gradjax import data as gdata
from gradjax import density as D
from gradjax import model as gm
from gradjax import train as gtrain
from gradjax.losses import terms as LT
from gradjax.losses import score_matching as SM
from gradjax.models import create_model

OBJECTIVES = ("baseline", "score_matching", "anti_score_matching", "gradient_norm")

PRESETS: dict[str, dict[str, dict]] = {
    "thesis": {"baseline": {},
               "score_matching": dict(lam=1e-3, mu=1e-4, sigma=0.01),
               "anti_score_matching": dict(lam=1e-4, tau=1000.0, sigma=1e-3),
               "gradient_norm": dict(lam=1e-3)},
    "authors": {"baseline": {},
                "score_matching": dict(lam=1e-5, mu=1e-3, sigma=0.01),
                "anti_score_matching": dict(lam=1e-4, tau=1e4, sigma=1e-3),
                "gradient_norm": dict(lam=1e-3)},
}

THESIS_ACCURACY = {"baseline": 78.01, "score_matching": 72.20, "anti_score_matching": 74.87, "gradient_norm": 76.60}
"""Thesis §5.5, CIFAR-100 test accuracy (%) — reference values, not ours."""


SCALES = {  # extra: test examples of the gradient / trace diagnostics
    "smoke": common.Scale(model="resnet18", dataset="digits", image_size=16, width=1 / 16, epochs=1, batch_size=32,
                          lr=0.05, max_train=128, max_test=64, extra=dict(diag_examples=16)),
    "small": common.Scale(model="resnet18", dataset="mnist_digits", image_size=16, width=0.125, epochs=3,  # 2-core CPU
                          batch_size=128, lr=0.1, extra=dict(diag_examples=256)),
    "paper": common.Scale(model="resnet18", dataset="cifar100", image_size=32, width=1.0, epochs=200, batch_size=128,
                          lr=0.1, extra=dict(diag_examples=256)),
}
DensityScale = common.Scale  # the harness's one preset type


# ------------------------------------------------------------------------------------------------------ data
def load_raw_splits(scale: DensityScale, *, data_dir: Optional[str] = None, seed: int = 0):
    """Train/test splits with raw pixel values in [0, 1] (the authors' code does not normalize)."""
    if scale.dataset == "digits":
        tr = gdata.load_digits("train", size=scale.image_size, seed=seed, normalize=False)
        te = gdata.load_digits("test", size=scale.image_size, seed=seed, normalize=False)
    elif scale.dataset == "mnist_digits":
        rs = "pad" if scale.image_size >= 28 else "bilinear"
        tr = gdata.load_mnist_digits("train", size=scale.image_size, resize=rs, seed=seed, normalize=False)
        te = gdata.load_mnist_digits("test", size=scale.image_size, resize=rs, seed=seed, normalize=False)
    else:
        def raw(ds):
            z, o = np.zeros_like(ds.mean), np.ones_like(ds.std)
            return dataclasses.replace(ds, images=ds.denormalize(ds.images).astype(np.float32), mean=z, std=o)
        tr = raw(gdata.load_tfds(scale.dataset, "train", data_dir=data_dir, image_size=scale.image_size))
        te = raw(gdata.load_tfds(scale.dataset, "test", data_dir=data_dir, image_size=scale.image_size,
                                 normalize_with=(np.zeros(1, np.float32), np.ones(1, np.float32))))
    if scale.max_train:
        tr = tr.subset(np.arange(min(len(tr), scale.max_train)))
    if scale.max_test:
        te = te.subset(np.arange(min(len(te), scale.max_test)))
    return tr, te


# ------------------------------------------------------------------------------------------------ objectives
def objective_settings(objective: str, preset: str = "thesis", **overrides) -> dict:
    """The regularizer settings of ``objective`` under ``preset``, with non-None ``overrides`` applied."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}.")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}; got {preset!r}.")
    s = dict(PRESETS[preset][objective])
    s.update({k: v for k, v in overrides.items() if v is not None and (k in s or k in ("estimator", "form",
                                                                                          "num_probes"))})
    return s


def make_terms(objective: str, settings: dict) -> list:
    """``[cross_entropy(1), λ · regularizer]`` as combinator terms (weight decay lives in the optimizer)."""
    terms = [LT.cross_entropy_term(1.0)]
    s = dict(settings)
    lam = s.pop("lam", 0.0)
    trace = {k: s.pop(k) for k in ("estimator", "form", "num_probes") if k in s}
    if objective == "score_matching":
        terms.append(LT.score_matching_term(lam, mu=s["mu"], sigma=s["sigma"], **trace))
    elif objective == "anti_score_matching":
        terms.append(LT.anti_score_matching_term(lam, tau=s["tau"], sigma=s["sigma"], **trace))
    elif objective == "gradient_norm":
        terms.append(LT.gradient_norm_term(lam / 2, form="logit", name="gradient_norm"))  # ½‖∇f_y‖², §5.5
    return terms


def make_optimizer(lr: float, epochs: int, steps_per_epoch: int, *, weight_decay: float = 5e-4,
                   momentum: float = 0.9) -> optax.GradientTransformation:
    """The authors' SGD: lr ÷ 10 at 50 % and 75 % of training, momentum 0.9, coupled weight decay 5e-4."""
    return common.sgd_step_decay(lr, epochs * steps_per_epoch, (0.5, 0.75), momentum=momentum,
                                 weight_decay=weight_decay)


# ------------------------------------------------------------------------------------------------ diagnostics
@functools.partial(jax.jit, static_argnames=("apply_fn", "num_probes"))
def density_diagnostics(apply_fn, variables, x, y, key, *, num_probes: int = 8) -> dict:
    """Eval-mode per-example ``‖∇_x f_y‖²`` and Hutchinson ``tr ∇²_x f_y`` (batch means and medians):
    :func:`gradjax.density.gradient_trace_stats`, compiled per architecture."""
    return D.gradient_trace_stats(lambda z: apply_fn(variables, z, train=False), x, y, key, num_probes=num_probes)


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _batch_stat_correct(apply_fn, params, model_state, x, y):
    return jnp.sum(jnp.argmax(gm.apply_train(apply_fn, params, model_state, x)[0], -1) == y)


def batch_stat_accuracy(apply_fn, params, model_state, images, labels, *, batch_size: int = 250) -> float:
    """Test accuracy with BatchNorm normalizing by each test batch's own moments (not the running averages):
    separates a running-statistics mismatch from a worse classifier."""
    n = (len(images) // batch_size) * batch_size or len(images)
    bs = min(batch_size, n)
    correct = sum(int(_batch_stat_correct(apply_fn, params, model_state, jnp.asarray(images[i:i + bs]),
                                          jnp.asarray(labels[i:i + bs]))) for i in range(0, n, bs))
    return correct / n


_policy_traces = jax.jit(D.bn_policy_traces, static_argnames=("apply_fn", "num_probes", "sigma", "chunk"))


def bn_policy_gap(apply_fn, params, model_state, images, labels, key, *, batch_sizes=(8, 32, 128),
                  num_probes: int = 32, sigma: float = 0.01) -> list[dict]:
    """How far the authors' train-mode trace estimate is from the per-example (frozen-moments) trace.

    Same probes and the antithetic Taylor form for both (no first-order noise): ``frozen`` estimates
    ``tr ∇²_{x_b} f_{y_b}`` per example; ``train`` (each noisy batch normalized with its own moments) estimates,
    in its batch mean, the trace of the whole batch's summed logit, including cross-example terms. Returns per
    batch size: mean of each, the relative gap of the batch means, and the mean per-example |difference| relative
    to the mean |frozen trace|."""
    rows = []
    for bs in batch_sizes:
        if bs > len(images):
            continue
        x, y = jnp.asarray(images[:bs]), jnp.asarray(labels[:bs])
        t = jax.device_get(_policy_traces(apply_fn, params, model_state, x, y, key, num_probes=num_probes,
                                          sigma=sigma))
        g = D.trace_gap(t["frozen"], t["train"])
        rows.append({"batch_size": bs, "frozen_trace_mean": g["reference_mean"], "train_trace_mean": g["other_mean"],
                     "rel_gap_of_means": g["rel_gap_of_means"], "rel_per_example_diff": g["rel_per_example_diff"]})
    return rows


def authors_padding(image_size: int) -> int:
    """The crop padding of the authors' recipe scaled to ``image_size`` (4 pixels at 32: ``image_size // 8``)."""
    if int(image_size) <= 0:
        raise ValueError(f"image_size must be positive; got {image_size}.")
    return max(1, int(image_size) // 8)


# -------------------------------------------------------------------------------------------------- training
@dataclasses.dataclass
class RunConfig:
    objective: str
    seed: int
    settings: dict
    bn_policy: str
    model: str
    num_classes: int
    width: float
    activation: str
    beta: float
    image_shape: tuple
    dataset: str
    epochs: int
    batch_size: int
    lr: float
    input_range: tuple = (0.0, 1.0)
    augment_pad: int = 0


def _model_of(cfg: RunConfig):
    return create_model(cfg.model, cfg.num_classes, activation=cfg.activation, beta=cfg.beta, width=cfg.width)


def load_trained(run_dir: str):
    """``(model, state, config)`` of a finished (or diverged: the last good) run under ``run_dir`` — the checkpoint
    the evaluation experiments reuse. ``state.model()`` is the eval-mode :class:`gradjax.model.ModelHandle`."""
    with open(os.path.join(run_dir, "config.json")) as fh:
        d = json.load(fh)
    d["image_shape"] = tuple(d["image_shape"])
    d["input_range"] = tuple(d["input_range"])
    cfg = RunConfig(**d)
    model = _model_of(cfg)
    tx = make_optimizer(cfg.lr, cfg.epochs, 1)
    template = gtrain.create_train_state(model, tx, np.zeros((1, *cfg.image_shape), np.float32), seed=cfg.seed)
    ckpt = gtrain.Checkpointer(os.path.join(run_dir, "checkpoints"))
    state = ckpt.restore(template)
    ckpt.close()
    return model, state, cfg


class DensityRunner:
    """The chapter-5 objectives on one dataset, each through the one trainer of the harness
    (:class:`experiments.common.Trainer`, built on first use and kept, so every seed reuses one compilation; in a
    multi-process run it trains on the global mesh with per-process input). :meth:`run` trains one (objective,
    seed) with checkpoints and metrics under ``out`` and measures the trained model."""

    def __init__(self, scale: DensityScale, train_ds, test_ds, *, preset: str, bn_policy: str = "frozen",
                 overrides: Optional[dict] = None, progress: bool = False, augment_pad: int = 0):
        if int(augment_pad) < 0:
            raise ValueError(f"augment_pad must be >= 0; got {augment_pad}.")
        self.augment_pad = int(augment_pad)
        self.scale, self.train_ds, self.test_ds = scale, train_ds, test_ds
        self.preset, self.bn_policy, self.overrides, self.progress = preset, bn_policy, overrides or {}, progress
        self.bs = min(scale.batch_size, len(train_ds))
        self.steps_per_epoch = max(1, gdata.steps_per_epoch(train_ds, self.bs))
        self.model = create_model(scale.model, train_ds.num_classes, activation="softplus", beta=10.0,
                                  width=scale.width)
        self.tx = make_optimizer(scale.lr, scale.epochs, self.steps_per_epoch)
        self.init_fn = common.compiled_init(self.model)
        self._trainers: dict[str, common.Trainer] = {}

    def settings(self, objective: str) -> dict:
        """The regularizer settings of ``objective`` (preset and overrides)."""
        return objective_settings(objective, self.preset, **self.overrides)

    def trainer_for(self, objective: str) -> common.Trainer:
        """The compiled :class:`experiments.common.Trainer` of ``objective`` (built once)."""
        if objective not in self._trainers:
            loss_fn = LT.make_loss_fn(self.model.apply, make_terms(objective, self.settings(objective)),
                                           policy=self.bn_policy)
            loss_fn = GA.augmented_loss_fn(loss_fn, padding=self.augment_pad)
            self._trainers[objective] = common.Trainer(self.model, loss_fn, self.tx,
                                                       num_classes=self.train_ds.num_classes, batch_size=self.bs,
                                                       epochs=self.scale.epochs, init_fn=self.init_fn)
        return self._trainers[objective]

    def run(self, objective: str, seed: int, out: str, *, max_steps: Optional[int] = None) -> dict:
        """Train ``objective`` with ``seed`` (resuming from ``out/<objective>/seed<k>/checkpoints``) and return its
        row: test accuracy (running and batch statistics), cross-entropy, diagnostics, divergence."""
        sc, train_ds, test_ds = self.scale, self.train_ds, self.test_ds
        run_dir = os.path.join(out, objective, f"seed{seed}")
        os.makedirs(run_dir, exist_ok=True)
        cfg = RunConfig(objective, seed, self.settings(objective), self.bn_policy, sc.model, train_ds.num_classes,
                        sc.width, "softplus", 10.0, tuple(train_ds.image_shape), sc.dataset, sc.epochs, self.bs,
                        sc.lr, augment_pad=self.augment_pad)
        common.write_results(run_dir, dataclasses.asdict(cfg), stem="config")
        trainer = self.trainer_for(objective)
        t0 = time.time()
        diverged = None
        try:
            state = trainer.run(train_ds, seed=seed, eval_ds=test_ds, checkpoint_dir=os.path.join(run_dir, "checkpoints"),
                                log_path=os.path.join(run_dir, "metrics.jsonl"), progress=self.progress,
                                max_steps=max_steps, log_every=10)
        except gtrain.TrainingDivergedError as e:
            diverged = str(e)
            _, state, _ = load_trained(run_dir)
        seconds = time.time() - t0
        ev = trainer.evaluate(state, test_ds)
        local = common.local_copy(state)
        n = min(sc.diag_examples, len(test_ds))
        diag = jax.device_get(density_diagnostics(self.model.apply, local.variables, jnp.asarray(test_ds.images[:n]),
                                                  jnp.asarray(test_ds.labels[:n]), jax.random.PRNGKey(seed)))
        bs_acc = batch_stat_accuracy(self.model.apply, local.params, local.model_state, test_ds.images,
                                     test_ds.labels)
        result = {"objective": objective, "seed": seed, "test_accuracy": ev["accuracy"],
                  "test_accuracy_batch_stats": bs_acc,
                  "test_cross_entropy": ev["cross_entropy"], "steps": int(jax.device_get(local.step)),
                  "train_seconds": seconds, "diverged": diverged, "settings": cfg.settings, "run_dir": run_dir,
                  **{k: float(v) for k, v in diag.items()}}
        if objective == "score_matching":
            result["implied_regularizer"] = SM.implied_regularizer(
                mu=cfg.settings["mu"], sigma=cfg.settings["sigma"], num_probes=cfg.settings.get("num_probes", 1),
                estimator=cfg.settings.get("estimator", "taylor"), form=cfg.settings.get("form", "one_sided"))
        return result


# ------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = common.base_parser(__doc__.split("\n")[0], default_dataset=None, seeds="list",
                           overrides=("model", "width", "epochs", "batch_size", "lr"))
    p.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    p.add_argument("--preset", choices=sorted(PRESETS), default="thesis")
    p.add_argument("--bn-policy", choices=["frozen", "train"], default="frozen")
    p.add_argument("--augment-pad", type=int, default=0,
                   help="random crops of the images zero-padded by this many pixels (0: no augmentation)")
    p.add_argument("--authors-training", action="store_true",
                   help="the authors' recipe: --bn-policy train --augment-pad <image size / 8>")
    p.add_argument("--estimator", choices=SM.ESTIMATORS, default=None)
    p.add_argument("--form", choices=["one_sided", "antithetic", "control_variate"], default=None)
    p.add_argument("--num-probes", type=int, default=None)
    p.add_argument("--lam", type=float, default=None, help="override the preset's lambda")
    p.add_argument("--mu", type=float, default=None, help="override the preset's stability weight mu")
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--sigma", type=float, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--no-policy-gap", action="store_true", help="skip the BatchNorm-policy measurement")
    p.add_argument("--progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    base = SCALES[args.scale]
    scale = dataclasses.replace(base, **{k: v for k, v in dict(
        dataset=args.dataset, model=args.model, width=args.width, image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        max_train=args.max_train).items() if v is not None})
    out = args.out or os.path.join("runs", f"density-{scale.dataset}-{args.scale}")
    os.makedirs(out, exist_ok=True)
    train_ds, test_ds = load_raw_splits(scale, data_dir=args.data_dir)
    overrides = dict(lam=args.lam, mu=args.mu, tau=args.tau, sigma=args.sigma, estimator=args.estimator,
                     form=args.form, num_probes=args.num_probes)
    bn_policy, augment_pad = args.bn_policy, args.augment_pad
    if args.authors_training:
        bn_policy, augment_pad = "train", args.augment_pad or authors_padding(train_ds.image_shape[0])
    trainer = DensityRunner(scale, train_ds, test_ds, preset=args.preset, bn_policy=bn_policy,
                            overrides=overrides, progress=args.progress and not args.no_progress,
                            augment_pad=augment_pad)
    runs = []
    for objective in args.objectives:
        for seed in args.seeds or [args.seed]:
            r = trainer.run(objective, seed, out)
            print(json.dumps({k: r[k] for k in ("objective", "seed", "test_accuracy", "trace_mean",
                                                 "grad_sq_norm_mean", "train_seconds", "diverged")}), flush=True)
            runs.append(r)

    summary = {}
    for objective in args.objectives:
        acc = common.mean_std([r["test_accuracy"] for r in runs if r["objective"] == objective])
        summary[objective] = {"accuracy_mean": acc["mean"], "accuracy_std": acc["std"], "n": len(acc["runs"]), "thesis_cifar100": THESIS_ACCURACY[objective],
                              "trace_mean": float(np.mean([r["trace_mean"] for r in runs if r["objective"] == objective])),
                              "grad_sq_norm_mean": float(np.mean([r["grad_sq_norm_mean"] for r in runs
                                                                  if r["objective"] == objective]))}
    gap = None
    if not args.no_policy_gap and runs:
        last = runs[0]
        state = common.local_copy(load_trained(last["run_dir"])[1])
        gap = {"model": f"{last['objective']}/seed{last['seed']}",
               "rows": bn_policy_gap(trainer.model.apply, state.params, state.model_state, test_ds.images,
                                     test_ds.labels, jax.random.PRNGKey(0))}
    results = {"scale": scale.asdict(), "preset": args.preset, "bn_policy": bn_policy, "augment_pad": augment_pad,
               "overrides": {k: v for k, v in overrides.items() if v is not None}, "runs": runs, "summary": summary,
               "bn_policy_gap": gap, "environment": environment(),
               "command": common.command("density_models", argv)}
    rows = [[o, f"{100 * s['accuracy_mean']:.2f} ± {100 * s['accuracy_std']:.2f} (n={s['n']})",
             s["thesis_cifar100"], s["trace_mean"], s["grad_sq_norm_mean"]] for o, s in summary.items()]
    md = markdown_table(["objective", "test acc % (ours)", "thesis CIFAR-100 %", "mean tr H (test)",
                         "mean ||grad f_y||^2 (test)"], rows)
    if gap:
        md += "\n\nBatchNorm policy gap (" + gap["model"] + "):\n\n" + markdown_table(
            ["batch", "frozen tr mean", "train tr mean", "rel gap of means", "rel per-example diff"],
            [[g["batch_size"], g["frozen_trace_mean"], g["train_trace_mean"], g["rel_gap_of_means"],
              g["rel_per_example_diff"]] for g in gap["rows"]])
    write_results(out, results, md)
    print(md)
    return results


if __name__ == "__main__":
    main()
