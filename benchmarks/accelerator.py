"""The benchmark suite on an accelerator (GPU/TPU) in one command: images/s, time per call, fraction of the chip's
measured matmul rate, and a bfloat16 run whose maps are checked against float32.

    python -m benchmarks.accelerator                       # on the accelerator: VGG-16 width 1, batch 64, 32x32
    python -m benchmarks.accelerator --preset cpu-smoke    # a minute on a CPU (checks that the script runs)

Steps, all in one process on ``jax.devices()[0]``:

1. the chip's matmul rate, measured here: a jitted ``n x n`` float32 and bfloat16 matmul (``--matmul-n``), FLOP
   rate ``2 n^3 / time`` (median of ``--repeats``);
2. every saliency method of the comparison (gradient, gradient x input, guided backprop, Grad-CAM, FullGrad,
   integrated gradients with ``--steps`` steps, SmoothGrad with ``--steps`` samples) and one cross-entropy train
   step (the one engine, :func:`gradjax.train.jit_train_step`): time per call, images/s, the compiled program's
   FLOPs (``compiled.cost_analysis()``) divided by the time, and that rate as a fraction of the measured float32
   (and bfloat16) matmul rate;
3. ``--bf16``: the same saliency methods with the parameters and the input cast to bfloat16, time, and agreement
   with the float32 maps (relative L2 error and Spearman rank correlation of the channel-reduced maps, the ranking
   being what pixel-removal metrics use).

Never part of CI. Writes ``benchmarks/results/accelerator-<backend>.json`` and prints markdown tables.
"""
from __future__ import annotations

from benchmarks._common import configure_xla

XLA_PRESET = configure_xla()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks._common import machine  # noqa: E402
from gradjax import saliency as S  # noqa: E402
from gradjax import train as gtrain  # noqa: E402
from gradjax.losses import terms as LT  # noqa: E402
from gradjax.models import create_model  # noqa: E402
from gradjax.models.vgg import VGG_CONFIGS  # noqa: E402

PRESETS = {
    "accelerator": dict(model="vgg16", width=1.0, batch_size=64, image_size=32, steps=32, matmul_n=8192, repeats=10),
    "cpu-smoke": dict(model="vgg4", width=0.125, batch_size=4, image_size=16, steps=4, matmul_n=512, repeats=3),
}


def timed(fn, *args, repeats: int):
    """``(median seconds, flops of the compiled program or nan, output)``; compile and one warm-up excluded."""
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", float("nan")))
    except Exception:
        flops = float("nan")
    out = jax.block_until_ready(compiled(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), flops, out


def matmul_rate(n: int, dtype, repeats: int) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    t, _, _ = timed(lambda u, v: u @ v, a, b, repeats=repeats)
    return 2.0 * n ** 3 / t


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over examples of the Spearman rank correlation of two ``[B, ...]`` maps."""
    out = []
    for u, v in zip(a.reshape(len(a), -1), b.reshape(len(b), -1)):
        ru, rv = np.argsort(np.argsort(u)), np.argsort(np.argsort(v))
        out.append(np.corrcoef(ru, rv)[0, 1])
    return float(np.mean(out))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="accelerator", choices=sorted(PRESETS))
    for k in PRESETS["accelerator"]:
        p.add_argument("--" + k.replace("_", "-"), type=type(PRESETS["accelerator"][k]), default=None)
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--xla", default="default")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    cfg.update({k: v for k, v in vars(args).items() if k in cfg and v is not None})
    R = cfg["repeats"]

    rate32 = matmul_rate(cfg["matmul_n"], jnp.float32, R)
    rate16 = matmul_rate(cfg["matmul_n"], jnp.bfloat16, R)
    print(f"matmul {cfg['matmul_n']}^2: float32 {rate32 / 1e12:.2f} TFLOP/s, bfloat16 {rate16 / 1e12:.2f} TFLOP/s",
          flush=True)

    model = create_model(cfg["model"], 10, width=cfg["width"])
    B, n = cfg["batch_size"], cfg["image_size"]
    x = jax.random.uniform(jax.random.PRNGKey(0), (B, n, n, 3))
    variables = model.init(jax.random.PRNGKey(1), x[:1], train=False)
    n_blocks = sum(1 for layer in VGG_CONFIGS[cfg["model"]] if layer != "M")
    methods = {
        "gradient": ("gradient", {}),
        "gradient x input": ("grad_x_input", {}),
        "guided backprop": ("guided_backprop", {}),
        "Grad-CAM": ("gradcam", {"layer": f"block{n_blocks - 1}"}),
        "FullGrad": ("fullgrad", {}),
        f"integrated gradients ({cfg['steps']} steps)": ("integrated_gradients", {"steps": cfg["steps"]}),
        f"SmoothGrad ({cfg['steps']} samples)": ("smoothgrad", {"samples": cfg["steps"]}),
    }
    key = jax.random.PRNGKey(2)

    def run_all(variables, xin):
        h = S.ModelHandle(model.apply, variables)
        t = jnp.argmax(h.logits(xin), -1)
        res = {}
        for name, (m, opts) in methods.items():
            fn = lambda hh, xb, tt, k, m=m, opts=opts: S.SALIENCY_METHODS[m](hh, xb, tt, key=k, **opts)  # noqa: E731
            res[name] = timed(fn, h, xin, t, key, repeats=R)
        return res

    f32 = run_all(variables, x)
    rows = {name: {"ms": 1e3 * t, "images_per_s": B / t, "flops": fl, "flop_rate": fl / t,
                   "fraction_of_f32_matmul": fl / t / rate32} for name, (t, fl, _) in f32.items()}
    # one cross-entropy train step of the engine
    batch = {"image": np.asarray(x), "label": np.arange(B, dtype=np.int32) % 10}
    step = gtrain.jit_train_step(LT.make_loss_fn(model.apply, [LT.cross_entropy_term()]), num_classes=10, donate=False)
    state = gtrain.create_train_state(model, optax.sgd(1e-3), batch["image"][:2])
    jax.block_until_ready(step(state, batch, {})[0].params)
    ts = []
    for _ in range(R):
        t0 = time.perf_counter()
        jax.block_until_ready(step(state, batch, {})[0].params)
        ts.append(time.perf_counter() - t0)
    t_step = statistics.median(ts)
    rows["CE train step"] = {"ms": 1e3 * t_step, "images_per_s": B / t_step, "flops": float("nan"),
                             "flop_rate": float("nan"), "fraction_of_f32_matmul": float("nan")}
    if args.bf16:
        v16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, variables)
        b16 = run_all(v16, x.astype(jnp.bfloat16))
        for name, (t, fl, out) in b16.items():
            ref = np.asarray(f32[name][2], np.float32)
            got = np.asarray(jnp.asarray(out, jnp.float32))
            rows[name].update({"bf16_ms": 1e3 * t, "bf16_speedup": rows[name]["ms"] / (1e3 * t),
                               "bf16_fraction_of_bf16_matmul": fl / t / rate16,
                               "bf16_rel_l2": float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)),
                               "bf16_spearman": spearman(got, ref)})
    dev = jax.devices()[0]
    lines = [f"{dev.device_kind} ({jax.default_backend()}), {cfg['model']} width {cfg['width']}, batch {B}x{n}x{n}x3, "
             f"median of {R}; measured matmul rate {rate32 / 1e12:.2f} TFLOP/s (float32), "
             f"{rate16 / 1e12:.2f} TFLOP/s (bfloat16).", "",
             "| method | ms | images/s | TFLOP/s | fraction of f32 matmul rate | bf16 ms | bf16 speed-up | "
             "bf16 rel. L2 error | bf16 Spearman |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['ms']:.2f} | {r['images_per_s']:.0f} | {r['flop_rate'] / 1e12:.3f} | "
                     f"{r['fraction_of_f32_matmul']:.3f} | {r.get('bf16_ms', float('nan')):.2f} | "
                     f"{r.get('bf16_speedup', float('nan')):.2f} | {r.get('bf16_rel_l2', float('nan')):.1e} | "
                     f"{r.get('bf16_spearman', float('nan')):.3f} |")
    table = "\n".join(lines)
    print(table)
    result = {"config": cfg, "machine": machine({"xla_preset": XLA_PRESET}), "matmul_flops_f32": rate32,
              "matmul_flops_bf16": rate16, "rows": rows, "table": table}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"accelerator-{jax.default_backend()}-{args.preset}.json"), "w") as f:
        json.dump(result, f, indent=2, default=float)
    return result


if __name__ == "__main__":
    main()
