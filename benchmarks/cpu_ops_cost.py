"""The opt-in CPU implementations end to end: each saliency method of the Captum comparison under every
``create_model(conv_impl=..., pool_impl=...)`` variant, and the IG batching strategy (path points per call).

Same network, weights and batch as ``benchmarks/peers_captum.py`` (VGG-9 width 0.25, non-trivial BatchNorm
statistics, batch 32 of 32x32x3). Variants (``--variants``, ``conv/pool``): ``lax/lax`` (gradjax's default),
``lax/mask`` (max-pool without ``select_and_scatter``), ``im2col_small/mask``, ``im2col/mask`` (see
:mod:`gradjax.models.cpu_ops`). Every (method, variant) is compiled first, then all are timed round-robin in one
process, rotated (:func:`benchmarks._common.interleaved`); ``speed-up = default time / variant time``. The maps of
every variant are compared with the default's (max |diff| / max |ref|). ``--ig-chunks``: IG-32 with that many path
points per call (``chunk=``; ``auto`` = the library's memory-budget default, one call here).

    python -m benchmarks.cpu_ops_cost                       # ~3-4 min on 2 idle cores
    python -m benchmarks.cpu_ops_cost --smoke               # code-path check

Writes ``benchmarks/results/cpu_ops_cost-cpu.json``.
"""
from __future__ import annotations

from benchmarks._common import configure_xla

XLA_PRESET = configure_xla()

import argparse  # noqa: E402
import os  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import interleaved, load_note, machine, nontrivial_batch_stats, write_result  # noqa: E402
from gradjax import saliency  # noqa: E402
from gradjax.models import create_model  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg9")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--ig-steps", type=int, default=32)
    p.add_argument("--smoothgrad-samples", type=int, default=16)
    p.add_argument("--variants", default="lax/lax,lax/mask,im2col_small/mask,im2col/mask")
    p.add_argument("--methods", default="gradient,integrated_gradients,smoothgrad_sq,guided_backprop,fullgrad")
    p.add_argument("--ig-chunks", default="auto,256,64", help="IG path points per call under the default variant")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--xla", default="default")
    p.add_argument("--threads", default=None)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.width, args.batch_size, args.image_size = "vgg4", 0.125, 2, 16
        args.ig_steps, args.smoothgrad_samples, args.repeats, args.ig_chunks = 4, 2, 1, "auto,4"
    variants = args.variants.split(",")
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch_size, args.image_size, args.image_size, 3))
    base = create_model(args.model, 10, width=args.width)
    v = base.init(jax.random.PRNGKey(1), x[:1], train=False)
    v = nontrivial_batch_stats(base, v, x)
    key = jax.random.PRNGKey(3)
    opts = {"gradient": {"reduce": None}, "integrated_gradients": {"steps": args.ig_steps, "reduce": None},
            "smoothgrad_sq": {"samples": args.smoothgrad_samples, "reduce": None},
            "guided_backprop": {"reduce": None}, "fullgrad": {}}
    methods = args.methods.split(",")
    fns, handles = {}, {}
    for var in variants:
        conv_impl, pool_impl = var.split("/")
        model = create_model(args.model, 10, width=args.width, conv_impl=conv_impl, pool_impl=pool_impl)
        h = handles[var] = saliency.ModelHandle(model.apply, v)
        target = np.argmax(np.asarray(h.logits(x)), -1)
        for m in methods:
            c = saliency.jit_method(m, **opts[m])
            fns[f"{m} | {var}"] = lambda c=c, h=h, target=target: c(h, x, target, key=key)
    h0 = handles[variants[0]]
    target = np.argmax(np.asarray(h0.logits(x)), -1)
    if "integrated_gradients" in methods:
        for ch in args.ig_chunks.split(","):
            if ch == "auto":
                continue
            c = saliency.jit_method("integrated_gradients", steps=args.ig_steps, reduce=None,
                                    chunk=max(1, int(ch) // args.batch_size))
            fns[f"integrated_gradients chunk {ch} images | {variants[0]}"] = lambda c=c: c(h0, x, target, key=key)
    agreement = {}
    for name, fn in fns.items():  # compile (the warm-up) and compare the maps with the default variant's
        m, var = name.split(" | ")
        out = np.asarray(fn())
        ref_name = f"{m.split(' chunk')[0]} | {variants[0]}"
        ref = np.asarray(fns[ref_name]())
        agreement[name] = float(
            np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))
    med, runs, loads = interleaved(fns, args.repeats, warmup=0, rotate=True)
    lines = [f"{args.model} width {args.width}, batch {args.batch_size}x{args.image_size}x{args.image_size}x3, "
             f"IG {args.ig_steps} steps, SmoothGrad² {args.smoothgrad_samples} samples; medians of {args.repeats} "
             f"rotated round-robin rounds, {load_note(loads)}; XLA preset `{XLA_PRESET}`. Entry: ms (speed-up over "
             f"`{variants[0]}`); maps: max |diff| / max |default|.", "",
             "| method | " + " | ".join(f"`{q}`" for q in variants) + " | max map diff |",
             "|---|" + "---|" * (len(variants) + 1)]
    rows = {}
    for m in methods:
        t0 = med[f"{m} | {variants[0]}"]
        cells = [f"{1e3 * med[f'{m} | {q}']:.1f} ({t0 / med[f'{m} | {q}']:.2f})" for q in variants]
        diff = max(agreement[f"{m} | {q}"] for q in variants)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {diff:.1e} |")
        rows[m] = {q: {"s": med[f"{m} | {q}"], "speedup": t0 / med[f"{m} | {q}"], "runs": runs[f"{m} | {q}"],
                       "map_rel_diff": agreement[f"{m} | {q}"]} for q in variants}
    chunk_rows = {k: v for k, v in med.items() if " chunk " in k}
    if chunk_rows:
        t0 = med[f"integrated_gradients | {variants[0]}"]
        lines += ["", f"IG {args.ig_steps} steps, images per call (`{variants[0]}`): auto "
                  f"{1e3 * t0:.0f} ms; " + "; ".join(f"{k.split(' chunk ')[1].split(' |')[0]} {1e3 * s:.0f} ms "
                                                     f"({t0 / s:.2f})" for k, s in chunk_rows.items())]
    table = "\n".join(lines)
    print(table)
    result = {"args": vars(args), "machine": machine({"xla_preset": XLA_PRESET}), "rows": rows,
              "chunks_s": chunk_rows, "loads": loads, "table": table}
    suffix = "-smoke" if args.smoke else ""
    return write_result(os.path.join(args.out, f"cpu_ops_cost-cpu{suffix}.json"), result, loads)


if __name__ == "__main__":
    main()
