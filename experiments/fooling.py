"""Fooling gradient explanations (thesis §5.7.2, Fig. 5.5): fine-tune a trained VGG with ``CE + λ L_fool`` (eq. 5.7)
so that its logit-gradients concentrate in a top-left square, then measure the share of the gradient energy
(``Σ_c |g|``) inside the square for logit-gradients, loss-gradients and loss-gradients at temperature T = 1e3.

    python -m experiments.fooling --scale small --out runs/fooling-small
    python -m experiments.fooling --scale paper --out runs/fooling-paper        # VGG-11, TFDS CIFAR-100

Thesis (CIFAR-100, VGG-11, 15×15 mask on 32×32 = 22 % of the pixels): logit-gradients 83.85 %, loss-gradients
48.14 %, loss-gradients at T = 1e3 60.17 % (reference values). The thesis gives neither λ nor the fine-tuning
schedule; ours (λ = 1e4, Adam 5e-4 for the fine-tuning) are in ``SCALES`` and recorded in ``results.json``. Phase 1 trains the classifier with cross-entropy (the
"pre-trained VGG"); phase 2 fine-tunes it through the engine with the combinator terms
``[cross_entropy_term(1), fooling_loss_term(λ, mask)]`` (the logit-gradient through the frozen-moments extra pass).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from experiments import common
from experiments.common import environment, markdown_table, write_results
from experiments.density_models import load_raw_splits
from gradjax import data as gdata
from gradjax import gradients as G
from gradjax import train as gtrain
from gradjax.losses import terms as LT
from gradjax.losses import fooling as F
from gradjax.models import create_model

THESIS = {"logit_gradient": 83.85, "loss_gradient": 48.14, "loss_gradient_T1e3": 60.17, "uniform": 22.0}


SCALES = {  # model: the fooled classifier; extra: the two phases' epochs, the fine-tuning's lr and weight, examples
    "smoke": common.Scale(model="vgg11", dataset="digits", image_size=32, width=1 / 16, batch_size=32, lr=0.05,
                          max_train=128, max_test=32, extra=dict(pretrain_epochs=1, finetune_epochs=1,
                                                                 finetune_lr=5e-4, lam=1e4, eval_examples=32)),
    "small": common.Scale(model="vgg11", dataset="mnist_digits", image_size=32, width=0.125, batch_size=128, lr=0.05,
                          extra=dict(pretrain_epochs=3, finetune_epochs=3, finetune_lr=5e-4, lam=1e4,
                                     eval_examples=1000)),
    "paper": common.Scale(model="vgg11", dataset="cifar100", image_size=32, width=1.0, batch_size=128, lr=0.1,
                          extra=dict(pretrain_epochs=200, finetune_epochs=20, finetune_lr=5e-4, lam=1e4,
                                     eval_examples=10000)),
}


@functools.partial(jax.jit, static_argnames=("apply_fn", "temperature"))
def _energy_fractions(apply_fn, variables, x, y, mask, *, temperature: float):
    handle = lambda z: apply_fn(variables, z, train=False)
    out = {"logit_gradient": F.energy_fraction(G.logit_gradient(handle, x, y), mask),
           "loss_gradient": F.energy_fraction(G.loss_gradient(handle, x, y), mask),
           "loss_gradient_T": F.energy_fraction(G.loss_gradient(handle, x, y, temperature=temperature), mask)}
    return {k: jnp.sum(v) for k, v in out.items()}


def energy_fractions(apply_fn, variables, images, labels, mask, *, temperature: float = 1e3,
                     batch_size: int = 128) -> dict:
    """Mean share (%) of ``Σ_c|g|`` inside ``mask`` over the examples, for the label's logit-gradient, the
    loss-gradient (T = 1) and the loss-gradient at ``temperature`` (thesis §5.7.2)."""
    tot = {"logit_gradient": 0.0, "loss_gradient": 0.0, "loss_gradient_T": 0.0}
    mask = jnp.asarray(mask)
    for i in range(0, len(images), batch_size):
        r = jax.device_get(_energy_fractions(apply_fn, variables, jnp.asarray(images[i:i + batch_size]),
                                             jnp.asarray(labels[i:i + batch_size]), mask, temperature=temperature))
        for k in tot:
            tot[k] += float(r[k])
    return {k: 100.0 * v / len(images) for k, v in tot.items()}


def _fit(model, loss_fn, tx, state, train_ds, test_ds, bs, epochs, out, name, seed, progress):
    """Train ``state`` with ``loss_fn`` through the harness's :class:`experiments.common.Trainer`; returns (state,
    final test evaluation)."""
    trainer = common.Trainer(model, loss_fn, tx, num_classes=train_ds.num_classes, batch_size=bs, epochs=epochs)
    state = trainer.run(train_ds, seed=seed, state=state, eval_ds=test_ds,
                        checkpoint_dir=os.path.join(out, name, "checkpoints"),
                        log_path=os.path.join(out, name, "metrics.jsonl"), progress=progress, log_every=10)
    return state, trainer.evaluate(state, test_ds)


def run(scale: common.Scale, out: str, *, seed: int = 0, lam: Optional[float] = None, activation: str = "relu",
        data_dir: Optional[str] = None, progress: bool = False, budgets: Optional[Sequence[int]] = None) -> dict:
    """Phase 1 and phase 2 for one seed. ``budgets``: fine-tuning epochs after which the energies and the accuracy
    are also measured (``by_budget``); the fine-tuning is one run (constant Adam lr), so the state after ``e``
    epochs is the state a run of ``finetune_epochs = e`` ends in. Default: ``(finetune_epochs,)``."""
    budgets = sorted(set(budgets or ())) or [scale.finetune_epochs]
    if budgets[0] < 1 or budgets[-1] != scale.finetune_epochs:
        raise ValueError(f"budgets must be >= 1 fine-tuning epochs and end at finetune_epochs = "
                         f"{scale.finetune_epochs}; got {budgets}.")
    lam = scale.lam if lam is None else lam
    sc = scale
    train_ds, test_ds = load_raw_splits(sc, data_dir=data_dir, seed=seed)
    H = train_ds.image_shape[0]
    mask = F.corner_mask(H)
    model = create_model(scale.model, train_ds.num_classes, activation=activation, width=sc.width)
    bs = min(sc.batch_size, len(train_ds))
    spe = max(1, gdata.steps_per_epoch(train_ds, bs))
    t0 = time.time()
    # phase 1: the "pre-trained" classifier (cross-entropy, SGD momentum, lr ÷10 at 50/75 %)
    tx = common.sgd_step_decay(sc.lr, scale.pretrain_epochs * spe, (0.5, 0.75), weight_decay=5e-4)
    ce_loss = LT.make_loss_fn(model.apply, [LT.cross_entropy_term(1.0)])
    state, ev0 = _fit(model, ce_loss, tx, None, train_ds, test_ds, bs, scale.pretrain_epochs, out, "pretrained",
                      seed, progress)
    state = common.local_copy(state)
    n = min(scale.eval_examples, len(test_ds))
    xs, ys = test_ds.images[:n], test_ds.labels[:n]
    before = energy_fractions(model.apply, state.variables, xs, ys, mask)
    t1 = time.time()
    # phase 2: fine-tune with CE + λ L_fool (a fresh Adam on the pre-trained weights: scale-free in λ)
    tx2 = optax.adam(scale.finetune_lr)
    state2 = gtrain.TrainState.create(apply_fn=model.apply, params=state.params, tx=tx2,
                                      model_state=state.model_state, rng=jax.random.PRNGKey(seed + 1))
    fool_loss = LT.make_loss_fn(model.apply, [LT.cross_entropy_term(1.0), LT.fooling_loss_term(lam, mask=mask)])
    trainer = common.Trainer(model, fool_loss, tx2, num_classes=train_ds.num_classes, batch_size=bs,
                             epochs=scale.finetune_epochs)
    by_budget = []
    for e in budgets:  # one fine-tuning run, measured after each budget (fit resumes from state2's step)
        state2 = trainer.run(train_ds, seed=seed, state=state2, eval_ds=test_ds,
                             checkpoint_dir=os.path.join(out, "fooled", "checkpoints"),
                             log_path=os.path.join(out, "fooled", "metrics.jsonl"), progress=progress, log_every=10,
                             max_steps=e * spe)
        state2 = common.local_copy(state2)
        ev1 = trainer.evaluate(state2, test_ds)
        after = energy_fractions(model.apply, state2.variables, xs, ys, mask)
        by_budget.append({"finetune_epochs": e, "finetune_steps": e * spe, "accuracy_fooled": ev1["accuracy"],
                          "energy_after_%": after, "seconds": time.time() - t1})
    return {"lam": lam, "activation": activation, "mask_side": int(mask[0].sum()), "mask_fraction": float(mask.mean()),
            "accuracy_pretrained": ev0["accuracy"], "accuracy_fooled": ev1["accuracy"],
            "energy_before_%": before, "energy_after_%": after, "pretrain_seconds": t1 - t0,
            "finetune_seconds": time.time() - t1, "eval_examples": n, "seed": seed, "by_budget": by_budget}


ORDER = ("logit_gradient", "loss_gradient_T", "loss_gradient")
"""The thesis's order of the energy inside the mask after fooling (83.85 > 60.17 > 48.14 %, L1729–1731)."""


def export_summary(results: Sequence[dict]) -> dict:
    """Numbers-only summary of several seeds' ``results.json`` (same scale and budgets): per budget the per-seed
    energies (%) and accuracies, and :func:`gradjax.statistics.paired_comparison` over the seeds of every pair in
    :data:`ORDER` (``claim_held`` "yes" / "reversed" / "tie") and of after vs before fooling per gradient."""
    from gradjax.statistics import paired_comparison
    if len(results) < 2:
        raise ValueError("export_summary needs the results of at least two seeds.")
    rs = sorted((r["result"] for r in results), key=lambda r: r["seed"])
    seeds = [r["seed"] for r in rs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"duplicate seeds {seeds}.")
    budgets = [b["finetune_epochs"] for b in rs[0]["by_budget"]]
    if any([b["finetune_epochs"] for b in r["by_budget"]] != budgets for r in rs):
        raise ValueError("every seed needs the same budgets.")
    held = {"a>b": "yes", "a<b": "reversed", "tie": "tie"}
    before = {k: [r["energy_before_%"][k] for r in rs] for k in ORDER}
    out = {"seeds": seeds, "scale": results[0]["scale"], "thesis_%": THESIS, "lam": rs[0]["lam"],
           "mask_fraction": rs[0]["mask_fraction"], "eval_examples": rs[0]["eval_examples"],
           "accuracy_pretrained": [r["accuracy_pretrained"] for r in rs], "energy_before_%": before,
           "pretrain_seconds": [r["pretrain_seconds"] for r in rs], "budgets": [],
           "commands": [r.get("command") for r in results]}
    for i, e in enumerate(budgets):
        after = {k: [r["by_budget"][i]["energy_after_%"][k] for r in rs] for k in ORDER}
        order = []
        for j, a in enumerate(ORDER):
            for b in ORDER[j + 1:]:
                pc = paired_comparison(after[a], after[b])
                order.append({"a": a, "b": b, **pc.as_dict(), "claim_held": held[pc.verdict]})
        moved = [{"gradient": k, **paired_comparison(after[k], before[k]).as_dict()} for k in ORDER]
        out["budgets"].append({"finetune_epochs": e, "finetune_steps": rs[0]["by_budget"][i]["finetune_steps"],
                               "accuracy_fooled": [r["by_budget"][i]["accuracy_fooled"] for r in rs],
                               "energy_after_%": after, "paired_order": order, "paired_after_vs_before": moved,
                               "seconds": [r["by_budget"][i]["seconds"] for r in rs]})
    return out


def parse_args(argv=None):
    """The command line (``--scale small``, the default, runs on the real MNIST digits)."""
    p = common.base_parser(__doc__.split("\n")[0], default_dataset=None, overrides=("width", "activation"))
    p.add_argument("--lam", type=float, default=None, help="weight of L_fool (the thesis does not give it)")
    p.add_argument("--finetune-lr", type=float, default=None, help="Adam learning rate of the fine-tuning")
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument("--finetune-epochs", type=int, default=None)
    p.add_argument("--budgets", type=int, nargs="+", default=None,
                   help="also measure after these fine-tuning epochs (one run; the last must be --finetune-epochs)")
    p.add_argument("--export", default=None, metavar="JSON",
                   help="no training: summarize the seeds' results.json given with --aggregate (paired verdicts)")
    p.add_argument("--aggregate", nargs="+", default=None, metavar="RESULTS_JSON")
    p.add_argument("--progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.export:
        if not args.aggregate:
            raise ValueError("--export needs --aggregate with the seeds' results.json files.")
        runs = []
        for p in args.aggregate:
            with open(p) as fh:
                runs.append(json.load(fh))
        summary = export_summary(runs)
        with open(args.export, "w") as fh:
            json.dump(summary, fh, indent=1)
        return summary
    scale = SCALES[args.scale]
    if args.dataset is not None:
        scale = dataclasses.replace(scale, dataset=args.dataset)
    if args.width is not None:
        scale = dataclasses.replace(scale, width=args.width)
    scale = scale.with_extra(**{k: v for k, v in dict(pretrain_epochs=args.pretrain_epochs,
                                                      finetune_lr=args.finetune_lr,
                                                      finetune_epochs=args.finetune_epochs).items() if v is not None})
    out = args.out or os.path.join("runs", f"fooling-{scale.dataset}-{args.scale}")
    os.makedirs(out, exist_ok=True)
    r = run(scale, out, seed=args.seed, lam=args.lam, activation=args.activation, data_dir=args.data_dir,
            progress=args.progress and not args.no_progress, budgets=args.budgets)
    results = {"scale": scale.asdict(), "result": r, "thesis_%": THESIS, "environment": environment(),
               "command": common.command("fooling", argv)}
    b, a = r["energy_before_%"], r["energy_after_%"]
    md = markdown_table(
        ["gradient", "energy in mask, before (%)", "after fooling (%)", "thesis after (%)"],
        [["logit-gradient", b["logit_gradient"], a["logit_gradient"], THESIS["logit_gradient"]],
         ["loss-gradient", b["loss_gradient"], a["loss_gradient"], THESIS["loss_gradient"]],
         ["loss-gradient T=1e3", b["loss_gradient_T"], a["loss_gradient_T"], THESIS["loss_gradient_T1e3"]],
         ["uniform map", 100 * r["mask_fraction"], 100 * r["mask_fraction"], THESIS["uniform"]]])
    md += (f"\n\ntest accuracy: pre-trained {100 * r['accuracy_pretrained']:.2f} %, fooled "
           f"{100 * r['accuracy_fooled']:.2f} %; λ = {r['lam']}")
    write_results(out, results, md)
    print(md)
    return results


if __name__ == "__main__":
    main()
