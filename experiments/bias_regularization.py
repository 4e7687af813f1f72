"""Thesis Table 4.3: bias-gradient regularization vs dropout vs bias weight decay vs none (§4.3, §4.4.2).

All four regularize the **same single layer**, the final convolution of the network (thesis L1436: "regularization
benefits arise when applying these regularizers to final convolutional layers"), on top of cross-entropy:

* ``none``: CE only;
* ``dropout``: ``Dropout(p = 0.5)`` on that layer's output (``VGG(dropout_block=i)``), active in training;
* ``bias wd``: CE + ``1e-1 * 0.5 ||b||^2`` on that layer's bias parameters (conv bias and BatchNorm beta;
  :func:`gradjax.losses.terms.bias_l2_term`);
* ``bias-grad``: CE + ``1e2 * ||b ⊙ grad_b f_y(x)||^2`` (Proposition 10's penalty, correct-class logit, b the
  folded conv+BN bias; :func:`gradjax.losses.terms.bias_gradient_penalty_term`).

The constants are the thesis's grid-search choices (L1438). Every run goes through the one training engine
(:func:`gradjax.losses.make_loss_fn` -> :func:`gradjax.train.jit_train_step` -> :func:`gradjax.train.fit`).

    python -m experiments.bias_regularization --scale smoke|small|paper [--dataset D] [--seeds S] [--out DIR]

``paper``: CIFAR-100 via TFDS, VGG-11 (the table caption; the text says "9-layer", PROTOCOLS "Inconsistencies"),
100 epochs, learning rate annealed at epoch 80 (Adam 1e-3 -> 1e-4; the optimizer is not stated — Adam as in the
chapter's distillation runs), batch 128, n = 50/100/500 per class, 2 runs. ``small``: the embedded real MNIST
digits at 32x32, width 1/16, a fixed step budget (same compiled step for every n and seed).
"""
from __future__ import annotations

import os
import time


from experiments import common
from gradjax import data as gdata
from gradjax.losses import terms as LT
from gradjax.models import VGG, VGG_CONFIGS

METHODS = ("none", "dropout", "bias wd", "bias-grad")
DROPOUT_P = 0.5       # thesis L1438
BIAS_WD = 1e-1        # thesis L1438
BIAS_GRAD = 1e2       # thesis L1438

THESIS = {"n": [50, 100, 500], "rows": {  # Table 4.3, CIFAR-100, VGG-11, mean of 2 runs (reference values)
    "none": [33.25, 46.24, 68.48], "dropout": [35.04, 47.62, 70.14], "bias wd": [34.17, 47.29, 68.75],
    "bias-grad": [36.02, 48.76, 71.49]}}


PRESETS = {  # extra: n per class, lr drop point
    "smoke": common.Scale(model="vgg4", width=1 / 16, seeds=1, steps=2, batch_size=8, lr=1e-3, max_test=64,
                          extra=dict(n_per_class=(2,), drop_at=0.8)),
    "small": common.Scale(model="vgg11", width=1 / 16, seeds=2, steps=300, batch_size=32, lr=1e-3,
                          extra=dict(n_per_class=(10, 50, 100), drop_at=0.8)),
    "paper": common.Scale(model="vgg11", width=1.0, seeds=2, batch_size=128, lr=1e-3, epochs=100, dataset="cifar100",
                          extra=dict(n_per_class=(50, 100, 500), drop_at=0.8)),
}


def final_conv_block(arch: str) -> tuple[int, str]:
    """``(index, module path)`` of the last convolutional block of a VGG configuration (``block{index}``)."""
    if arch not in VGG_CONFIGS:
        raise ValueError(f"unknown VGG architecture {arch!r}; choose from {sorted(VGG_CONFIGS)}.")
    i = sum(1 for layer in VGG_CONFIGS[arch] if layer != "M") - 1
    return i, f"block{i}"


def build(method: str, arch: str, num_classes: int, width: float):
    """``(model, loss_fn)`` of one Table 4.3 row; the regularized layer is :func:`final_conv_block`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}.")
    idx, layer = final_conv_block(arch)
    model = VGG(VGG_CONFIGS[arch], num_classes, width=width,
                dropout_block=idx if method == "dropout" else None, dropout_block_rate=DROPOUT_P)
    terms = [LT.cross_entropy_term()]
    if method == "bias wd":
        terms.append(LT.bias_l2_term(BIAS_WD, layers=[layer]))
    elif method == "bias-grad":
        terms.append(LT.bias_gradient_penalty_term(BIAS_GRAD, layers=[layer]))
    return model, LT.make_loss_fn(model.apply, terms, dropout=method == "dropout")


def main(argv=None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0], default_dataset=None, seeds="count", overrides=("steps", "batch_size"),
                           methods=METHODS, per_class=True)
    args = p.parse_args(argv)
    t0 = time.time()
    pre, dataset, seeds, out, methods, train, test, ns = common.setup_per_class(args, PRESETS, "bias_regularization", METHODS)
    K = train.num_classes
    _, layer = final_conv_block(pre.model)

    steps_for = lambda n_examples: common.step_budget(pre, n_examples, pre.steps, args.steps)  # noqa: E731

    trainers, results, last_terms = {}, {m: {} for m in methods}, {m: {} for m in methods}
    for n in ns:
        for m in methods:
            accs, train_accs, pen = [], [], []
            for s in range(seeds):
                sub = gdata.n_per_class_subset(train, n, seed=s)
                steps = steps_for(len(sub))
                key = (m, steps)
                if key not in trainers:
                    model, loss = build(m, pre.model, K, pre.width)
                    trainers[key] = common.Trainer(model, loss, common.adam_step_decay(pre.lr, steps, pre.drop_at),
                                                 steps=steps, batch_size=pre.batch_size, num_classes=K)
                tr = trainers[key]
                st = tr.run(sub, seed=s)
                accs.append(common.accuracy(tr.model.apply, st.variables, test)[0])
                train_accs.append(common.accuracy(tr.model.apply, st.variables, sub)[0])
                pen.append({k: v for k, v in tr.last_records[-1].items() if k.startswith("term/")})
            results[m][n] = {**common.mean_std(accs), "train_accuracy": common.mean_std(train_accs)}
            last_terms[m][n] = pen
            print(f"n={n:4d} {m:10s} {common.fmt(results[m][n])} (train {common.fmt(results[m][n]['train_accuracy'])})"
                  f"  ({time.time() - t0:.0f} s)", flush=True)
        common.write_results(out, {"partial": True, "results": results}, "partial\n")

    header = ["per class"] + [str(n) for n in ns]
    rows = [[m] + [common.fmt(results[m][n]) for n in ns] for m in methods]
    thesis_rows = [[f"{m} (thesis, CIFAR-100)"] + [f"{THESIS['rows'][m][THESIS['n'].index(n)]:.2f}"
                                                   if n in THESIS["n"] else "—" for n in ns] for m in methods]
    table = (f"Table 4.3 — {dataset}, {pre.model} width {pre.width:g}, regularized layer {layer} (final conv), "
             f"dropout p={DROPOUT_P:g}, bias wd {BIAS_WD:g}, bias-grad lambda {BIAS_GRAD:g}, {seeds} seed(s), "
             f"test accuracy % (mean ± std)\n\n" + common.markdown_table(header, rows)
             + "\n\nThesis (CIFAR-100, VGG-11, 2 runs):\n\n" + common.markdown_table(header, thesis_rows))
    common.plot_lines(os.path.join(out, "table4_3.png"), ns, {m: [results[m][n] for n in ns] for m in methods},
                    xlabel="examples per class", ylabel="test accuracy (%)", logx=True,
                    title=f"Bias-gradient regularization ({dataset}, {pre.model}, layer {layer})")
    res = {"table": "4.3", "scale": args.scale, "dataset": dataset, "arch": pre.model, "width": pre.width,
           "layer": layer, "seeds": seeds, "n_per_class": ns, "steps": sorted({k[1] for k in trainers}),
           "batch_size": pre.batch_size, "dropout_p": DROPOUT_P, "bias_wd": BIAS_WD, "bias_grad": BIAS_GRAD,
           "optimizer": f"adam {pre.lr} -> {pre.lr / 10} at {pre.drop_at:.0%} of steps", "results": results,
           "final_train_terms": last_terms, "thesis": THESIS, "wall_s": time.time() - t0}
    return common.finish(out, res, table, script="bias_regularization", argv=argv)


if __name__ == "__main__":
    main()
