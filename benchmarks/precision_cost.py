"""What reduced matmul precision costs in accuracy, measured on the CPU with emulated GPU/TPU rounding (issue 23).

    python -m benchmarks.precision_cost            # ~1-2 minutes on 2 CPU cores

One VGG (default VGG-9 width 1/4 on the embedded 32x32 digits, random He-normal weights with non-trivial biases and
BatchNorm statistics, as tests/test_fullgrad.py) is evaluated at four precisions of its products:

* ``exact``: float32 (gradjax's default policy, ``precision="highest"``);
* ``tf32``: ``emulate="gpu"`` under ``jax.default_matmul_precision("tensorfloat32")`` (operands rounded to 10
  mantissa bits, what an Ampere/Hopper GPU does by default);
* ``bf16 (TPU default)``: ``emulate="tpu"`` under ``"bfloat16"`` (7 bits, one bfloat16 pass);
* ``bf16 mixed``: ``create_model(..., dtype=jnp.bfloat16)`` (bfloat16 compute, float32 parameters) — real bfloat16.

For each: full-gradient completeness (max relative residual over the batch), and the Spearman rank correlation
(mean over examples) and relative L2 error of the maps (gradient, integrated gradients 16 steps, SmoothGrad 16
samples, FullGrad) against the exact ones; and the Taylor trace round-off floor at sigma = 0.05 relative to exact.
Writes ``benchmarks/results/precision_cost.json`` and prints a markdown table. Never part of CI.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import warnings

from benchmarks._common import load_record, pin_threads  # noqa: E402

pin_threads()  # XLA's threads (PJRT_NPROC, affinity) before JAX starts; records the load before

import jax
import jax.numpy as jnp
import numpy as np

from gradjax import data, saliency as S, trace
from gradjax import precision as P
from gradjax.fullgrad import full_gradients
from gradjax.model import ModelHandle
from gradjax.models import create_model

SETTINGS = {
    "exact": (dict(precision="highest"), None),
    "tf32 (GPU default)": (dict(precision=None, emulate="gpu"), "tensorfloat32"),
    "bf16 (TPU default)": (dict(precision=None, emulate="tpu"), "bfloat16"),
    "bf16 mixed (dtype)": (dict(dtype=jnp.bfloat16), None),
}
METHODS = {"gradient": ("gradient", {}), "integrated gradients": ("integrated_gradients", {"steps": 16}),
           "SmoothGrad": ("smoothgrad", {"samples": 16}), "FullGrad": ("fullgrad", {})}


def fill(model, x, seed):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    shapes = {k: shapes[k] for k in ("params", "batch_stats") if k in shapes}

    def value(path, s):
        name, shape = path[-1].key, s.shape
        a = {"kernel": lambda: rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1])),
             "bias": lambda: 0.1 * rng.normal(size=shape), "scale": lambda: 1.0 + 0.2 * rng.normal(size=shape),
             "mean": lambda: 0.2 * rng.normal(size=shape), "var": lambda: rng.uniform(0.5, 2.0, size=shape)}[name]()
        return jnp.asarray(a, s.dtype)

    return jax.tree_util.tree_map_with_path(value, shapes)


def spearman(a, b) -> float:
    out = []
    for u, v in zip(np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)):
        ru, rv = np.argsort(np.argsort(u)), np.argsort(np.argsort(v))
        out.append(np.corrcoef(ru, rv)[0, 1])
    return float(np.mean(out))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg9")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    t0 = time.time()
    x = jnp.asarray(data.load_dataset("digits", "test").images[:args.batch_size], jnp.float32)
    v = fill(create_model(args.model, 10, width=args.width), x, 1)
    key = jax.random.PRNGKey(0)
    maps, rows = {}, {}
    for name, (kw, ctx_name) in SETTINGS.items():
        model = create_model(args.model, 10, width=args.width, **kw)
        h = ModelHandle(model.apply, v)
        ctx = jax.default_matmul_precision(ctx_name) if ctx_name else contextlib.nullcontext()
        with ctx, warnings.catch_warnings():
            warnings.simplefilter("ignore", P.PrecisionWarning)
            t = jnp.argmax(model.apply(v, x), -1) if name == "exact" else maps["exact"]["target"]
            fg = jax.jit(lambda h_, x_, t_: full_gradients(h_, x_, t_))(h, x, t)
            out = {"target": t}
            for label, (m, opts) in METHODS.items():
                out[label] = np.asarray(jax.jit(lambda h_, x_, t_, m=m, opts=opts: S.SALIENCY_METHODS[m](
                    h_, x_, t_, key=key, **opts))(h, x, t), np.float32)
            lse = lambda z: jax.nn.logsumexp(model.apply(v, z), -1)  # noqa: E731
            floor = np.asarray(trace.taylor_noise_floor(lse, x, sigma=0.05).roundoff)
        maps[name] = out
        rows[name] = {"completeness_max_rel": float(jnp.max(fg.relative_residual())),
                      "taylor_floor_median": float(np.median(floor))}
    for name, r in rows.items():
        for label in METHODS:
            ref, got = maps["exact"][label], maps[name][label]
            r[f"{label} spearman"] = spearman(got, ref)
            r[f"{label} rel_l2"] = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
        r["taylor_floor_vs_exact"] = r["taylor_floor_median"] / rows["exact"]["taylor_floor_median"]
    head = ["precision", "completeness (max rel.)"] + [f"{m} Spearman / rel. L2" for m in METHODS] + [
        "Taylor floor vs exact"]
    lines = [f"{args.model} width {args.width}, batch {args.batch_size} embedded digits 32x32, random weights; CPU with "
             f"emulated rounding; jax {jax.__version__}; {time.time() - t0:.0f} s.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name, f"{r['completeness_max_rel']:.1e}"] + [
            f"{r[m + ' spearman']:.4f} / {r[m + ' rel_l2']:.1e}" for m in METHODS] + [f"{r['taylor_floor_vs_exact']:.0f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "precision_cost.json"), "w") as f:
        json.dump({"config": vars(args), "rows": rows, "table": table, "load": load_record()}, f, indent=2,
                  default=float)
    return {"rows": rows, "table": table}


if __name__ == "__main__":
    main()
