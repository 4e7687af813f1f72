"""Backdoor discovery with input-agnostic saliency (seed 003) against Neural Cleanse, on trojaned / clean twins.

For every configuration (seed, target class, trigger size, poison rate) a classifier is trained on data with a
planted trigger (:func:`gradjax.data.poison_with_trigger`), and its *clean twin* (same seed, same schedule, no
poisoning) once per seed. On every model both detectors run for all classes at once (one vmapped program each):

* input-agnostic saliency (:mod:`gradjax.input_agnostic`, a reconstruction from the seed-003 abstract) — needs
  no data: per-class radius-to-success curves on random inputs; MAD anomaly index over the area under each
  curve (mean success over log radius — large when a class stays reachable down to small radii), flagged when
  ``> 2`` on the large side; the radius needed for 90 % success, energy concentration and compactness are
  recorded too; the trigger is localized by thresholding the heat map of the minimal successful perturbation;
* Neural Cleanse (Wang et al., IEEE S&P 2019, :mod:`gradjax.neural_cleanse`) on clean test images — MAD over
  the reverse-engineered mask l1 norms, flagged when ``> 2`` on the small side; the trigger is localized by
  thresholding the mask.

Outputs in ``--out``: ``results.json``, ``results.md`` (the comparison table, clean-class-map gallery stats,
stability), ``triggers.png`` (recovered triggers next to the planted ones, both methods), ``class_maps.png``
(every class's input-agnostic map for a clean classifier).

    python -m experiments.backdoor_discovery --scale small    # 13 minutes on a busy 2-core CPU (6 models)
    python -m experiments.backdoor_discovery --scale smoke    # untrained-size check, ~1-2 minutes
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from experiments import common
from gradjax import backdoor as bd
from gradjax import data as gdata
from gradjax.input_agnostic import InputAgnosticOptions, input_agnostic
from gradjax.neural_cleanse import neural_cleanse


@dataclass(frozen=True)
class Trojan:
    seed: int
    target: int
    size: int
    rate: float
    pattern: str = "checkerboard"
    alpha: float = 1.0

    @property
    def name(self) -> str:
        return f"s{self.seed}-t{self.target}-{self.size}x{self.size}-p{self.rate:g}"


CONFIGS = {
    "smoke": dict(trojans=(Trojan(0, 7, 3, 0.1),), clean_seeds=(0,),
                  scale=common.Scale(model="vgg4", width=0.125, epochs=1, batch_size=64, lr=0.05, max_train=256,
                                     max_test=64),
                  ia=dict(steps=4, samples=4, chunk=4, fidelity_samples=16, curve_fractions=(0.5, 0.25),
                          curve_steps=2, refine_steps=1),
                  nc=dict(steps=4, batch_size=4), nc_images=16),
    "small": dict(trojans=(Trojan(0, 7, 3, 0.1), Trojan(0, 2, 5, 0.05), Trojan(1, 4, 3, 0.05), Trojan(1, 0, 5, 0.1)),
                  clean_seeds=(0, 1),
                  scale=common.Scale(model="vgg4", width=0.125, epochs=6, batch_size=64, lr=0.05),
                  ia=dict(steps=40, samples=12, chunk=12, fidelity_samples=64, curve_steps=6, refine_steps=2),
                  nc=dict(steps=120, batch_size=12), nc_images=200),
    "paper": dict(trojans=tuple(Trojan(s, t, k, p) for s in (0, 1, 2) for t, k, p in
                                ((7, 3, 0.1), (2, 5, 0.05), (4, 3, 0.05), (0, 5, 0.1), (9, 3, 0.01))),
                  clean_seeds=(0, 1, 2),
                  scale=common.Scale(model="vgg9", width=0.5, epochs=30, batch_size=128, lr=0.05),
                  ia=dict(steps=200, samples=64, chunk=64, fidelity_samples=512, curve_steps=25,
                          refine_steps=4),
                  nc=dict(steps=1000, batch_size=64), nc_images=1000),
}
LEVEL = 0.9            # "high success": the radius-to-success statistic uses 90 % targeted success
THRESHOLD = 2.0        # MAD anomaly-index threshold (Neural Cleanse's)
RADIUS_FRACTION = 0.5  # l2 ball radius as a fraction of the norm of a full-range image, sqrt(HWC) * (high - low)


def _trojan_data(train: gdata.ArrayDataset, t: Trojan, lo: float, hi: float):
    trigger = gdata.make_trigger(t.size, t.pattern, low=lo, high=hi, channels=train.images.shape[-1], seed=t.seed)
    poisoned, idx = gdata.poison_with_trigger(train, target_class=t.target, fraction=t.rate, trigger=trigger,
                                              seed=t.seed, alpha=t.alpha)
    return poisoned, trigger


def _accuracy(logits_fn, images, labels) -> float:
    pred = common.in_batches(lambda x: jnp.argmax(logits_fn(x), -1), images, 256)
    return float(np.mean(pred == labels))


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0], single_process=(
        "its work is the per-class trigger searches (input-agnostic maps, Neural Cleanse) on each trained model, "
        "optimizations that run on one device"))
    parser.add_argument("--radius-fraction", type=float, default=RADIUS_FRACTION)
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.scale]
    s0 = cfg["scale"]
    scale = common.resolve_scale(args, {args.scale: s0})
    out = common.out_dir(args, "backdoor")
    progress = not args.no_progress
    t_start = time.time()
    train, test = common.load_splits(args, scale)
    hw, channels = train.images.shape[1:3], train.images.shape[-1]
    lo = float(np.mean(train.normalize(np.zeros(channels))))
    hi = float(np.mean(train.normalize(np.ones(channels))))
    radius = args.radius_fraction * float(np.sqrt(np.prod(train.images.shape[1:]))) * (hi - lo)
    ia_shape = tuple(train.images.shape[1:])
    ia_opts = dict(low=lo, high=hi, norm="l2", radius=radius, **cfg["ia"])
    nc_images = jnp.asarray(test.images[:cfg["nc_images"]])

    # one compiled program per method, reused for every model (the variables are arguments, not constants)
    model_def = None

    def logits_of(variables):
        return lambda x: model_def.apply(variables, x, train=False)

    run_ia = jax.jit(lambda v, k: input_agnostic(logits_of(v), ia_shape, "all", key=k,
                                                    options=InputAgnosticOptions(**ia_opts)))
    run_nc = jax.jit(lambda v, k: neural_cleanse(logits_of(v), nc_images, "all", key=k, low=lo, high=hi, **cfg["nc"]))

    jobs = [("trojaned", t) for t in cfg["trojans"]] + [("clean", s) for s in cfg["clean_seeds"]]
    rows, records, gallery, clean_results = [], [], [], {}
    for kind, job in tqdm(jobs, desc="models", disable=not progress):
        seed = job.seed if kind == "trojaned" else job
        data = train
        trigger = None
        if kind == "trojaned":
            data, trigger = _trojan_data(train, job, lo, hi)
        t0 = time.time()
        state, _, model_def = common.train_classifier(data, test, scale, seed=seed, progress=False)
        train_s = time.time() - t0
        variables = state.variables
        logits_fn = logits_of(variables)
        rec = {"kind": kind, "seed": seed, "clean_accuracy": _accuracy(logits_fn, test.images, test.labels),
               "train_seconds": train_s}
        planted = None
        if kind == "trojaned":
            others = test.labels != job.target
            stamped = gdata.stamp_trigger(test.images[others], trigger, alpha=job.alpha)
            rec.update(name=job.name, target=job.target, trigger_size=job.size, poison_rate=job.rate,
                       attack_success=_accuracy(logits_fn, stamped, np.full(int(others.sum()), job.target)))
            planted = gdata.trigger_mask(hw, (job.size, job.size))
        else:
            rec.update(name=f"clean-s{seed}", target=None)

        key = jax.random.PRNGKey(1000 + seed)
        t0 = time.time()
        ia = jax.block_until_ready(run_ia(variables, key))
        ia_s = time.time() - t0
        st = bd.class_statistics(ia, level=LEVEL)
        det = bd.detect(st.success_area, threshold=THRESHOLD, side="high")
        t0 = time.time()
        nc = jax.block_until_ready(run_nc(variables, key))
        nc_s = time.time() - t0
        ndet = bd.detect(nc.l1, threshold=THRESHOLD, side="low")

        def summarize(d, heat):
            flagged = [int(c) for c in np.flatnonzero(np.asarray(d.flagged))]
            top = int(d.suspect)
            out = {"flagged": flagged, "suspect": top, "anomaly_index": np.asarray(d.anomaly_index).tolist(),
                   "max_anomaly_index": float(np.max(np.asarray(d.anomaly_index)))}
            if planted is not None:
                out["target_index"] = float(d.anomaly_index[job.target])
                out["correct"] = bool(job.target in flagged)
                out["iou"] = float(bd.iou(bd.localize(heat[job.target]), planted))
                out["iou_flagged"] = float(bd.iou(bd.localize(heat[top]), planted)) if flagged else 0.0
            return out

        rec["input_agnostic"] = {**summarize(det, st.heatmap), "seconds": ia_s,
                                 "radius_for_90": np.asarray(st.radius).tolist(),
                                 "success_area": np.asarray(st.success_area).tolist(),
                                 "compactness": np.asarray(st.compactness).tolist(),
                                 "fidelity": np.asarray(ia.fidelity).tolist(),
                                 "fidelity_unrefined": np.asarray(ia.fidelity_unrefined).tolist(),
                                 "radii": np.asarray(ia.radii[0]).tolist(), "success": np.asarray(ia.success).tolist()}
        rec["neural_cleanse"] = {**summarize(ndet, nc.mask), "seconds": nc_s, "l1": np.asarray(nc.l1).tolist(),
                                 "success": np.asarray(nc.success).tolist(), "reached": np.asarray(nc.reached).tolist()}
        records.append(rec)
        if kind == "trojaned":
            gallery.append((job, trigger, np.asarray(st.heatmap[job.target]), np.asarray(nc.mask[job.target]),
                            np.asarray(nc.pattern[job.target] * nc.mask[job.target][..., None])))
        else:
            clean_results[seed] = (ia, st)

    # clean-classifier class-map gallery, and stability of the maps across keys and across training seeds
    first_clean = cfg["clean_seeds"][0]
    ia0, _ = clean_results[first_clean]
    stability = _stability(ia0, clean_results, first_clean)
    _plot_class_maps(ia0, os.path.join(out, "class_maps.png"), f"Input-agnostic class maps, clean {scale.model} "
                     f"(seed {first_clean}, {args.dataset})")
    _plot_triggers(gallery, hw, os.path.join(out, "triggers.png"))

    md, summary = _tables(records, scale, args, radius, stability)
    results = {"dataset": args.dataset, "scale": args.scale, "model": scale.model, "width": scale.width,
               "epochs": scale.epochs, "radius": radius, "level": LEVEL, "threshold": THRESHOLD,
               "ia_options": {"input_shape": ia_shape, **ia_opts}, "nc_options": cfg["nc"], "nc_images": cfg["nc_images"],
               "models": records, "summary": summary, "stability": stability,
               "total_seconds": time.time() - t_start, "environment": common.environment()}
    common.write_results(out, results, md)
    print(md)
    print(f"\noutputs in {out}: results.md, results.json, triggers.png, class_maps.png")
    return results


def _cos(a, b) -> float:
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def _stability(ia0, clean_results, first) -> dict:
    """Cosine similarity of every class's map between clean twins of different training seeds (same key
    derivation), and of the minimal-radius heat maps."""
    out = {}
    seeds = sorted(clean_results)
    for s in seeds:
        if s == first:
            continue
        ia1, _ = clean_results[s]
        per_class = [_cos(ia0.map[c], ia1.map[c]) for c in range(ia0.map.shape[0])]
        out[f"clean seed {first} vs {s}"] = {"cosine_per_class": per_class, "mean": float(np.mean(per_class))}
    # within one model: the map of class c vs the maps of other classes (a reference level for the numbers above)
    k = ia0.map.shape[0]
    cross = [_cos(ia0.map[i], ia0.map[j]) for i in range(k) for j in range(k) if i < j]
    out[f"clean seed {first}: between different classes"] = {"mean": float(np.mean(cross))}
    return out


def _plot_class_maps(ia, path: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = ia.map.shape[0]
    fig = Figure(figsize=(1.3 * k, 2.9))
    FigureCanvasAgg(fig)
    for c in range(k):
        ax = fig.add_subplot(2, k, c + 1)
        d = np.asarray(ia.display[c])
        ax.imshow(d[..., 0] if d.shape[-1] == 1 else d, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{c}: {float(ia.fidelity[c]):.2f}", fontsize=8)
        ax.axis("off")
        ax = fig.add_subplot(2, k, k + c + 1)
        ax.imshow(np.asarray(ia.heatmap[c]), cmap="inferno")
        ax.axis("off")
    fig.suptitle(title + " — top: map scaled to [0, 1] (title: class, fidelity); bottom: heat map", fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _plot_triggers(gallery, hw, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not gallery:
        return
    fig = Figure(figsize=(6.5, 1.6 * len(gallery)))
    FigureCanvasAgg(fig)
    cols = ("planted trigger", "input-agnostic heat map", "IA localized", "NC mask", "NC mask x pattern")
    for i, (job, trigger, heat, mask, pm) in enumerate(gallery):
        planted = np.zeros(hw)
        r0, c0 = hw[0] - job.size, hw[1] - job.size
        planted[r0:, c0:] = trigger[..., 0] - trigger.min() + 0.2
        panels = (planted, heat, np.asarray(bd.localize(jnp.asarray(heat))), mask, pm[..., 0])
        for j, img in enumerate(panels):
            ax = fig.add_subplot(len(gallery), len(cols), i * len(cols) + j + 1)
            ax.imshow(img, cmap="gray" if j in (0, 2) else "inferno")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(job.name, fontsize=6)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _tables(records, scale, args, radius, stability):
    header = ["model", "clean acc", "attack success", "IA flagged", "IA index (target)", "IA IoU", "IA s",
              "NC flagged", "NC index (target)", "NC IoU", "NC s"]
    rows = []
    for r in records:
        ia, nc = r["input_agnostic"], r["neural_cleanse"]
        fmt_flag = lambda d: ",".join(map(str, d["flagged"])) or "none"
        tgt = lambda d: f"{d['target_index']:.2f}" if "target_index" in d else f"max {d['max_anomaly_index']:.2f}"
        rows.append([r["name"], f"{r['clean_accuracy']:.3f}", f"{r['attack_success']:.3f}" if r["target"] is not None else "—",
                     fmt_flag(ia), tgt(ia), f"{ia['iou']:.2f}" if "iou" in ia else "—", f"{ia['seconds']:.0f}",
                     fmt_flag(nc), tgt(nc), f"{nc['iou']:.2f}" if "iou" in nc else "—", f"{nc['seconds']:.0f}"])
    troj = [r for r in records if r["kind"] == "trojaned"]
    clean = [r for r in records if r["kind"] == "clean"]
    summary = {}
    for m in ("input_agnostic", "neural_cleanse"):
        summary[m] = {
            "detected_with_right_target": sum(r[m]["correct"] for r in troj),
            "iou_ge_0.5": sum(r[m]["iou"] >= 0.5 for r in troj),
            "trojaned_models": len(troj),
            "clean_flagged": sum(bool(r[m]["flagged"]) for r in clean), "clean_models": len(clean),
            "mean_seconds": float(np.mean([r[m]["seconds"] for r in records])),
        }
    srows = [[m, f"{s['detected_with_right_target']}/{s['trojaned_models']}", f"{s['iou_ge_0.5']}/{s['trojaned_models']}",
              f"{s['clean_flagged']}/{s['clean_models']}", f"{s['mean_seconds']:.0f}"] for m, s in summary.items()]
    stab = [[k, f"{v['mean']:.3f}"] for k, v in stability.items()]
    md = (f"Backdoor discovery on {args.dataset}: {scale.model} (width {scale.width}, {scale.epochs} epochs); "
          f"input-agnostic l2 radius {radius:.2f}, statistic: area under the radius-to-success curve (log radius), "
          f"MAD index > {THRESHOLD} (large side); Neural Cleanse: MAD over mask l1 norms (small side).\n\n"
          + common.markdown_table(header, rows)
          + "\n\nSummary (trojaned: flagged class = target; IoU of the localized trigger with the planted patch; "
          "clean: any class flagged = false positive; seconds per model for all classes, first call includes "
          "compilation):\n\n"
          + common.markdown_table(["method", "detected, right target", "IoU >= 0.5", "clean twins flagged",
                                   "seconds / model"], srows)
          + "\n\nMap stability (mean cosine similarity of the per-class input-agnostic maps):\n\n"
          + common.markdown_table(["comparison", "mean cosine"], stab))
    return md, summary


if __name__ == "__main__":
    main(sys.argv[1:])
