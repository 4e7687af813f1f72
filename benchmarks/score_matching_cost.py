"""Cost of one score-matching train step with each Hessian-trace estimator, relative to a cross-entropy step
(thesis §5.3.2: the Taylor estimator needs "a single additional forward pass", Hutchinson "two backward passes"
per probe).

    python -m benchmarks.score_matching_cost                       # ResNet-18 (softplus), width 1/8, 16x16, B=64
    python -m benchmarks.score_matching_cost --model mlp --image-size 8 --repeats 20

Every step is the real engine step (``gradjax.train.jit_train_step`` of a combinator loss, frozen-moments
BatchNorm policy, SGD). All steps (and the eval forward) are compiled first, then timed round-robin in one process
with the order rotated every round (``benchmarks/_common.py:interleaved``; the load average recorded). Time: the
minimum (robust to other load on a shared machine; the median is also recorded) of ``--repeats`` rounds. XLA's FLOP
count of each compiled step (``cost_analysis``) is reported beside it as a multiple of the CE step's.
Memory: XLA's temporary buffer size of the compiled step (``compiled.memory_analysis().temp_size_in_bytes``).
Also timed: one eval forward pass ``F``, so the marginal cost of the trace term (SM step − gradient-norm step,
which shares the CE + double-backprop gradient-norm part) can be read in forward passes. Expected (training
steps differentiate every pass, so a forward costs ≈ F + its backward ≈ 3F):

* CE step ≈ 3F; gradient-norm step ≈ CE + frozen pass + input backward + their backward ≈ 3× CE;
* Taylor one-sided / control-variate: + 1 forward per probe (≈ 3F in training); antithetic: + 2 per probe;
* Hutchinson: + one HVP (forward-over-reverse ≈ 2 backward passes, ×3 in training) per probe;
* Hutch++ (m mat-vecs): m HVPs.
Writes ``benchmarks/results/score_matching_cost-<backend>.json``.
"""
from __future__ import annotations

import argparse
import json
import os

from benchmarks._common import load_record, pin_threads  # noqa: E402

pin_threads()  # XLA's threads (PJRT_NPROC, affinity) before JAX starts; records the load before

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._common import compiled_cost, interleaved, load_note, machine
from gradjax import train as gtrain
from gradjax.losses import terms as LT
from gradjax.models import create_model

VARIANTS = {
    "cross_entropy": None,
    "gradient_norm": ("gn", {}),
    "sm_taylor_one_sided": ("sm", dict(estimator="taylor", form="one_sided")),
    "sm_taylor_control_variate": ("sm", dict(estimator="taylor", form="control_variate")),
    "sm_taylor_antithetic": ("sm", dict(estimator="taylor", form="antithetic")),
    "sm_hutchinson": ("sm", dict(estimator="hutchinson", num_probes=1)),
    "sm_hutchpp_3": ("sm", dict(estimator="hutchpp", num_matvecs=3)),
    "anti_sm_taylor_one_sided": ("anti", dict(estimator="taylor", form="one_sided")),
}


def _terms(kind):
    terms = [LT.cross_entropy_term(1.0)]
    if kind is None:
        return terms
    k, opts = kind
    if k == "gn":
        terms.append(LT.gradient_norm_term(1e-3 / 2, form="logit", name="gradient_norm"))  # ½‖∇f_y‖²
    elif k == "sm":
        terms.append(LT.score_matching_term(1e-3, mu=1e-4, sigma=0.01, **opts))
    else:
        terms.append(LT.anti_score_matching_term(1e-4, tau=1000.0, sigma=1e-3, **opts))
    return terms


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    model = create_model(args.model, 10, activation="softplus", beta=10.0, width=args.width)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(size=(args.batch_size, args.image_size, args.image_size, 1)).astype(np.float32),
             "label": rng.integers(0, 10, args.batch_size).astype(np.int32)}
    tx = optax.sgd(0.01, momentum=0.9)
    state0 = gtrain.create_train_state(model, tx, batch["image"][:2], seed=0)

    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
    fwd_c = fwd.lower(state0.variables, batch["image"]).compile()
    fns = {"forward": lambda: fwd_c(state0.variables, batch["image"])}
    rows = {}
    for name in args.variants:
        loss_fn = LT.make_loss_fn(model.apply, _terms(VARIANTS[name]))
        cost = compiled_cost(jax.jit(gtrain.make_train_step(loss_fn)), state0, batch)
        compiled = cost.pop("compiled")
        fns[name] = lambda compiled=compiled: compiled(state0, batch)[1]
        rows[name] = {"compile_s": cost["compile_s"], "temp_bytes": cost["temp_bytes"], "flops": cost["flops"]}
        print(f"compiled {name} in {cost['compile_s']:.1f} s", flush=True)
    med, runs, loads = interleaved(fns, args.repeats, rotate=True)
    forward_s = min(runs["forward"])
    for name in args.variants:
        rows[name].update(step_s=min(runs[name]), step_median_s=med[name], runs_s=runs[name])
    ce = rows.get("cross_entropy")
    gn = rows.get("gradient_norm")
    for name, r in rows.items():
        if ce:
            r["time_vs_ce"] = r["step_s"] / ce["step_s"]
            r["memory_vs_ce"] = (r["temp_bytes"] / ce["temp_bytes"]) if ce["temp_bytes"] else None
            r["median_vs_ce"] = r["step_median_s"] / ce["step_median_s"]
            r["flops_vs_ce"] = r["flops"] / ce["flops"]
        if gn and name.startswith(("sm_", "anti_")):
            r["trace_cost_in_forwards"] = (r["step_s"] - gn["step_s"]) / forward_s
    res = {"config": vars(args), "forward_s": forward_s, "ce_step_in_forwards": ce["step_s"] / forward_s if ce else None,
           "rows": rows, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
           "cpu_count": os.cpu_count(), "loads": loads, "machine": machine()}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"score_matching_cost-{jax.default_backend()}.json")
    with open(path, "w") as fh:
        json.dump({**res, "load": load_record(loads)}, fh, indent=2, default=float)
    print(f"\nforward F = {1e3 * forward_s:.2f} ms; CE step = {res['ce_step_in_forwards']:.2f} F; "
          f"{args.repeats} rotated rounds, {load_note(loads)}")
    print("| variant | step min (ms) | × CE time (min) | × CE (median) | × CE FLOPs | × CE temp memory | "
          "trace part (in F) |\n|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        tr = r.get("trace_cost_in_forwards")
        mem = r.get("memory_vs_ce")
        print(f"| {name} | {1e3 * r['step_s']:.1f} | {r.get('time_vs_ce', float('nan')):.2f} | "
              f"{r.get('median_vs_ce', float('nan')):.2f} | {r.get('flops_vs_ce', float('nan')):.2f} | "
              f"{mem if mem is None else f'{mem:.2f}'} | {'' if tr is None else f'{tr:.1f}'} |")
    return res


if __name__ == "__main__":
    main()
