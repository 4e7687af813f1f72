"""Make every pass count: what ``n`` integrated-gradients steps / SmoothGrad samples cost in gradients, per chunk size.

For one batch of a VGG classifier, the plain input-gradient (one forward + one backward pass over ``B`` images) is
the unit. Integrated gradients with ``n`` steps and SmoothGrad with ``n`` samples are timed for each chunk size of
``--chunks`` (``auto`` = the memory-budget default, ``chunk=None``; an int = that many path points / samples per
batched model call, the full chunks in one ``lax.scan`` and the remainder after it; ``3u`` = chunks of 3 with
``loop="unroll"``, no while loop) and reported as

    gradients per step = time(method) / (n * time(gradient))          (goal: <= 1.1)

beside the compiled program's temporary memory (``compiled.memory_analysis().temp_size_in_bytes``) and the chunk
the memory budget picked. All rows are timed round-robin in one process (medians; the load average is recorded:
the machine is shared).

    python -m benchmarks.chunking_cost --batch-size 8 --steps 50      # ~3 minutes on 2 cores
    python -m benchmarks.chunking_cost --xla xnnpack ...              # an XLA:CPU flag preset (benchmarks/_common.py)

Writes ``benchmarks/results/chunking_cost-<backend>-b<B>.json``.
"""
from __future__ import annotations

from benchmarks._common import configure_xla, load_record

XLA_PRESET = configure_xla()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks._common import interleaved, load_note, machine  # noqa: E402
from gradjax import saliency  # noqa: E402
from gradjax._chunking import DEFAULT_MEMORY_BUDGET, auto_chunk  # noqa: E402
from gradjax.gradients import logits_and_target_gradient  # noqa: E402
from gradjax.models import create_model  # noqa: E402


def compile_fn(fn, *args):
    """``(compiled, temp bytes, compile seconds)``."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    secs = time.perf_counter() - t0
    try:
        temp = float(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports memory
        temp = float("nan")
    return compiled, temp, secs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg9")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=50, help="IG steps and SmoothGrad samples")
    p.add_argument("--chunks", default="auto,8,25",
                   help="comma-separated: auto and/or ints; an int ending in u (e.g. 3u) runs loop='unroll'")
    p.add_argument("--methods", default="integrated_gradients,smoothgrad")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--xla", default="default", help="XLA:CPU flag preset (read before JAX starts)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)

    model = create_model(args.model, 10, width=args.width)
    x = jax.random.uniform(jax.random.PRNGKey(0), (args.batch_size, args.image_size, args.image_size, 3))
    variables = model.init(jax.random.PRNGKey(1), x[:1], train=False)
    handle = saliency.ModelHandle(model.apply, variables)
    target = jnp.argmax(handle.logits(x), -1)
    key = jax.random.PRNGKey(2)
    n = args.steps

    def per_item(a):  # one IG path point / noise sample = one gradient over the batch
        pts = (a.reshape((-1, 1, 1, 1, 1)) * x[None]).reshape((-1,) + x.shape[1:])
        return logits_and_target_gradient(handle.logits, pts, jnp.tile(target, a.shape[0])).gradient

    fns, info = {}, {}
    grad, temp, secs = compile_fn(lambda h, xb, t, k: saliency.input_gradient(h, xb, t, reduce=None),
                                  handle, x, target, key)
    fns["gradient"] = lambda: grad(handle, x, target, key)
    info["gradient"] = {"temp_bytes": temp, "compile_s": secs, "passes": 1, "chunk": "-"}
    for method in args.methods.split(","):
        count = "steps" if method == "integrated_gradients" else "samples"
        for c in args.chunks.split(","):
            chunk = None if c == "auto" else int(c.rstrip("u"))
            opts = {count: n, "chunk": chunk, "loop": "unroll" if c.endswith("u") else "scan"}
            fn = lambda h, xb, t, k, method=method, opts=opts: saliency.SALIENCY_METHODS[method](  # noqa: E731
                h, xb, t, key=k, reduce=None, **opts)
            compiled, temp, secs = compile_fn(fn, handle, x, target, key)
            name = f"{method} n={n} chunk={c}"
            if chunk is None:  # what the budget picked: the estimate the library makes for one gradient per item
                chunk = auto_chunk(per_item, jnp.ones((n,), x.dtype), n)
            fns[name] = lambda compiled=compiled: compiled(handle, x, target, key)
            info[name] = {"temp_bytes": temp, "compile_s": secs, "passes": n, "chunk": chunk}
    med, runs, loads = interleaved(fns, args.repeats)
    g = med["gradient"]
    rows = {k: dict(info[k], run_s=med[k], runs_s=runs[k], gradients_per_pass=med[k] / (info[k]["passes"] * g),
                    temp_over_gradient=info[k]["temp_bytes"] / info["gradient"]["temp_bytes"]) for k in fns}
    lines = [f"{args.model} width {args.width}, batch {args.batch_size}x{args.image_size}x{args.image_size}x3, "
             f"{jax.devices()[0].device_kind} ({os.cpu_count()} cores), XLA preset `{XLA_PRESET}`, medians of "
             f"{args.repeats} interleaved rounds, {load_note(loads)}; memory budget "
             f"{DEFAULT_MEMORY_BUDGET / 2**20:.0f} MiB.", "",
             "| method | chunk used | run ms | gradients per pass (goal ≤ 1.1) | temp MB | temp / gradient |",
             "|---|---|---|---|---|---|"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['chunk']} | {1e3 * r['run_s']:.1f} | {r['gradients_per_pass']:.2f} | "
                     f"{r['temp_bytes'] / 2**20:.1f} | {r['temp_over_gradient']:.1f} |")
    table = "\n".join(lines)
    print(table)
    result = {"args": vars(args), "machine": machine({"xla_preset": XLA_PRESET}), "loads": loads, "rows": rows,
              "table": table}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"chunking_cost-{jax.default_backend()}-b{args.batch_size}"
                                     f"{'' if XLA_PRESET == 'default' else '-' + XLA_PRESET}.json"), "w") as f:
        json.dump({**result, "load": load_record(loads)}, f, indent=2, default=float)
    return result


if __name__ == "__main__":
    main()
