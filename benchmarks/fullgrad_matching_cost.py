"""Cost of a full-gradient-matching train step (thesis ch. 4) relative to a cross-entropy step and to input-gradient
(iG) matching.

The Table 4.1 setting: a VGG-11 student and a VGG-9 teacher (frozen, eval mode, variables passed as the step's
``frozen`` argument), the objectives of :mod:`experiments.distill_fullgrad` (weights 10, default layer pairs)
plus the bias-gradient penalty of Table 4.3. Each objective is built with :func:`gradjax.losses.make_loss_fn` and
compiled by :func:`gradjax.train.jit_train_step`; after every step is compiled, ``--repeats`` runs of ``--steps``
steps are timed round robin over the objectives, and a step's cost is the minimum over repeats (median beside).

    python -m benchmarks.fullgrad_matching_cost [--student vgg11] [--teacher vgg9] [--width 0.0625] [--batch 32]

Expected multiples of a CE step (F = one student forward; a backward ~2F; the teacher costs about as much as the
student here): iG matching adds a frozen student forward + input-gradient backward + the double backward through
it, and a teacher forward + backward (~2.5-3x). Bias-gradient (FG) matching needs the same passes — the bias
maps come from the bias taps of one backward per model — so ``CE + FG-term`` ~ ``CE + iG``; the thesis's "FG"
objective (iG + bias-gradients) computes its input- and bias-gradients in two separate term passes here (~4x),
although one backward per model gives both (a possible fusion, not done).
"""
from __future__ import annotations

import argparse
import json
import os
import time

from benchmarks._common import load_record, pin_threads  # noqa: E402

pin_threads()  # XLA's threads (PJRT_NPROC, affinity) before JAX starts; records the load before

import jax
import numpy as np
import optax

from benchmarks._common import compiled_cost, load_note
from gradjax import train as gtrain
from gradjax.losses import terms as LT
from gradjax.losses import fullgrad_matching as FM
from gradjax.model import ModelHandle
from gradjax.models import create_model

W = 10.0


def objectives(pairs, last_layer: str) -> dict:
    """``{name: (terms factory, expected multiple of CE, note)}``."""
    return {
        "CE": (lambda: [LT.cross_entropy_term(W)], 1.0, "baseline"),
        "CE + iG": (lambda: [LT.cross_entropy_term(W), LT.jacobian_matching_term(W)], 2.7, "input-gradient matching (Table 4.1 iG)"),
        "CE + Att": (lambda: [LT.cross_entropy_term(W), LT.attention_matching_term(W, pairs=pairs, p=1.0)], 1.3,
                     "+ teacher forward"),
        "CE + FG-term": (lambda: [LT.cross_entropy_term(W), LT.full_gradient_matching_term(W, pairs=pairs)], 2.7,
                         "bias-gradient matching alone (eq. 4.3)"),
        "CE + iG + FG-term (Table 4.1 FG)": (lambda: [LT.cross_entropy_term(W), LT.jacobian_matching_term(W),
                                                      LT.full_gradient_matching_term(W, pairs=pairs)], 4.4,
                                             "input- and bias-gradients in two term passes"),
        "CE + iG + FG-term + Att (FG+Att)": (lambda: [LT.cross_entropy_term(W), LT.jacobian_matching_term(W),
                                                      LT.full_gradient_matching_term(W, pairs=pairs),
                                                      LT.attention_matching_term(W, pairs=pairs, p=1.0)], 4.4,
                                             "attention reuses the clean pass"),
        "CE + bias-grad penalty (Table 4.3)": (lambda: [LT.cross_entropy_term(), LT.bias_gradient_penalty_term(
            1e2, layers=[last_layer])], 2.3, "student only, double backprop"),
    }


def time_steps(steps_by_name: dict, state, batch, frozen, *, steps: int, repeats: int) -> dict:
    """``{name: {"compile_s", "min_s", "median_s"}}`` per step of each jitted train step (donation off).

    All steps are compiled first; then the repeats are **interleaved** (round robin over the objectives), so a
    change of load on a shared machine hits every objective alike; the minimum over repeats is the least-disturbed
    estimate, the median is reported beside it."""
    out = {}
    for name, step in steps_by_name.items():
        t = time.perf_counter()
        s, _ = step(state, batch, frozen)
        jax.block_until_ready(s.params)
        out[name] = {"compile_s": time.perf_counter() - t, "times": []}
    loads = []
    for _ in range(repeats):
        for name, step in steps_by_name.items():
            s = state
            t = time.perf_counter()
            for _ in range(steps):
                s, _ = step(s, batch, frozen)
            jax.block_until_ready(s.params)
            out[name]["times"].append((time.perf_counter() - t) / steps)
        loads.append(os.getloadavg()[0])
    out["_loads"] = loads
    for name, v in out.items():
        if name != "_loads":
            v["min_s"], v["median_s"] = float(np.min(v["times"])), float(np.median(v["times"]))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="vgg11")
    p.add_argument("--teacher", default="vgg9")
    p.add_argument("--width", type=float, default=1 / 16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--only", default=None, help="comma-separated subset of objectives")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(args.batch, args.size, args.size, 1)).astype(np.float32),
             "label": (np.arange(args.batch) % args.classes).astype(np.int32)}
    student = create_model(args.student, args.classes, width=args.width)
    teacher = create_model(args.teacher, args.classes, width=args.width)
    x0 = batch["image"][:2]
    t_vars = teacher.init(jax.random.PRNGKey(1), x0, train=False)
    s_vars = student.init(jax.random.PRNGKey(0), x0, train=False)
    s_handle = ModelHandle(student.apply, s_vars)
    pairs = FM.default_pairs(s_handle, ModelHandle(teacher.apply, t_vars), x0)
    last = FM.conv_layers(s_handle, x0)[-1][0]
    table_objs = objectives(pairs, last)
    names = list(table_objs) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in table_objs]
    if unknown:
        raise ValueError(f"unknown objectives {unknown}; choose from {list(table_objs)}.")
    if "CE" not in names:
        names = ["CE"] + names
    frozen = {"teacher": t_vars}
    state = gtrain.create_train_state(student, optax.adam(1e-3), x0)
    compiled, static = {}, {}
    for name in names:
        terms, _, _ = table_objs[name]
        step = gtrain.jit_train_step(LT.make_loss_fn(student.apply, terms(), teacher_apply_fn=teacher.apply),
                                     num_classes=args.classes, donate=False, validate=False)
        static[name] = compiled_cost(step, state, batch, frozen)  # XLA FLOPs: a static count of the passes
        compiled[name] = static[name].pop("compiled")
    timed = time_steps(compiled, state, batch, frozen, steps=args.steps, repeats=args.repeats)
    loads = timed.pop("_loads")
    out = {}
    for name in names:
        _, expected, note = table_objs[name]
        t = timed[name]
        out[name] = {"step_ms": 1e3 * t["min_s"], "median_ms": 1e3 * t["median_s"],
                     "compile_s": static[name]["compile_s"], "flops": static[name]["flops"],
                     "expected": expected, "note": note}
        print(f"{name:38s} min {out[name]['step_ms']:8.1f} ms, median {out[name]['median_ms']:8.1f} ms "
              f"({out[name]['step_ms'] / out['CE']['step_ms']:.2f}x CE; expected {expected}; compile "
              f"{t['compile_s']:.0f} s)", flush=True)
    base = out["CE"]["step_ms"]
    ig = out.get("CE + iG", {}).get("step_ms")
    for v in out.values():
        v["multiple_of_ce"] = v["step_ms"] / base
        v["median_multiple_of_ce"] = v["median_ms"] / out["CE"]["median_ms"]
        v["flops_over_ce"] = v["flops"] / out["CE"]["flops"]
        v["multiple_of_ig"] = v["step_ms"] / ig if ig else None
    lines = [f"{args.student} student, {args.teacher} teacher, width {args.width}, batch {args.batch} of "
             f"{args.size}x{args.size}x1; {args.repeats} round-robin repeats of {args.steps} steps, "
             f"{load_note(loads)}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "| objective | step min (ms) | median (ms) | × CE step (min) | × CE (median) | × iG step | "
             "expected × CE | XLA FLOPs × CE | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {v['step_ms']:.1f} | {v['median_ms']:.1f} | {v['multiple_of_ce']:.2f} | "
              f"{v['median_multiple_of_ce']:.2f} | "
              f"{'—' if v['multiple_of_ig'] is None else format(v['multiple_of_ig'], '.2f')} | {v['expected']} | "
              f"{v['flops_over_ce']:.2f} | {v['note']} |" for n, v in out.items()]
    table = "\n".join(lines)
    load = loads
    meta = {"student": args.student, "teacher": args.teacher, "width": args.width, "batch": args.batch,
            "image": [args.size, args.size, 1], "classes": args.classes, "pairs": [list(q) for q in pairs],
            "steps": args.steps, "repeats": args.repeats, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(), "load_average": load,
            "date": time.strftime("%Y-%m-%d")}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fullgrad_matching_cost.json"), "w") as f:
        json.dump({"meta": meta, "results": out, "load": load_record()}, f, indent=2, default=float)
    with open(os.path.join(args.out, "fullgrad_matching_cost.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return out


if __name__ == "__main__":
    main()
