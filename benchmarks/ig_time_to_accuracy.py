"""Integrated gradients, time to accuracy on a ReLU VGG and a softplus VGG: completeness delta against the number
of gradients for every rule gradjax has, and against the peers' defaults (issue 27, item 4).

For each activation (``--activations relu,softplus``; softplus with beta 10, thesis ch. 5) the VGG of
``benchmarks/peers_jax.py`` (VGG-9 width 0.25, BatchNorm running statistics of the batch, bias noise 0.02 so that
the network is not positively homogeneous along the path) explains 8 uniform images from the zero baseline.
:func:`benchmarks.peers_jax.ig_accuracy` gives, per rule of :data:`gradjax.saliency.gradient_family.IG_RULES`
(midpoint, trapezoid, left, right, gauss_legendre, adaptive) and PAIR's rule (``linspace(0, 1, n)``, weights
``1/n``), the worst and median completeness delta ``|sum IG - (f(x) - f(0))| / |f(x) - f(0)|`` at each step count,
and times gradjax at the first step count whose worst delta is <= 1 %. The peers' defaults: PAIR 25 linspace
steps, Captum 50 Gauss-Legendre steps (the same nodes as gradjax's ``gauss_legendre``: the maps agree to 3e-4,
``benchmarks/peers_captum.py``). Reported per network: which rule reaches 1 % first, and the gradients (and time)
it needs against what each peer's rule needs for 1 % — and against the peers' *default* work (25 / 50 gradients)
when the default itself does not reach 1 %.

    python -m benchmarks.ig_time_to_accuracy                 # ~3-5 min on 2 idle cores
    python -m benchmarks.ig_time_to_accuracy --smoke         # code-path check

Writes ``benchmarks/results/ig_time_to_accuracy-cpu.json``.
"""
from __future__ import annotations

from benchmarks._common import configure_xla

XLA_PRESET = configure_xla()

import argparse  # noqa: E402
import os  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks._common import machine, write_result  # noqa: E402
from gradjax import saliency as S  # noqa: E402
from gradjax.models import create_model  # noqa: E402


def first_within(delta: dict, rule: str, steps: list[int], tol: float) -> int | None:
    """The first step count of ``rule`` whose worst-image delta is ``<= tol`` (``None``: not within ``steps``)."""
    ok = [s for s in steps if f"{rule} {s}" in delta and delta[f"{rule} {s}"]["worst"] <= tol]
    return ok[0] if ok else None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg9")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--activations", default="relu,softplus")
    p.add_argument("--ig-steps", default="4,8,16,32,64,128")
    p.add_argument("--bias-noise", type=float, default=0.02)
    p.add_argument("--tol", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--xla", default="default")
    p.add_argument("--threads", default=None)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.width, args.batch_size, args.image_size = "vgg4", 0.125, 2, 16
        args.ig_steps, args.repeats = "4,8", 1
    from benchmarks.peers_jax import RULES, ig_accuracy, nontrivial  # noqa: PLC0415  (after configure_xla)

    steps = [int(s) for s in args.ig_steps.split(",")]
    result = {"args": vars(args), "machine": machine({"xla_preset": XLA_PRESET}), "networks": {}}
    tables, all_loads = [], []
    for act in args.activations.split(","):
        model = create_model(args.model, 10, width=args.width, activation=act)
        x = jax.random.uniform(jax.random.PRNGKey(0), (args.batch_size, args.image_size, args.image_size, 3))
        variables = nontrivial(model, model.init(jax.random.PRNGKey(1), x[:1], train=False), x, args.bias_noise)
        h = S.ModelHandle(model.apply, variables)
        target = jnp.argmax(h.logits(x), -1)
        acc = ig_accuracy(args, h, x, target, jax.random.PRNGKey(2))
        all_loads += acc["loads"]
        delta = acc["delta"]
        firsts = {r: first_within(delta, r, steps, args.tol) for r in tuple(RULES) + ("adaptive",)}
        reached = {r: s for r, s in firsts.items() if s is not None and r != "pair_linspace"}
        # fewest gradients first (trapezoid costs steps + 1); ties broken by the smaller worst delta there
        best = min(reached, key=lambda r: (reached[r] + (r == "trapezoid"),
                                           delta[f"{r} {reached[r]}"]["worst"])) if reached else None
        peers = {"PAIR default (linspace 25)": ("pair_linspace", 25), "Captum default (Gauss-Legendre 50)":
                 ("gauss_legendre", 50)}
        lines = [f"**{act}** {args.model} width {args.width}: " + acc["table"], ""]
        summary = {}
        for peer, (rule, n) in peers.items():
            d = delta[f"{rule} {n}"]["worst"]
            peer_first = firsts[rule]
            if best is None:
                verdict = f"no gradjax rule reaches {args.tol:.0%} within {steps[-1]} steps"
            else:
                ours = reached[best] + (best == "trapezoid")
                if d <= args.tol:
                    verdict = f"{best} needs {ours} gradients vs the default's {n}: {n / ours:.2f}x fewer"
                elif peer_first is not None:
                    pf = peer_first
                    verdict = (f"the default ({n}) misses {args.tol:.0%} (worst {d:.2%}); {rule} needs {pf}; "
                               f"{best} needs {ours}: {pf / ours:.2f}x fewer")
                else:
                    verdict = (f"the default ({n}) misses {args.tol:.0%} (worst {d:.2%}) and {rule} does not reach "
                               f"it within {steps[-1]}; {best} needs {ours}")
            summary[peer] = {"default_worst_delta": d, "peer_rule_first_within": peer_first, "verdict": verdict}
            lines.append(f"- vs {peer}: {verdict}")
        lines.append(f"First rule within {args.tol:.0%} (worst image): "
                     + (f"**{best}** at {reached[best]} steps" if best else f"none within {steps[-1]} steps")
                     + "; per rule: " + ", ".join(f"{r} {s if s else '—'}" for r, s in firsts.items()))
        result["networks"][act] = {"accuracy": acc, "first_within": firsts, "best": best, "vs_peers": summary}
        tables.append("\n".join(lines))
        print(tables[-1], flush=True)
    result["table"] = "\n\n".join(tables)
    suffix = "-smoke" if args.smoke else ""
    return write_result(os.path.join(args.out, f"ig_time_to_accuracy-cpu{suffix}.json"), result, all_loads)


if __name__ == "__main__":
    main()
