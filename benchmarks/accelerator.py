"""The benchmark suite on an accelerator (GPU/TPU) in one command: images/s, time per call, honest utilisation
(analytic FLOPs over the chip's measured matmul rate), and what TF32 / bfloat16 buy in time and cost in accuracy.

    python -m benchmarks.accelerator            # on the accelerator: VGG-16 width 1, batch 256, 32x32 (~3 min, H200)
    python -m benchmarks.accelerator --smoke    # a CPU smoke run (tiny sizes; checks that the script runs)

Steps, all in one process on ``jax.devices()[0]``:

1. the chip's matmul rate, measured here: a jitted ``n x n`` matmul (``--matmul-n``, median of ``--repeats``) at
   float32 ``precision=HIGHEST`` (exact), float32 ``DEFAULT`` (TF32 on Ampere/Hopper GPUs, one bfloat16 pass on
   TPUs) and bfloat16 operands; rate ``2 n^3 / time``;
2. every saliency method (gradient, gradient x input, guided backprop, Grad-CAM, FullGrad, integrated gradients
   with ``--steps`` steps, SmoothGrad with ``--steps`` samples) and the cross-entropy and gradient-norm (double
   backprop) train steps of the one engine, for the model at three precisions (:mod:`gradjax.precision`):
   ``exact`` (gradjax's default, ``precision="highest"``), ``tf32`` (``precision="default"``) and ``bf16``
   (``dtype=jnp.bfloat16``: bfloat16 compute, float32 parameters): time per call, images/s, **analytic FLOPs** —
   the multiply-adds of every ``dot_general`` / ``conv_general_dilated`` in the traced program (forward and
   backward), counted from the operand shapes (:func:`product_flops`; XLA's GPU ``cost_analysis()`` misses the
   cuDNN convolution custom calls and read ~0.001 of the real rate) — divided by the time, as a fraction of the
   measured matmul rate of the same precision;
3. agreement of the tf32 / bf16 maps with the exact ones (Spearman rank correlation of the channel-reduced maps,
   relative L2 error) and FullGrad's completeness residual at each precision;
4. ``--train-epochs N`` (default 3; 0 skips): train the model on the embedded digits (32x32) at each precision with
   the CE step and report wall time and test accuracy (mixed precision vs float32 in time and final accuracy).

Never part of CI. Writes ``benchmarks/results/accelerator-<backend>-<preset>.json`` and prints markdown tables.
"""
from __future__ import annotations

from benchmarks._common import configure_xla, load_record

XLA_PRESET = configure_xla()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks._common import machine  # noqa: E402
from gradjax import data as gdata  # noqa: E402
from gradjax import precision as P  # noqa: E402
from gradjax import saliency as S  # noqa: E402
from gradjax import train as gtrain  # noqa: E402
from gradjax.fullgrad import completeness_residual  # noqa: E402
from gradjax.losses import terms as LT  # noqa: E402
from gradjax.models import create_model  # noqa: E402
from gradjax.models.vgg import VGG_CONFIGS  # noqa: E402

PRESETS = {
    "accelerator": dict(model="vgg16", width=1.0, batch_size=256, image_size=32, steps=32, matmul_n=8192, repeats=10,
                        train_epochs=3),
    "smoke": dict(model="vgg4", width=0.125, batch_size=4, image_size=16, steps=2, matmul_n=256, repeats=2,
                  train_epochs=0),
}
PRESETS["cpu-smoke"] = PRESETS["smoke"]
PRECISIONS = {"exact": dict(precision="highest"), "tf32": dict(precision="default"), "bf16": dict(dtype=jnp.bfloat16)}
RATE_OF = {"exact": "f32_highest", "tf32": "f32_default", "bf16": "bf16"}


# ------------------------------------------------------------------------------------------------ analytic FLOPs
# (sub-programs of scan / cond / pjit / custom_vjp equations: gradjax.precision._subjaxprs, the walk its audit uses)
def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[i] for i in lc)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out = eqn.outvars[0].aval.shape
            o_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            total += 2.0 * math.prod(out) * math.prod(rhs) / rhs[o_dim]
        inner = sum(_jaxpr_flops(sub) for sub in P._subjaxprs(eqn.params))
        if name == "scan":
            inner *= eqn.params["length"]
        elif name == "cond":
            inner = max((_jaxpr_flops(b.jaxpr) for b in eqn.params["branches"]), default=0.0)
        total += inner
    return total


def product_flops(fn, *args) -> float:
    """FLOPs (2 per multiply-add) of every matrix product and convolution in ``fn(*args)``'s traced program, forward
    and backward, from the operand shapes: ``dot_general`` ``2 prod(out) prod(contracting)``, convolution
    ``2 prod(out) prod(kernel) / out_features`` (the dilated zeros of a strided convolution's transpose are
    counted); ``scan`` bodies times their length. Elementwise work is not counted. Platform-independent."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


# ------------------------------------------------------------------------------------------------------- timing
def timed(fn, *args, repeats: int):
    """``(median seconds, output)``; compile and one warm-up excluded."""
    compiled = jax.jit(fn).lower(*args).compile()
    out = jax.block_until_ready(compiled(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def matmul_rates(n: int, repeats: int) -> dict:
    """Measured FLOP/s of an ``n x n`` matmul: float32 at HIGHEST and DEFAULT precision, bfloat16."""
    out = {}
    for name, dtype, prec in (("f32_highest", jnp.float32, jax.lax.Precision.HIGHEST),
                              ("f32_default", jnp.float32, jax.lax.Precision.DEFAULT),
                              ("bf16", jnp.bfloat16, jax.lax.Precision.DEFAULT)):
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
        t, _ = timed(lambda u, v, prec=prec: jnp.matmul(u, v, precision=prec), a, b, repeats=repeats)
        out[name] = 2.0 * n ** 3 / t
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over examples of the Spearman rank correlation of two ``[B, ...]`` maps."""
    out = []
    for u, v in zip(a.reshape(len(a), -1), b.reshape(len(b), -1)):
        ru, rv = np.argsort(np.argsort(u)), np.argsort(np.argsort(v))
        out.append(np.corrcoef(ru, rv)[0, 1])
    return float(np.mean(out))


def train_accuracy(model, epochs: int, batch_size: int) -> dict:
    """Train ``model`` on the embedded digits (32x32) with the CE step for ``epochs``; wall time and test accuracy."""
    train, test = gdata.load_dataset("digits", "train"), gdata.load_dataset("digits", "test")
    step = gtrain.jit_train_step(LT.make_loss_fn(model.apply, [LT.cross_entropy_term()]), num_classes=10)
    state = gtrain.create_train_state(model, optax.adam(1e-3), train.images[:2])
    bs = min(batch_size, 128)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for batch in gdata.batches(train, bs, seed=0, epoch=epoch):
            state, _ = step(state, batch)
    jax.block_until_ready(state.params)
    wall = time.perf_counter() - t0
    ev = gtrain.evaluate(state, gdata.batches(test, 256, shuffle=False, drop_remainder=False),
                         gtrain.make_eval_step(model.apply))
    return {"train_s": wall, "test_accuracy": float(ev["accuracy"])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="accelerator", choices=sorted(PRESETS))
    p.add_argument("--smoke", action="store_true", help="the CPU smoke preset (tiny sizes)")
    for k in PRESETS["accelerator"]:
        p.add_argument("--" + k.replace("_", "-"), type=type(PRESETS["accelerator"][k]), default=None)
    p.add_argument("--xla", default="default")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    preset = "smoke" if args.smoke else args.preset
    cfg = dict(PRESETS[preset])
    cfg.update({k: v for k, v in vars(args).items() if k in cfg and v is not None})
    R = cfg["repeats"]
    warnings.simplefilter("ignore", P.PrecisionWarning)  # tf32 / bf16 are chosen on purpose here

    rates = matmul_rates(cfg["matmul_n"], R)
    print("matmul " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in rates.items()), flush=True)

    B, n = cfg["batch_size"], cfg["image_size"]
    x = jax.random.uniform(jax.random.PRNGKey(0), (B, n, n, 3))
    labels = np.arange(B, dtype=np.int32) % 10
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
    variables = create_model(cfg["model"], 10, width=cfg["width"]).init(jax.random.PRNGKey(1), x[:1], train=False)
    batch = {"image": np.asarray(x), "label": labels}
    rows, maps, completeness, training = {}, {}, {}, {}
    for prec, kw in PRECISIONS.items():
        model = create_model(cfg["model"], 10, width=cfg["width"], **kw)
        h = S.ModelHandle(model.apply, variables)
        t = jnp.argmax(create_model(cfg["model"], 10, width=cfg["width"]).apply(variables, x), -1)
        rate = rates[RATE_OF[prec]]
        for name, (m, opts) in methods.items():
            fn = lambda hh, xb, tt, k, m=m, opts=opts: S.SALIENCY_METHODS[m](hh, xb, tt, key=k, **opts)  # noqa: E731
            flops = product_flops(fn, h, x, t, key)
            sec, out = timed(fn, h, x, t, key, repeats=R)
            maps[(prec, name)] = np.asarray(jnp.asarray(out, jnp.float32))
            rows[(prec, name)] = {"ms": 1e3 * sec, "images_per_s": B / sec, "tflops": flops / 1e12,
                                  "tflop_rate": flops / sec / 1e12, "fraction_of_matmul": flops / sec / rate}
        completeness[prec] = float(jnp.max(jax.jit(lambda hh, xb, tt: completeness_residual(hh, xb, tt))(h, x, t)))
        for step_name, terms in (("CE train step", [LT.cross_entropy_term()]),
                                 ("gradient-norm train step", [LT.cross_entropy_term(),
                                                               LT.gradient_norm_term(0.1)])):
            step = gtrain.jit_train_step(LT.make_loss_fn(model.apply, terms), num_classes=10, donate=False)
            state = gtrain.create_train_state(model, optax.sgd(1e-3), batch["image"][:2])
            flops = product_flops(lambda s, b, terms=terms: _step_body(model, terms, s, b), state, batch)
            jax.block_until_ready(step(state, batch, {})[0].params)
            ts = []
            for _ in range(R):
                t0 = time.perf_counter()
                jax.block_until_ready(step(state, batch, {})[0].params)
                ts.append(time.perf_counter() - t0)
            sec = statistics.median(ts)
            rows[(prec, step_name)] = {"ms": 1e3 * sec, "images_per_s": B / sec, "tflops": flops / 1e12,
                                       "tflop_rate": flops / sec / 1e12, "fraction_of_matmul": flops / sec / rate}
        if cfg["train_epochs"] > 0:
            training[prec] = train_accuracy(model, cfg["train_epochs"], B)
    for (prec, name), r in rows.items():
        if (prec, name) in maps and prec != "exact":
            ref, got = maps[("exact", name)], maps[(prec, name)]
            r["spearman_vs_exact"] = spearman(got, ref)
            r["rel_l2_vs_exact"] = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
        r["speedup_vs_exact"] = rows[("exact", name)]["ms"] / r["ms"]

    dev = jax.devices()[0]
    lines = [f"{dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, {cfg['model']} width "
             f"{cfg['width']}, batch {B}x{n}x{n}x3, median of {R}; measured matmul rate "
             + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in rates.items()) + ". Utilisation = analytic "
             "product FLOPs / time / the matmul rate of the same precision (exact: f32_highest, tf32: f32_default, "
             "bf16: bf16).", "",
             "| precision | method | ms | images/s | TFLOP/s (analytic) | fraction of matmul rate | speed-up vs exact | "
             "Spearman vs exact | rel. L2 vs exact |", "|---|---|---|---|---|---|---|---|---|"]
    for (prec, name), r in rows.items():
        lines.append(f"| {prec} | {name} | {r['ms']:.2f} | {r['images_per_s']:.0f} | {r['tflop_rate']:.2f} | "
                     f"{r['fraction_of_matmul']:.3f} | {r['speedup_vs_exact']:.2f} | "
                     f"{r.get('spearman_vs_exact', float('nan')):.4f} | {r.get('rel_l2_vs_exact', float('nan')):.1e} |")
    lines += ["", "| precision | FullGrad completeness (max rel.) | train s | test accuracy |", "|---|---|---|---|"]
    for prec in PRECISIONS:
        tr = training.get(prec, {})
        lines.append(f"| {prec} | {completeness[prec]:.1e} | {tr.get('train_s', float('nan')):.1f} | "
                     f"{tr.get('test_accuracy', float('nan')):.4f} |")
    table = "\n".join(lines)
    print(table)
    result = {"config": cfg, "machine": machine({"xla_preset": XLA_PRESET}), "matmul_flops": rates,
              "rows": {f"{p_} | {n_}": r for (p_, n_), r in rows.items()}, "completeness": completeness,
              "training": training, "table": table}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"accelerator-{jax.default_backend()}-{preset}.json"), "w") as f:
        json.dump({**result, "load": load_record()}, f, indent=2, default=float)
    return result


def _step_body(model, terms, state, batch):
    """The gradient of one train step's loss (what the step's products are), for :func:`product_flops`."""
    loss_fn = LT.make_loss_fn(model.apply, terms)
    ctx = gtrain.StepContext(jax.random.PRNGKey(0), state.step, {})
    return jax.grad(lambda p: loss_fn(p, state.model_state, batch, ctx)[0])(state.params)


if __name__ == "__main__":
    main()
