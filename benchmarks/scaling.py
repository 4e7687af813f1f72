"""Scaling curves: the input-gradient's throughput and memory against batch size, image size and model width.

Does throughput (images/s) grow with the batch until the machine saturates, and where does memory run out? For a
VGG classifier, the jitted input-gradient (one forward + one backward pass, the unit every saliency method is
counted in) is timed for each point of three sweeps, one variable at a time around a base configuration:

* batch size ``--batch-sizes`` (base image size and width);
* image size ``--image-sizes`` (base batch and width);
* width ``--widths`` (base batch and image size).

Each point: median images/s over ``--repeats`` calls and the compiled temporary memory; memory is extrapolated
linearly in the batch to the machine's RAM (``os.sysconf``) to say at which batch size it would run out.

    python -m benchmarks.scaling                 # ~3 minutes on 2 cores; writes docs/benchmarks_scaling.png

Writes ``benchmarks/results/scaling-<backend>.json`` and the PNG (``--png``).
"""
from __future__ import annotations

from benchmarks._common import configure_xla, load_record

XLA_PRESET = configure_xla()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks._common import machine  # noqa: E402
from gradjax import saliency as S  # noqa: E402
from gradjax.models import create_model  # noqa: E402


def point(model_name: str, width: float, batch: int, size: int, repeats: int) -> dict:
    model = create_model(model_name, 10, width=width)
    x = jax.random.uniform(jax.random.PRNGKey(0), (batch, size, size, 3))
    h = S.ModelHandle(model.apply, model.init(jax.random.PRNGKey(1), x[:1], train=False))
    t = jnp.zeros((batch,), jnp.int32)
    compiled = jax.jit(lambda hh, xb, tt: S.input_gradient(hh, xb, tt, reduce=None)).lower(h, x, t).compile()
    jax.block_until_ready(compiled(h, x, t))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(h, x, t))
        ts.append(time.perf_counter() - t0)
    try:
        temp = float(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:
        temp = float("nan")
    sec = statistics.median(ts)
    return {"batch": batch, "image_size": size, "width": width, "seconds": sec, "images_per_s": batch / sec,
            "temp_bytes": temp, "load": os.getloadavg()[0]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg9")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-sizes", default="1,4,16,64,256")
    p.add_argument("--image-sizes", default="32,64,96")
    p.add_argument("--widths", default="0.125,0.25,0.5,1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--xla", default="default")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--png", default=os.path.join("docs", "benchmarks_scaling.png"))
    args = p.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    sweeps = {
        "batch size": [point(args.model, args.width, b, args.image_size, args.repeats) for b in ints(args.batch_sizes)],
        "image size": [point(args.model, args.width, args.batch_size, s, args.repeats) for s in ints(args.image_sizes)],
        "width": [point(args.model, float(w), args.batch_size, args.image_size, args.repeats)
                  for w in args.widths.split(",")],
    }
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    big = sweeps["batch size"][-1]
    per_image = big["temp_bytes"] / big["batch"]
    oom_batch = int(ram / per_image) if per_image > 0 else None
    lines = [f"Input-gradient of {args.model} (jitted), {jax.devices()[0].device_kind} ({os.cpu_count()} cores), "
             f"XLA preset `{XLA_PRESET}`, median of {args.repeats}; base: batch {args.batch_size}, "
             f"{args.image_size}x{args.image_size}x3, width {args.width}. RAM {ram / 2**30:.0f} GiB: at "
             f"{per_image / 2**20:.2f} MiB of temporaries per image the batch would run out of memory near "
             f"{oom_batch} images.", "", "| sweep | value | images/s | ms | temp MB | load |", "|---|---|---|---|---|---|"]
    key = {"batch size": "batch", "image size": "image_size", "width": "width"}
    for name, pts in sweeps.items():
        for r in pts:
            lines.append(f"| {name} | {r[key[name]]} | {r['images_per_s']:.0f} | {1e3 * r['seconds']:.1f} | "
                         f"{r['temp_bytes'] / 2**20:.1f} | {r['load']:.1f} |")
    table = "\n".join(lines)
    print(table)
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        for ax, (name, pts) in zip(axes, sweeps.items()):
            xs = [r[key[name]] for r in pts]
            ax.plot(xs, [r["images_per_s"] for r in pts], "o-", color="C0")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(name)
            ax.set_ylabel("images/s", color="C0")
            ax2 = ax.twinx()
            ax2.plot(xs, [r["temp_bytes"] / 2**20 for r in pts], "s--", color="C1")
            ax2.set_ylabel("temp MB", color="C1")
            ax2.set_yscale("log")
        fig.suptitle(f"input-gradient, {args.model}, {jax.devices()[0].device_kind} ({os.cpu_count()} cores)",
                     fontsize=9)
        fig.tight_layout()
        os.makedirs(os.path.dirname(args.png) or ".", exist_ok=True)
        fig.savefig(args.png, dpi=80)
    except ImportError:
        print("matplotlib not installed: no PNG")
    result = {"args": vars(args), "machine": machine({"xla_preset": XLA_PRESET, "ram_bytes": ram}),
              "sweeps": sweeps, "oom_batch_estimate": oom_batch, "table": table}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"scaling-{jax.default_backend()}.json"), "w") as f:
        json.dump({**result, "load": load_record()}, f, indent=2, default=float)
    return result


if __name__ == "__main__":
    main()
