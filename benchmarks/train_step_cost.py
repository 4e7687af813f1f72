"""Cost of each chapter-2 regularized train step relative to a plain cross-entropy step.

Every objective is built with :func:`gradjax.losses.make_loss_fn` and compiled by the one step builder
(:func:`gradjax.train.jit_train_step`); the teacher's variables go in as the step's ``frozen`` argument. All steps are
compiled first, then timed **round-robin in one process** (``benchmarks/_common.py:interleaved``: ``--repeats`` rounds
of ``--steps`` steps each, the order rotated every round, medians, the 1-minute load average recorded — the machine is
shared), and reported as a multiple of the cross-entropy step beside the multiple we expect from counting passes
(thesis §2.4: Jacobian matching ≈ 2x a step, against ~1e4x for the Monte-Carlo noise augmentation it replaces) and two
static counts of the compiled step: XLA's FLOPs (``cost_analysis``) and the convolutions in its jaxpr (a ``scan`` body
counted ``length`` times), each as a multiple of the CE step's.

    python -m benchmarks.train_step_cost [--model vgg4|vgg9] [--width 0.125] [--batch 32] [--size 32] [--out DIR]

Expected multiples (one CE step = one forward F + one backward ~2F = 3F; teacher = same architecture here):
A adds a teacher forward (~1.3x); J adds a frozen student forward, its input-gradient backward, the
double-backward through it, and a teacher forward + backward (~2.5-3x; the thesis says 2x because the clean
pass and the input-gradient can share one forward — we pay one extra forward for exact per-example BatchNorm
gradients); full J multiplies the input-gradient passes by K; the stochastic form replaces them with one JVP per
probe; the gradient-norm penalty is J without the teacher (~2-2.5x). Noisy activation matching with one antithetic
pair adds two noisy student passes with their backward (2 x 3F) and two teacher forwards (2F): (3F + 8F) / 3F ≈ 3.7x
(an earlier version of this table expected 2.3x, counting the noisy passes as forwards only). The row "noisy A
(lax.map loop; before the fix)" is the loss as it was before 2026-12-02 (one noise sample per ``lax.map``
iteration), kept to measure the change to one batched call.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from benchmarks._common import load_record, pin_threads  # noqa: E402

pin_threads()  # XLA's threads (PJRT_NPROC, affinity) before JAX starts; records the load before

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._common import compiled_cost, interleaved, load_note, machine
from gradjax import train as gtrain
from gradjax.losses import terms as LT
from gradjax.losses import distillation as D
from gradjax.models import create_model


def noisy_activation_matching_lax_map(sigma: float) -> LT.Term:
    """The noisy activation-matching term as it was before 2026-12-02: the same one antithetic pair, one noise
    sample per ``lax.map`` iteration (a loop of two), for comparison with the batched loss of the library."""
    def fn(inp):
        xi = sigma * jax.random.normal(inp.rng, (1,) + tuple(inp.x.shape), dtype=inp.x.dtype)
        xi = jnp.concatenate([xi, -xi], axis=0)

        def one(e):
            z = inp.x + e
            return D.activation_matching(inp.student(z), jax.lax.stop_gradient(inp.teacher(z)))
        return jnp.mean(jax.lax.map(one, xi), axis=0)
    return LT.term("noisy_act_lax_map", fn)


OBJECTIVES = {
    # name: (terms, expected multiple of a CE step, note)
    "CE": (lambda: [LT.cross_entropy_term()], 1.0, "baseline"),
    "CE + l2": (lambda: [LT.cross_entropy_term(), LT.l2_term()], 1.0, "parameter norm only"),
    "CE + A": (lambda: [LT.cross_entropy_term(), LT.activation_matching_term()], 1.3, "+ teacher forward"),
    "CE + J (target)": (lambda: [LT.cross_entropy_term(), LT.jacobian_matching_term()], 2.7, "thesis: ~2x"),
    "CE + {A+J}": (lambda: [LT.cross_entropy_term(), LT.activation_matching_term(), LT.jacobian_matching_term()], 2.7, "thesis: ~2x"),
    "CE + J (full, K rows)": (lambda: [LT.cross_entropy_term(), LT.jacobian_matching_term(output="full")], None, "K backward rows"),
    "CE + J stochastic (1 JVP probe)": (lambda: [LT.cross_entropy_term(), LT.stochastic_jacobian_matching_term()], 2.7,
                                        "one JVP per network"),
    "CE + J stochastic (1 VJP probe)": (lambda: [LT.cross_entropy_term(),
                                                 LT.stochastic_jacobian_matching_term(probe_space="output")], 2.7,
                                        "one VJP per network"),
    "CE + noisy A (1 antithetic pair)": (lambda: [LT.cross_entropy_term(), LT.noisy_activation_matching_term(sigma=0.1)], 3.7,
                                         "2 noisy student passes + backward, 2 teacher forwards, one batched call"),
    "CE + noisy A (lax.map loop; before the fix)": (lambda: [LT.cross_entropy_term(), noisy_activation_matching_lax_map(0.1)],
                                               3.7, "the same passes in a lax.map loop of 2"),
    "CE + grad-norm (eq. 2.3)": (lambda: [LT.cross_entropy_term(), LT.gradient_norm_term(0.1)], 2.3, "double backprop"),
    "CE + att (eq. 2.8)": (lambda: [LT.cross_entropy_term(), LT.attention_matching_term(pairs=[("block1", "block1")])], 1.3,
                           "+ teacher forward"),
    "CE + att-Jacobian (§2.5.2)": (lambda: [LT.cross_entropy_term(), LT.attention_jacobian_matching_term(
        student_layer="block1", teacher_layer="block1")], 2.7, "like J, at a feature map"),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg4")
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=3, help="train steps per timed call")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
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
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise ValueError(f"unknown objectives {unknown}; choose from {list(OBJECTIVES)}.")
    if "CE" not in names:
        names = ["CE"] + names
    state = gtrain.create_train_state(model, optax.adam(1e-3), batch["image"][:2])
    fns, static = {}, {}
    for name in names:
        terms, _, _ = OBJECTIVES[name]
        step = gtrain.jit_train_step(LT.make_loss_fn(model.apply, terms(), teacher_apply_fn=model.apply),
                                     num_classes=args.classes, donate=False, validate=False)
        static[name] = compiled_cost(step, state, batch, frozen)
        compiled = static[name].pop("compiled")

        def run(compiled=compiled):
            s = state
            for _ in range(args.steps):
                s, _ = compiled(s, batch, frozen)
            return s.params
        fns[name] = run
        print(f"compiled {name} in {static[name]['compile_s']:.1f} s", flush=True)
    med, runs, loads = interleaved(fns, args.repeats, rotate=True)  # no objective always runs first
    out = {}
    for name in names:
        _, expected, note = OBJECTIVES[name]
        if expected is None:  # full Jacobian: K input-gradient rows instead of one
            expected = f"~{1 + 0.6 * args.classes:.0f}"
        out[name] = {"step_ms": 1e3 * med[name] / args.steps, "runs_ms": [1e3 * t / args.steps for t in runs[name]],
                     "expected": expected, "note": note, **static[name]}
    base = out["CE"]
    for v in out.values():
        v["multiple_of_ce"] = v["step_ms"] / base["step_ms"]
        v["flops_over_ce"] = v["flops"] / base["flops"]
        v["convs_over_ce"] = v["convs"] / base["convs"]
    caption = (f"{args.model} width {args.width}, batch {args.batch} of {args.size}x{args.size}x1, "
               f"{jax.devices()[0].device_kind} ({os.cpu_count()} cores), medians of {args.repeats} interleaved "
               f"rounds of {args.steps} steps, {load_note(loads)}, "
               f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    lines = [caption, "", "| objective | step (ms) | × CE step | expected × | XLA FLOPs × CE | convs × CE | note |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {v['step_ms']:.1f} | {v['multiple_of_ce']:.2f} | {v['expected']} | {v['flops_over_ce']:.2f} | "
              f"{v['convs_over_ce']:.2f} | {v['note']} |" for n, v in out.items()]
    table = "\n".join(lines)
    meta = {"model": args.model, "width": args.width, "batch": args.batch, "image": [args.size, args.size, 1],
            "classes": args.classes, "steps": args.steps, "repeats": args.repeats, "loads": loads,
            **machine()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_step_cost.json"), "w") as f:
        json.dump({"meta": meta, "results": out, "load": load_record(loads)}, f, indent=2, default=float)
    with open(os.path.join(args.out, "train_step_cost.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return out


if __name__ == "__main__":
    main()
