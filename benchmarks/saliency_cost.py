"""Cost of every saliency method and Hessian-trace estimator, side by side in one run, as ratios.

Saliency: each method of :data:`gradjax.saliency.SALIENCY_METHODS` on one batch of a VGG classifier, reported as
its run time and compiled temporary memory divided by those of the plain input-gradient (one forward and one
backward pass). The thesis's claim (§3.4) is that FullGrad costs about one backward pass, like the gradient,
while integrated gradients and SmoothGrad cost one per step / sample.

Trace estimators (thesis §5.3): Hutchinson (forward-over-reverse Hessian-vector products), the forward-only
Taylor estimator, Hutch++ and (``--exact-trace``) the exact trace of ``log p(x) = logsumexp f(x)`` for the same
architecture with softplus activations, as ratios to one input-gradient of that function.

    python -m benchmarks.saliency_cost                       # CPU, ~2 minutes
    python -m benchmarks.saliency_cost --model vgg16 --width 1 --batch-size 64   # on a GPU

Prints a markdown table and writes ``benchmarks/results/saliency_cost-<backend>.json``. Timings are medians of
``--repeats`` runs after a warm-up call (compilation excluded and reported separately).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

from benchmarks._common import load_record, pin_threads  # noqa: E402

pin_threads()  # XLA's threads (PJRT_NPROC, affinity) before JAX starts; records the load before

import jax
import jax.numpy as jnp

from gradjax import saliency, trace
from gradjax.models import create_model

# Per-method options for the cost comparison: the library defaults, stated so the table says what was timed.
METHOD_OPTIONS = {"integrated_gradients": {"steps": 32}, "smoothgrad": {"samples": 16},
                  "smoothgrad_sq": {"samples": 16}, "vargrad": {"samples": 16}, "smooth_fullgrad": {"samples": 16}}


def time_call(fn: Callable, *args, repeats: int) -> tuple[float, float, float | None]:
    """(compile seconds, median run seconds, temporary bytes of the compiled program or None)."""
    jitted = jax.jit(fn)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - t0)
    try:
        temp = float(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports memory
        temp = None
    return compile_s, statistics.median(runs), temp


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg9")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--trace-probes", type=int, default=16)
    p.add_argument("--exact-trace", action="store_true", help="also time the exact trace (D HVPs; slow on CPU)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)

    model = create_model(args.model, 10, width=args.width)
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch_size, args.image_size, args.image_size, args.channels))
    variables = model.init(jax.random.PRNGKey(1), x[:1], train=False)
    handle = saliency.ModelHandle(model.apply, variables)
    key = jax.random.PRNGKey(2)

    rows = {}
    for name, method in saliency.SALIENCY_METHODS.items():
        opts = METHOD_OPTIONS.get(name, {})
        fn = lambda h, xb, k, method=method, opts=opts: method(h, xb, key=k, **opts)
        rows[name] = time_call(fn, handle, x, key, repeats=args.repeats) + (str(opts or ""),)

    # The trace estimators need a smooth f: the same network with softplus (beta = 10, thesis ch. 5) and
    # f = logsumexp of the logits (the implicit density model's log p(x) up to a constant, thesis §5.2). With ReLU
    # the input-Hessian of a piecewise-linear network is zero and JAX prunes the Hessian-vector products away.
    smooth = create_model(args.model, 10, width=args.width, activation="softplus")
    smooth_vars = smooth.init(jax.random.PRNGKey(1), x[:1], train=False)

    def log_density(xb):  # a scalar per example
        return jax.nn.logsumexp(smooth.apply(smooth_vars, xb, train=False), axis=-1)

    n = args.trace_probes
    trace_fns = {
        "input-gradient (reference)": lambda xb, k: jax.grad(lambda z: jnp.sum(log_density(z)))(xb),
        f"hutchinson ({n} HVPs)": lambda xb, k: trace.hutchinson_trace(log_density, xb, k, num_probes=n),
        f"taylor one-sided ({n} forwards)": lambda xb, k: trace.taylor_trace(log_density, xb, k, sigma=0.01,
                                                                             num_probes=n, warn_rtol=None),
        f"taylor antithetic ({2 * n} forwards)": lambda xb, k: trace.taylor_trace(
            log_density, xb, k, sigma=0.01, num_probes=n, form="antithetic", warn_rtol=None),
        f"hutch++ ({n} matvecs)": lambda xb, k: trace.hutchpp_trace(log_density, xb, k, num_matvecs=n),
    }
    if args.exact_trace:
        d = x[0].size
        trace_fns[f"exact ({d} HVPs)"] = lambda xb, k: trace.exact_trace(log_density, xb, max_dim=d)
    trows = {name: time_call(fn, x, key, repeats=args.repeats) for name, fn in trace_fns.items()}

    base = rows["gradient"]
    tbase = trows["input-gradient (reference)"]
    ratio = lambda a, b: (a / b) if (a is not None and b) else float("nan")
    lines = [f"Device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {args.model} width {args.width}, "
             f"batch {args.batch_size}x{args.image_size}x{args.image_size}x{args.channels}, median of {args.repeats}.",
             "", "| saliency method | options | run ms | time / gradient | temp memory / gradient | compile s |",
             "|---|---|---|---|---|---|"]
    for name, (c, r, m, o) in rows.items():
        lines.append(f"| {name} | {o} | {1e3 * r:.2f} | {r / base[1]:.2f} | {ratio(m, base[2]):.2f} | {c:.1f} |")
    lines += ["", "| trace estimator | run ms | time / input-gradient | temp memory / input-gradient | compile s |",
              "|---|---|---|---|---|"]
    for name, (c, r, m) in trows.items():
        lines.append(f"| {name} | {1e3 * r:.2f} | {r / tbase[1]:.2f} | {ratio(m, tbase[2]):.2f} | {c:.1f} |")
    table = "\n".join(lines)
    print(table)

    result = {"args": vars(args), "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
              "saliency": {k: {"compile_s": v[0], "run_s": v[1], "temp_bytes": v[2], "options": v[3]}
                           for k, v in rows.items()},
              "trace": {k: {"compile_s": v[0], "run_s": v[1], "temp_bytes": v[2]} for k, v in trows.items()},
              "table": table}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"saliency_cost-{jax.default_backend()}.json"), "w") as f:
        json.dump({**result, "load": load_record()}, f, indent=2, default=float)
    return result


if __name__ == "__main__":
    main()
