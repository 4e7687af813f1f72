"""Calibrated backdoor detection and trigger localization: input-agnostic saliency vs Neural Cleanse (issue 26).

Many small CNNs are trained at once (``jax.vmap`` over stacked parameters: one compiled step per head type) on the
real MNIST digits (``mnist_digits``, 28x28; ``--dataset digits`` for the 8x8 digits): for each head type
(``flatten``: flatten + dense, position-sensitive; ``gap``: global average pool + dense) a set of clean
*reference* models, a separate set of clean *evaluated* models, and trojaned models with three trigger kinds —

* ``corner``: a white square patch at the bottom-right corner,
* ``random``: the same patch at a position drawn once per model,
* ``blend``: a random binary full-image pattern blended in with ``alpha = 0.2`` (Chen et al. 2017),

each poisoning 10 % of the other classes' training images and relabelling them to the model's target class.

Both detectors run on every model for all classes (vmapped over classes *and* models, timed after compilation):
input-agnostic saliency (:mod:`gradjax.input_agnostic`; no data) with the per-class statistic ``log`` radius for
90 % success on random inputs, and Neural Cleanse (:mod:`gradjax.neural_cleanse`; 200 clean test images) with
``log`` of the mask l1 norm — small values suspicious for both. The *same* decision protocol for both
(:mod:`gradjax.backdoor`): a model's score is the largest deviation of a class's statistic from that class's
distribution over the clean reference models (robust z, :func:`~gradjax.backdoor.model_score`), the threshold is
chosen on the reference models (leave-one-out scores) for a 10 % false-alarm rate, and a trojaned model counts as
detected only when the suspect class is its target. The within-model MAD index (Neural Cleanse's rule) is scored
the same way for comparison. Localization: IoU of the thresholded target-class heat map / NC mask with the planted
trigger pixels (the patch; for ``blend`` the pattern's "on" pixels).

    nice -n 5 python -m experiments.backdoor_calibrated                  # the RESULTS run (--scale small)
    python -m experiments.backdoor_calibrated --scale smoke --out /tmp/x  # seconds-scale check
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from gradjax import backdoor as bd
from gradjax.input_agnostic import InputAgnosticOptions, input_agnostic
from gradjax.neural_cleanse import neural_cleanse
from gradjax.statistics import paired_comparison

HEADS = ("flatten", "gap")
KINDS = ("corner", "random", "blend")
SEED_BASE = {"reference": 1000, "clean": 2000, "corner": 3000, "random": 4000, "blend": 5000}
TARGET_RULE = {"corner": (1, 0), "random": (3, 1), "blend": (7, 2)}   # target of model i: (a * i + b) % 10
FALSE_ALARM = 0.10
LEVEL = 0.9
POISON_RATE = 0.1
BLEND_ALPHA = 0.2

SCALES = {
    "smoke": dict(n_reference=3, n_clean=2, n_trojan={"corner": 1, "random": 1, "blend": 1}, chunk=4, epochs=1,
                  max_train=512, width=4, gap=dict(last_width=8, epochs=1, lr=2e-3), ia=dict(steps=2, samples=4, fidelity_samples=8, curve_fractions=(0.5,),
                                                    curve_steps=1, refine_steps=1),
                  nc=dict(steps=2, batch_size=4), nc_images=16),
    "small": dict(n_reference=10, n_clean=10, n_trojan={"corner": 10, "random": 5, "blend": 5}, chunk=5, epochs=3,
                  max_train=None, width=4, gap=dict(last_width=32, epochs=8, lr=4e-3), ia=dict(steps=30, samples=8, fidelity_samples=48,
                                                   curve_fractions=tuple(round(0.7 ** k, 4) for k in range(1, 9)),
                                                   curve_steps=4, refine_steps=1),
                  nc=dict(steps=80, batch_size=8), nc_images=200),
}


class SmallCNN(nn.Module):
    """Three 3x3 conv layers (strides 2, 2, 1; widths w, 2w, 2w) and a linear head: ``"flatten"`` (position-sensitive) or ``"gap"``
    (global average pool: position-invariant up to the receptive fields)."""

    head: str = "flatten"
    width: int = 8
    last_width: int = 0      # channels of the last conv (0: 2 * width)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.width, (3, 3), strides=2)(x))
        x = nn.relu(nn.Conv(2 * self.width, (3, 3), strides=2)(x))
        x = nn.relu(nn.Conv(self.last_width or 2 * self.width, (3, 3))(x))
        x = jnp.mean(x, axis=(1, 2)) if self.head == "gap" else x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes)(x)


def make_trigger(kind: str, seed: int, hw: tuple, lo: float, hi: float):
    """``(alpha [H, W], pattern [H, W, 1], planted mask [H, W] bool)``; stamped ``x' = (1 - a) x + a p``."""
    h, w = hw
    rng = np.random.default_rng(seed)
    size = max(2, int(round(h / 7)))
    alpha = np.zeros(hw, np.float32)
    pattern = np.full(hw + (1,), hi, np.float32)
    if kind == "blend":
        on = rng.random(hw) < 0.5
        pattern = np.where(on, hi, lo).astype(np.float32)[..., None]
        alpha[:] = BLEND_ALPHA
        return alpha, pattern, on
    r, c = (h - size, w - size) if kind == "corner" else (int(rng.integers(0, h - size + 1)),
                                                          int(rng.integers(0, w - size + 1)))
    alpha[r:r + size, c:c + size] = 1.0
    return alpha, pattern, alpha > 0


def model_specs(cfg: dict, hw, lo, hi):
    """Every model of one head type: dicts with group, seed, target (None for clean), trigger."""
    specs = []
    for group, n in (("reference", cfg["n_reference"]), ("clean", cfg["n_clean"])):
        specs += [dict(group=group, seed=SEED_BASE[group] + i, target=None, trigger=None) for i in range(n)]
    for kind in KINDS:
        a, b = TARGET_RULE[kind]
        for i in range(cfg["n_trojan"][kind]):
            seed = SEED_BASE[kind] + i
            specs.append(dict(group=kind, seed=seed, target=(a * i + b) % 10, trigger=make_trigger(kind, seed, hw, lo, hi)))
    return specs


def train_models(model, specs, train, epochs: int, batch_size: int = 64, lr: float = 2e-3):
    """Train every model of ``specs`` at once (vmapped Adam steps over stacked parameters); the poisoned images are
    stamped inside the step. Returns stacked params."""
    x_all, y_all = jnp.asarray(train.images), jnp.asarray(train.labels)
    n, hw = len(train.labels), train.images.shape[1:3]
    m = len(specs)
    alpha = np.zeros((m,) + hw, np.float32)
    pattern = np.zeros((m,) + hw + (1,), np.float32)
    poison = np.zeros((m, n), bool)
    target = np.zeros(m, np.int32)
    for i, s in enumerate(specs):
        if s["target"] is None:
            continue
        alpha[i], pattern[i] = s["trigger"][0], s["trigger"][1]
        cand = np.flatnonzero(train.labels != s["target"])
        pick = np.random.default_rng(s["seed"]).choice(cand, int(round(POISON_RATE * len(cand))), replace=False)
        poison[i, pick] = True
        target[i] = s["target"]
    keys = jnp.stack([jax.random.PRNGKey(s["seed"]) for s in specs])
    params = jax.vmap(lambda k: model.init(k, x_all[:1])["params"])(keys)
    tx = optax.adam(lr)
    opt = jax.vmap(tx.init)(params)

    def one(p, o, idx, pz, a, pat, tgt, x_all, y_all):
        x, y, z = x_all[idx], y_all[idx], pz[idx]
        x = jnp.where(z[:, None, None, None], (1 - a[..., None]) * x + a[..., None] * pat, x)
        y = jnp.where(z, tgt, y)
        g = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": q}, x), y).mean())(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    step = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, 0, 0, 0, None, None)))
    args = tuple(jnp.asarray(a) for a in (poison, alpha, pattern, target))
    steps = n // batch_size
    for epoch in range(epochs):
        perms = np.stack([np.random.default_rng([s["seed"], epoch]).permutation(n)[:steps * batch_size]
                          for s in specs]).reshape(m, steps, batch_size)
        for t in range(steps):
            params, opt = step(params, opt, jnp.asarray(perms[:, t]), *args, x_all, y_all)
    return jax.block_until_ready(params)


def evaluate(model, params, specs, test):
    """Clean accuracy, attack success (trigger stamped on other classes' test images) and the success of the
    trigger mirrored through the image centre (for patches: does it work elsewhere?)."""
    pred_fn = jax.jit(jax.vmap(lambda p, x: jnp.argmax(model.apply({"params": p}, x), -1), in_axes=(0, None)))
    x, y = jnp.asarray(test.images), test.labels
    acc = np.mean(np.asarray(pred_fn(params, x)) == y[None], axis=1)
    out = []
    for i, s in enumerate(specs):
        rec = {"group": s["group"], "seed": s["seed"], "target": s["target"], "clean_accuracy": float(acc[i])}
        if s["target"] is not None:
            p_i = jax.tree.map(lambda a: a[i:i + 1], params)
            others = y != s["target"]
            a, pat = s["trigger"][0], s["trigger"][1]
            for name, (aa, pp) in (("attack_success", (a, pat)), ("moved_success", (a[::-1, ::-1], pat[::-1, ::-1]))):
                xs = (1 - aa[..., None]) * test.images[others] + aa[..., None] * pp
                rec[name] = float(np.mean(np.asarray(pred_fn(p_i, jnp.asarray(xs)))[0] == s["target"]))
        out.append(rec)
    return out


def run_chunked(fn, params, keys, chunk: int):
    """Compile ``vmap(fn)`` (one model -> its result) once for ``chunk`` models, run every chunk; returns (stacked outputs, run seconds, compile s)."""
    m = keys.shape[0]
    sl = lambda t, a, b: jax.tree.map(lambda v: v[a:b], t)  # noqa: E731
    t0 = time.time()
    compiled = jax.jit(jax.vmap(fn)).lower(sl(params, 0, chunk), keys[:chunk]).compile()
    compile_s = time.time() - t0
    pad = -m % chunk   # a short last chunk is padded with the first models (their outputs dropped)
    if pad:
        params = jax.tree.map(lambda v: jnp.concatenate([v, v[:pad]]), params)
        keys = jnp.concatenate([keys, keys[:pad]])
    outs, run_s = [], 0.0
    for a in range(0, m + pad, chunk):
        t0 = time.time()
        outs.append(jax.block_until_ready(compiled(sl(params, a, a + chunk), keys[a:a + chunk])))
        run_s += time.time() - t0
    out = jax.tree.map(lambda *v: np.concatenate([np.asarray(x) for x in v])[:m], *outs)
    return out, run_s * m / (m + pad), compile_s


def decide(stat, groups, targets, names):
    """The calibrated protocol for one method: statistic ``[M, K]`` -> per-group scores, suspects, threshold
    and rates for both scoring rules."""
    ref = stat[groups == "reference"]
    out = {}
    for rule in ("reference", "within"):
        use_ref = rule == "reference"
        score, suspect = bd.model_score(stat, side="low", reference=ref if use_ref else None)
        ref_scores = bd.reference_scores(ref, side="low", calibrate_on_references=use_ref)
        thr = bd.false_alarm_threshold(ref_scores, FALSE_ALARM)
        clean = score[groups == "clean"]
        r = {"threshold": thr, "reference_scores": ref_scores.tolist(), "clean_scores": clean.tolist(),
             "reference_false_alarm": float(np.mean(ref_scores > thr)),
             "clean_false_alarm": float(np.mean(clean > thr)), "kinds": {}}
        for kind in KINDS:
            sel = groups == kind
            if not sel.any():
                continue
            correct = suspect[sel] == targets[sel]
            det, _ = bd.detection_rates(thr, score[sel], correct, clean)
            curve = bd.roc(score[sel], correct, clean)
            r["kinds"][kind] = {"scores": score[sel].tolist(), "suspect_is_target": correct.tolist(),
                                "detection": det, "n": int(sel.sum()), "auc": curve.auc,
                                "roc_false_alarm": curve.false_alarm.tolist(), "roc_detection": curve.detection.tolist()}
        if use_ref:   # the fixed rule of Neural Cleanse (within-model MAD > 2) for comparison
            pass
        out[rule] = r
    w_score, w_suspect = bd.model_score(stat, side="low")
    out["fixed_mad_2"] = {"clean_false_alarm": float(np.mean(w_score[groups == "clean"] > 2.0)),
                          "detection": {k: float(np.mean((w_score[groups == k] > 2.0)
                                                         & (w_suspect[groups == k] == targets[groups == k])))
                                        for k in KINDS if (groups == k).any()}}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=tuple(SCALES), default="small")
    p.add_argument("--dataset", default="mnist_digits", choices=("mnist_digits", "digits"))
    p.add_argument("--heads", default=",".join(HEADS))
    p.add_argument("--out", default=None)
    p.add_argument("--radius-fraction", type=float, default=0.5)
    p.add_argument("--ia-budget", type=int, default=1,
                   help="multiply the input-agnostic main and continuation steps (a budget/success trade-off)")
    args = p.parse_args(argv)
    cfg = SCALES[args.scale]
    out = args.out or os.path.join("runs", f"backdoor_calibrated-{args.dataset}-{args.scale}")
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    train, test = common.load(args.dataset, image_size=28 if args.dataset == "mnist_digits" else 8,
                              max_train=cfg["max_train"])
    hw, shape = train.images.shape[1:3], tuple(train.images.shape[1:])
    lo = float(train.normalize(np.zeros(1))[0])
    hi = float(train.normalize(np.ones(1))[0])
    radius = args.radius_fraction * float(np.sqrt(np.prod(shape))) * (hi - lo)
    ia_cfg = dict(cfg["ia"], steps=cfg["ia"]["steps"] * args.ia_budget,
                  curve_steps=cfg["ia"]["curve_steps"] * args.ia_budget)
    ia_opts = InputAgnosticOptions(low=lo, high=hi, norm="l2", radius=radius, chunk=ia_cfg["samples"], **ia_cfg)
    nc_images = jnp.asarray(test.images[:cfg["nc_images"]])
    results = {"dataset": args.dataset, "scale": args.scale, "radius": radius, "false_alarm": FALSE_ALARM,
               "level": LEVEL, "ia_budget": args.ia_budget, "ia_options": ia_cfg, "poison_rate": POISON_RATE, "blend_alpha": BLEND_ALPHA, "config": {
                   k: v for k, v in cfg.items()}, "heads": {}}
    for head in args.heads.split(","):
        # GAP pools the last conv's channels into the only features the dense layer sees: 2 * width = 8 channels
        # trained to 38 % accuracy (first run), 32 channels x 4 epochs to 66 % (second run), so the GAP models get a
        # 32-channel last conv, 8 epochs and a larger learning rate
        extra = cfg["gap"] if head == "gap" else dict(last_width=0, epochs=cfg["epochs"], lr=2e-3)
        model = SmallCNN(head=head, width=cfg["width"], last_width=extra["last_width"])
        specs = model_specs(cfg, hw, lo, hi)
        t0 = time.time()
        params = train_models(model, specs, train, extra["epochs"], lr=extra["lr"])
        train_s = time.time() - t0
        print(f"[{time.time() - t_start:.0f}s] {head}: trained {len(specs)} models in {train_s:.0f}s", flush=True)
        recs = evaluate(model, params, specs, test)
        logits = lambda q: (lambda x: model.apply({"params": q}, x))  # noqa: E731
        keys = jnp.stack([jax.random.PRNGKey(7 + s["seed"]) for s in specs])
        ia, ia_s, ia_c = run_chunked(lambda q, k: input_agnostic(logits(q), shape, "all", key=k, options=ia_opts),
                                     params, keys, cfg["chunk"])
        nc, nc_s, nc_c = run_chunked(lambda q, k: neural_cleanse(logits(q), nc_images, "all", key=k, low=lo, high=hi,
                                                                 **cfg["nc"]), params, keys, cfg["chunk"])
        print(f"[{time.time() - t_start:.0f}s] {head}: IA {ia_s:.0f}s (+{ia_c:.0f}s compile), NC {nc_s:.0f}s "
              f"(+{nc_c:.0f}s compile)", flush=True)
        st = bd.class_statistics(jax.tree.map(jnp.asarray, ia), level=LEVEL)
        groups = np.array([s["group"] for s in specs])
        targets = np.array([-1 if s["target"] is None else s["target"] for s in specs])
        m = len(specs)
        ia_stat = np.log(np.asarray(st.radius))
        nc_stat = np.log(np.maximum(np.asarray(nc.l1), 1e-6))
        head_res = {"train_seconds": train_s, "models": m,
                    "seconds_per_model": {"input_agnostic": ia_s / m, "neural_cleanse": nc_s / m},
                    "compile_seconds": {"input_agnostic": ia_c, "neural_cleanse": nc_c},
                    "decision": {"input_agnostic": decide(ia_stat, groups, targets, None),
                                 "neural_cleanse": decide(nc_stat, groups, targets, None),
                                 "input_agnostic_area": decide(-np.asarray(st.success_area), groups, targets, None)},
                    "raw": {"groups": groups.tolist(), "targets": targets.tolist(),
                            "ia_radius": np.asarray(st.radius).tolist(), "ia_area": np.asarray(st.success_area).tolist(),
                            "ia_success": np.asarray(ia.success).tolist(), "ia_radii": np.asarray(ia.radii)[0, 0].tolist(),
                            "nc_l1": np.asarray(nc.l1).tolist(), "nc_success": np.asarray(nc.success).tolist()},
                    "clean_accuracy": {g: float(np.mean([r["clean_accuracy"] for r in recs if r["group"] == g]))
                                       for g in ("reference", "clean") + KINDS if (groups == g).any()},
                    "attack_success": {k: [r["attack_success"] for r in recs if r["group"] == k] for k in KINDS},
                    "moved_success": {k: [r["moved_success"] for r in recs if r["group"] == k] for k in KINDS},
                    "localization": {}}
        ia_heat, nc_mask = np.asarray(st.heatmap), np.asarray(nc.mask)
        gallery = []
        for kind in KINDS:
            idx = [i for i in range(m) if groups[i] == kind]
            loc = {"ia_iou": [], "ia_iou_area": [], "nc_iou": [], "nc_iou_area": [], "chance_iou_area": []}
            for i in idx:
                planted = specs[i]["trigger"][2]
                t = specs[i]["target"]
                area = int(planted.sum())
                loc["ia_iou"].append(float(bd.iou(bd.localize(jnp.asarray(ia_heat[i, t])), planted)))
                loc["ia_iou_area"].append(float(bd.iou(bd.localize(jnp.asarray(ia_heat[i, t]), area=area), planted)))
                loc["nc_iou"].append(float(bd.iou(bd.localize(jnp.asarray(nc_mask[i, t])), planted)))
                loc["nc_iou_area"].append(float(bd.iou(bd.localize(jnp.asarray(nc_mask[i, t]), area=area), planted)))
                frac = area / planted.size   # a random set of `area` pixels: expected IoU = f^2 / (2 f - f^2)
                loc["chance_iou_area"].append(frac * frac / (2 * frac - frac * frac))
            head_res["localization"][kind] = loc
            if idx:
                i = idx[0]
                gallery.append((f"{head}/{kind} t{specs[i]['target']}", specs[i]["trigger"], ia_heat[i, specs[i]["target"]],
                                nc_mask[i, specs[i]["target"]]))
        # the maps as an interpretation: clean evaluated models
        ce = np.flatnonzero(groups == "clean")
        head_res["class_maps"] = _map_checks(model, params, ia, ce, lo, hi)
        head_res["ia_fidelity_clean"] = float(np.mean(np.asarray(ia.fidelity)[ce]))
        results["heads"][head] = head_res
        _plot_class_maps(ia, ce[0], os.path.join(out, f"class_maps_{head}.png"),
                         f"{args.dataset}, clean {head}-head CNN (seed {specs[ce[0]]['seed']})")
        _plot_gallery(gallery, os.path.join(out, f"localization_{head}.png"))
        _plot_roc(head_res, os.path.join(out, f"roc_{head}.png"), head)
        common.write_results(out, results, stem=f"partial_{head}")   # kept if a later head fails
    results["comparisons"] = _comparisons(results)
    results["total_seconds"] = time.time() - t_start
    results["environment"] = common.environment()
    common.write_results(out, results)
    print(common.to_json(_summary(results))[:6000])
    return results


def _map_checks(model, params, ia, idx, lo, hi) -> dict:
    """Do the all-class maps of clean models carry class evidence? (i) each model's accuracy on its own maps (the
    display image mapped to the input box), (ii) other models' accuracy on them (same head, other training seeds),
    (iii) cosine of the maps of the same class across seeds vs of different classes across seeds."""
    disp = np.asarray(ia.display)[idx]                       # [M, K, H, W, 1]
    rho = np.asarray(ia.map)[idx].reshape(len(idx), disp.shape[1], -1)
    k = disp.shape[1]
    pred_fn = jax.jit(jax.vmap(lambda p, x: jnp.argmax(model.apply({"params": p}, x), -1), in_axes=(0, None)))
    sub = jax.tree.map(lambda a: a[idx], params)
    acc = np.zeros((len(idx), len(idx)))                      # [model j, maps of model i]
    for i in range(len(idx)):
        pred = np.asarray(pred_fn(sub, jnp.asarray(lo + (hi - lo) * disp[i])))
        acc[:, i] = np.mean(pred == np.arange(k)[None], axis=1)
    own = np.diag(acc)
    cross = np.array([np.mean(np.delete(acc[:, i], i)) for i in range(len(idx))])
    unit = rho / np.maximum(np.linalg.norm(rho, axis=-1, keepdims=True), 1e-30)
    same, diff = [], []
    for i in range(len(idx)):
        cs = np.einsum("jkd,ld->jkl", np.delete(unit, i, 0), unit[i])   # [M-1, K (other model's class), K (mine)]
        same.append(float(np.mean(np.einsum("jkk->jk", cs))))
        diff.append(float((cs.sum() - np.einsum("jkk->", cs)) / (cs.shape[0] * k * (k - 1))))
    return {"own_accuracy": own.tolist(), "cross_model_accuracy": cross.tolist(), "chance": 1.0 / k,
            "cosine_same_class_across_seeds": same, "cosine_other_class_across_seeds": diff,
            "same_vs_other": paired_comparison(same, diff).as_dict() if len(same) > 1 else None}


def _comparisons(results) -> dict:
    """Paired comparisons (same seeds) of the orderings RESULTS states."""
    out = {}
    heads = results["heads"]
    if set(HEADS) <= set(heads):
        for kind in KINDS:
            for meth in ("ia_iou", "ia_iou_area", "nc_iou", "nc_iou_area"):
                a = heads["flatten"]["localization"][kind][meth]
                b = heads["gap"]["localization"][kind][meth]
                if len(a) > 1:
                    out[f"{meth} {kind}: flatten vs gap"] = paired_comparison(a, b).as_dict()
            a, b = heads["flatten"]["moved_success"][kind], heads["gap"]["moved_success"][kind]
            if len(a) > 1 and kind != "blend":
                out[f"moved-trigger success {kind}: flatten vs gap"] = paired_comparison(a, b).as_dict()
    for head, h in heads.items():
        for kind in KINDS:
            loc = h["localization"][kind]
            if len(loc["ia_iou_area"]) > 1:
                out[f"{head} {kind}: IA vs NC iou_area"] = paired_comparison(loc["ia_iou_area"],
                                                                            loc["nc_iou_area"]).as_dict()
    return out


def _summary(results) -> dict:
    s = {}
    for head, h in results["heads"].items():
        s[head] = {"acc": h["clean_accuracy"], "s/model": h["seconds_per_model"],
                   "attack": {k: float(np.mean(v)) if v else None for k, v in h["attack_success"].items()},
                   "moved": {k: float(np.mean(v)) if v else None for k, v in h["moved_success"].items()}}
        for meth, d in h["decision"].items():
            for rule in ("reference", "within"):
                r = d[rule]
                s[head][f"{meth}/{rule}"] = {"FA_ref": r["reference_false_alarm"], "FA_clean": r["clean_false_alarm"],
                                              **{k: (v["detection"], round(v["auc"], 3)) for k, v in r["kinds"].items()}}
            s[head][f"{meth}/mad2"] = d["fixed_mad_2"]
        s[head]["iou"] = {k: {m: float(np.mean(v)) if v else None for m, v in loc.items()}
                          for k, loc in h["localization"].items()}
        cm = h["class_maps"]
        s[head]["maps"] = {"own": float(np.mean(cm["own_accuracy"])), "cross": float(np.mean(cm["cross_model_accuracy"])),
                           "same": float(np.mean(cm["cosine_same_class_across_seeds"])),
                           "other": float(np.mean(cm["cosine_other_class_across_seeds"]))}
    return s


def _plot_class_maps(ia, i, path, title) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    disp, heat, fid = np.asarray(ia.display)[i], np.asarray(ia.heatmap)[i], np.asarray(ia.fidelity)[i]
    k = disp.shape[0]
    fig = Figure(figsize=(1.2 * k, 2.7))
    FigureCanvasAgg(fig)
    for c in range(k):
        ax = fig.add_subplot(2, k, c + 1)
        ax.imshow(disp[c, ..., 0], cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{c}: {fid[c]:.2f}", fontsize=8)
        ax.axis("off")
        ax = fig.add_subplot(2, k, k + c + 1)
        ax.imshow(heat[c], cmap="inferno")
        ax.axis("off")
    fig.suptitle(title + " — top: input-agnostic map scaled to [0, 1] (class: fidelity); bottom: heat map",
                 fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def _plot_gallery(gallery, path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not gallery:
        return
    fig = Figure(figsize=(4.2, 1.5 * len(gallery)))
    FigureCanvasAgg(fig)
    for r, (name, trig, heat, mask) in enumerate(gallery):
        planted = trig[0] * (trig[1][..., 0] - trig[1].min() + 0.2)
        for j, (img, title) in enumerate(((planted, "planted (alpha x pattern)"), (heat, "IA heat, target"),
                                          (mask, "NC mask, target"))):
            ax = fig.add_subplot(len(gallery), 3, 3 * r + j + 1)
            ax.imshow(img, cmap="inferno")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def _plot_roc(h, path, head) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.0))
    FigureCanvasAgg(fig)
    for j, meth in enumerate(("input_agnostic", "neural_cleanse")):
        ax = fig.add_subplot(1, 2, j + 1)
        for kind, v in h["decision"][meth]["reference"]["kinds"].items():
            ax.step(v["roc_false_alarm"], v["roc_detection"], where="post",
                    label=f"{kind} (n={v['n']}, AUC {v['auc']:.2f})")
        ax.axvline(FALSE_ALARM, color="gray", lw=0.5, ls="--")
        ax.set_xlabel("false alarms (clean evaluated models)", fontsize=7)
        ax.set_ylabel("detected with right target", fontsize=7)
        ax.set_title(f"{meth}, {head} head", fontsize=8)
        ax.legend(fontsize=6)
    fig.savefig(path, dpi=100, bbox_inches="tight")


if __name__ == "__main__":
    main(sys.argv[1:])
