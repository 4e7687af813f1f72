"""Thesis Table 2.2: robustness to Gaussian input noise of VGG-9 trained with the input-gradient-norm penalty.

Objectives: ``CE + lambda * ||grad_x CE||^2`` (eq. 2.3's form with the label class — PROTOCOLS "Decisions"; the
per-example double-backprop penalty of :func:`gradjax.losses.gradient_norm`) for
``lambda in {0, 0.01, 0.1, 1, 10}``, against an l2 baseline (``CE + gamma/2 ||w||^2``, gamma = 1e-3) and a dropout
baseline (rate 0.25; ``dropout``: on the last conv block's output, i.e. just before the classifier's pooling and
Dense layer — the default since the first small run; ``dropout-pools``: after every max-pool, the earlier choice,
which did not train in the small BN net). Test accuracy with i.i.d. Gaussian noise ``sigma in {0, 0.1, ..., 0.4}``
added to the *normalized* test images, averaged over several noise draws; mean ± std over seeds. All runs through
the one training engine.

    python -m experiments.noise_robustness --scale smoke|small|paper [--dataset D] [--seeds S] [--out DIR]
"""
from __future__ import annotations

import os
import time


from experiments import common
from gradjax.losses import terms as LT
from gradjax.models import create_model

SIGMAS = (0.0, 0.1, 0.2, 0.3, 0.4)
LAMBDAS = (0.0, 0.01, 0.1, 1.0, 10.0)

THESIS = {  # Table 2.2, VGG-9 on CIFAR-100, sigma 0 / 0.1 / 0.2 / 0.3 / 0.4 (reference values, not ours)
    "lambda=0": [64.78, 61.9, 47.53, 29.63, 17.69],
    "lambda=0.01": [64.67, 61.85, 49.47, 32.24, 19.63],
    "lambda=0.1": [65.62, 63.36, 53.57, 37.38, 23.99],
    "lambda=1": [63.59, 62.66, 57.53, 47.48, 35.43],
    "lambda=10": [61.37, 60.78, 58.28, 52.82, 44.96],
    "l2": [66.92, 60.41, 39.93, 23.32, 13.76],
    "dropout": [66.8, 61.53, 44.34, 26.70, 15.77],
}


PRESETS = {  # extra: noise draws per evaluation
    "smoke": common.Scale(model="vgg4", width=1 / 16, seeds=1, steps=2, batch_size=8, lr=1e-3, max_train=64,
                          max_test=64, extra=dict(draws=1)),
    "small": common.Scale(model="vgg9", width=1 / 16, seeds=2, steps=300, batch_size=32, lr=1e-3, extra=dict(draws=3)),
    "paper": common.Scale(model="vgg9", width=1.0, seeds=1, batch_size=128, lr=1e-3, epochs=500, dataset="cifar100",
                          extra=dict(draws=5)),
}


def configs(lambdas=LAMBDAS, l2_gamma: float = 1e-3, dropout: float = 0.25) -> dict:
    """name -> (terms, dropout placement, dropout rate); placement ``None`` (no dropout), ``"last"`` (on the last
    conv block's output, before the classifier) or ``"pools"`` (after every max-pool)."""
    out = {}
    for lam in lambdas:
        terms = [LT.cross_entropy_term()] + ([LT.gradient_norm_term(lam)] if lam else [])
        out[f"lambda={lam:g}"] = (terms, None, 0.0)
    out["l2"] = ([LT.cross_entropy_term(), LT.l2_term(l2_gamma)], None, 0.0)
    out["dropout"] = ([LT.cross_entropy_term()], "last", dropout)
    out["dropout-pools"] = ([LT.cross_entropy_term()], "pools", dropout)
    return out


def build_model(name: str, num_classes: int, width: float, placement, rate: float):
    """The VGG of the preset with the dropout of ``placement`` (see :func:`configs`)."""
    if placement == "pools":
        return create_model(name, num_classes, width=width, dropout=rate)
    model = create_model(name, num_classes, width=width)
    if placement == "last":
        n_blocks = sum(1 for layer in model.layers if layer != "M")
        model = model.clone(dropout_block=n_blocks - 1, dropout_block_rate=rate)
    return model


def main(argv=None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0], default_dataset=None, seeds="count", overrides=("steps", "batch_size"))
    p.add_argument("--configs", default=None, help="comma-separated subset, e.g. 'lambda=0,lambda=1,l2'")
    args = p.parse_args(argv)
    pre, dataset, seeds, out = common.setup(args, PRESETS, "noise_robustness")
    t0 = time.time()
    train, test = common.load(dataset, data_dir=args.data_dir, max_train=pre.max_train, max_test=pre.max_test)
    K = train.num_classes
    steps = common.step_budget(pre, len(train), pre.steps, args.steps)
    cfgs = configs()
    if not args.configs:  # the superseded placement runs only when asked for
        cfgs.pop("dropout-pools")
    if args.configs:
        names = [c.strip() for c in args.configs.split(",")]
        bad = [c for c in names if c not in cfgs]
        if bad:
            raise ValueError(f"unknown configs {bad}; choose from {list(cfgs)}.")
        cfgs = {c: cfgs[c] for c in names}

    def report():
        header = ["sigma"] + [f"{s:g}" for s in SIGMAS]
        rows = [[n] + [common.fmt(results[n][str(s)]) for s in SIGMAS] for n in results]
        trows = [[f"{n} (thesis)"] + [f"{v:.2f}" for v in THESIS[n]] for n in results if n in THESIS]
        table = (f"Table 2.2 — {dataset}, {pre.model} width {pre.width:g}, {steps} steps, {seeds} seed(s), "
                 f"{pre.draws} noise draws; test accuracy % under Gaussian noise on normalized images (mean ± std over "
                 f"seeds)\n\n" + common.markdown_table(header, rows) + "\n\nThesis (VGG-9, CIFAR-100, one run):\n\n"
                 + common.markdown_table(header, trows))
        common.plot_lines(os.path.join(out, "table2_2.png"), list(SIGMAS),
                        {n: [results[n][str(s)] for s in SIGMAS] for n in results},
                        xlabel="test noise sigma (normalized units)", ylabel="test accuracy (%)",
                        title=f"Noise robustness ({dataset}, {pre.model})")
        res = {"table": "2.2", "scale": args.scale, "dataset": dataset, "model": pre.model, "width": pre.width,
               "seeds": seeds, "steps": steps, "batch_size": pre.batch_size, "noise_draws": pre.draws,
               "penalty": "lambda * ||grad_x CE(x, y)||^2 (eq. 2.3 form, label class), double backprop, frozen BN moments",
               "l2_gamma": 1e-3, "dropout": "0.25 on the last conv block's output (dropout-pools: after every max-pool)", "optimizer": f"adam {pre.lr} -> {pre.lr / 10} at 80% of steps",
               "results": results, "thesis": THESIS, "wall_s": time.time() - t0, "environment": common.environment(),
               "command": common.command("noise_robustness", argv)}
        common.write_results(out, res, table)
        return res, table

    results = {}
    for name, (terms, placement, drop) in cfgs.items():
        model = build_model(pre.model, K, pre.width, placement, drop)
        loss = LT.make_loss_fn(model.apply, terms, dropout=placement is not None)
        trainer = common.Trainer(model, loss, common.adam_step_decay(pre.lr, steps), steps=steps,
                               batch_size=pre.batch_size, num_classes=K)
        per_sigma = {s: [] for s in SIGMAS}
        for seed in range(seeds):
            st = trainer.run(train, seed=seed)
            for s in SIGMAS:
                per_sigma[s].append(common.accuracy(model.apply, st.variables, test, noise_sigma=s, draws=pre.draws,
                                                  seed=100 + seed)[0])
        results[name] = {str(s): common.mean_std(v) for s, v in per_sigma.items()}
        print(f"{name:12s} " + "  ".join(common.fmt(results[name][str(s)]) for s in SIGMAS)
              + f"  ({time.time() - t0:.0f} s)", flush=True)
        report()  # partial results after every configuration

    res, table = report()
    print(table)
    return res


if __name__ == "__main__":
    main()
