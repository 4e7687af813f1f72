"""Cost of each chapter-2 regularized train step relative to a plain cross-entropy step.

Every objective is built with :func:`gradjax.losses.make_loss_fn` and compiled by the one step builder
(:func:`gradjax.train.jit_train_step`); the teacher's variables go in as the step's ``frozen`` argument. Each step
is timed as the median of ``--repeats`` runs of ``--steps`` steps after one warm-up (compile) call, and reported as
a multiple of the cross-entropy step beside the multiple we expect from counting passes (thesis §2.4: Jacobian
matching ≈ 2x a step, against ~1e4x for the Monte-Carlo noise augmentation it replaces).

    python -m benchmarks.train_step_cost [--model vgg4|vgg9] [--width 0.125] [--batch 32] [--size 32] [--out DIR]

Expected multiples (one CE step = one forward F + one backward ~2F = 3F; teacher = same architecture here):
A adds a teacher forward (~1.3x); J adds a frozen student forward, its input-gradient backward, the
double-backward through it, and a teacher forward + backward (~2.5-3x; the thesis says 2x because the clean
pass and the input-gradient can share one forward — we pay one extra forward for exact per-example BatchNorm
gradients); full J multiplies the input-gradient passes by K; the stochastic form replaces them with one JVP per
probe; the gradient-norm penalty is J without the teacher (~2-2.5x).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradjax import train as gtrain
from gradjax.losses import combine as C
from gradjax.models import create_model

OBJECTIVES = {
    # name: (terms, expected multiple of a CE step, note)
    "CE": (lambda: [C.cross_entropy()], 1.0, "baseline"),
    "CE + l2": (lambda: [C.cross_entropy(), C.l2()], 1.0, "parameter norm only"),
    "CE + A": (lambda: [C.cross_entropy(), C.activation_matching()], 1.3, "+ teacher forward"),
    "CE + J (target)": (lambda: [C.cross_entropy(), C.jacobian_matching()], 2.7, "thesis: ~2x"),
    "CE + {A+J}": (lambda: [C.cross_entropy(), C.activation_matching(), C.jacobian_matching()], 2.7, "thesis: ~2x"),
    "CE + J (full, K rows)": (lambda: [C.cross_entropy(), C.jacobian_matching(output="full")], None, "K backward rows"),
    "CE + J stochastic (1 JVP probe)": (lambda: [C.cross_entropy(), C.stochastic_jacobian_matching()], 2.7,
                                        "one JVP per network"),
    "CE + J stochastic (1 VJP probe)": (lambda: [C.cross_entropy(),
                                                 C.stochastic_jacobian_matching(probe_space="output")], 2.7,
                                        "one VJP per network"),
    "CE + noisy A (1 antithetic pair)": (lambda: [C.cross_entropy(), C.noisy_activation_matching(sigma=0.1)], 2.3,
                                         "2 noisy student + teacher passes; ~1e4 samples to match J"),
    "CE + grad-norm (eq. 2.3)": (lambda: [C.cross_entropy(), C.gradient_norm(0.1)], 2.3, "double backprop"),
    "CE + att (eq. 2.8)": (lambda: [C.cross_entropy(), C.attention_matching(pairs=[("block1", "block1")])], 1.3,
                           "+ teacher forward"),
    "CE + att-Jacobian (§2.5.2)": (lambda: [C.cross_entropy(), C.attention_jacobian_matching(
        student_layer="block1", teacher_layer="block1")], 2.7, "like J, at a feature map"),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg4")
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated subset of objectives")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(args.batch, args.size, args.size, 1)).astype(np.float32),
             "label": (np.arange(args.batch) % args.classes).astype(np.int32)}
    model = create_model(args.model, args.classes, width=args.width)
    teacher = model.init(jax.random.PRNGKey(1), batch["image"][:2], train=False)
    frozen = {"teacher": teacher}
    names = list(OBJECTIVES) if not args.only else [n.strip() for n in args.only.split(",")]
    if "CE" not in names:
        names = ["CE"] + names
    out = {}
    for name in names:
        terms, expected, note = OBJECTIVES[name]
        step = gtrain.jit_train_step(C.make_loss_fn(model.apply, terms(), teacher_apply_fn=model.apply),
                                     num_classes=args.classes, donate=False)
        state = gtrain.create_train_state(model, optax.adam(1e-3), batch["image"][:2])
        t = time.perf_counter()
        s, _ = step(state, batch, frozen)
        jax.block_until_ready(s.params)
        compile_s = time.perf_counter() - t
        times = []
        for _ in range(args.repeats):
            s = state
            t = time.perf_counter()
            for _ in range(args.steps):
                s, _ = step(s, batch, frozen)
            jax.block_until_ready(s.params)
            times.append((time.perf_counter() - t) / args.steps)
        out[name] = {"step_ms": 1e3 * float(np.median(times)), "compile_s": compile_s, "expected": expected,
                     "note": note}
        if expected is None:  # full Jacobian: K input-gradient rows instead of one
            out[name]["expected"] = f"~{1 + 0.6 * args.classes:.0f}"
        print(f"{name:36s} {out[name]['step_ms']:8.1f} ms  ({out[name]['step_ms'] / out['CE']['step_ms']:.2f}x CE; "
              f"expected {out[name]['expected']})", flush=True)
    base = out["CE"]["step_ms"]
    for v in out.values():
        v["multiple_of_ce"] = v["step_ms"] / base
    lines = ["| objective | step (ms) | × CE step | expected × | note |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {v['step_ms']:.1f} | {v['multiple_of_ce']:.2f} | {v['expected']} | {v['note']} |"
              for n, v in out.items()]
    table = "\n".join(lines)
    meta = {"model": args.model, "width": args.width, "batch": args.batch, "image": [args.size, args.size, 1],
            "classes": args.classes, "steps": args.steps, "repeats": args.repeats, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_step_cost.json"), "w") as f:
        json.dump({"meta": meta, "results": out}, f, indent=2)
    with open(os.path.join(args.out, "train_step_cost.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return out


if __name__ == "__main__":
    main()
