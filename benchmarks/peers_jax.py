"""gradjax vs the JAX-side peers in one run: PAIR's ``saliency`` on the same jitted model, traceax on the same HVPs.

Saliency (same Flax VGG, same weights, same images, same XLA backend). PAIR's framework-agnostic ``saliency``
package (``saliency.core``, 0.2.x) explains one image at a time through a ``call_model_function`` that we implement
with a ``jax.jit``-compiled input-gradient of the same model (compiled once per batch shape, warm-up excluded).
Rows at equal work (same number of gradients):

* vanilla gradient — ``GradientSaliency.GetMask``, once per image;
* integrated gradients, PAIR's default ``x_steps=25`` (nodes ``linspace(0, 1, 25)``, PAIR's ``batch_size`` =
  25 path points per call, its fastest setting) vs gradjax ``steps=25`` (midpoint);
* SmoothGrad, 25 samples, noise 0.15 of each image's range (``GetSmoothedMask(magnitude=False)``).

``ratio = PAIR time / gradjax time``. Agreement: gradient maps max |diff| / max |ref|; IG: both completeness deltas.

Time to accuracy (integrated gradients): the completeness delta ``|sum IG - (f_t(x) - f_t(x'))| / |f_t(x) -
f_t(x')|`` (worst image of the batch) for every rule of :data:`gradjax.saliency.gradient_family.IG_RULES` and
PAIR's linspace rule, against the number of gradients; for each rule the first step count reaching ``<= 1 %`` is
timed (jitted gradjax IG) and compared with the peers' defaults (PAIR: 25 linspace steps; Captum: 50
Gauss–Legendre steps, the same nodes as gradjax's ``gauss_legendre`` — its time is measured by
``benchmarks/peers_captum.py``).

Trace estimators (thesis §5.3): ``tr ∇²_x log p(x)``, ``log p = logsumexp f(x)`` of the softplus VGG, per example,
at equal mat-vec counts: gradjax Hutchinson / Hutch++ vs traceax's ``HutchinsonEstimator`` /
``HutchPlusPlusEstimator`` (Rademacher probes; the operator is the per-example HVP, ``jax.jvp`` of ``jax.grad``,
``vmap``-ed over the batch), and gradjax's forward-only Taylor forms. Each estimator is compiled once and run with
``--trace-keys`` different keys: the median run time and the variance of the estimates over keys (relative to the
exact trace, :func:`gradjax.trace.exact_trace`).

    pip install saliency==0.2.1 traceax==1.0.2      # or: pip install -e ".[bench]"
    python -m benchmarks.peers_jax                 # ~5 minutes on 2 cores

Writes ``benchmarks/results/peers_jax-<backend>.json``.
"""
from __future__ import annotations

from benchmarks._common import configure_xla

XLA_PRESET = configure_xla()

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import interleaved, load_note, machine, nontrivial_batch_stats, write_result  # noqa: E402
from gradjax import saliency as S  # noqa: E402
from gradjax import trace as T  # noqa: E402
from gradjax.gradients import logits_and_target_gradient  # noqa: E402
from gradjax.models import create_model  # noqa: E402
from gradjax.saliency.gradient_family import IG_RULES, QUADRATURE_RULES, ig_nodes  # noqa: E402

try:
    import lineax as lx
    import saliency.core as pair
    import traceax as tx
except ImportError as e:  # pragma: no cover - optional dependency
    raise SystemExit(f"this benchmark needs PAIR saliency and traceax ({e}); pip install saliency traceax") from e

RULES = tuple(QUADRATURE_RULES) + ("pair_linspace",)


def rule_nodes(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """gradjax's rules, plus PAIR's: ``linspace(0, 1, steps)`` with weights ``1/steps``."""
    if rule == "pair_linspace":
        return np.linspace(0, 1, steps), np.full(steps, 1.0 / steps)
    return ig_nodes(steps, rule)


def nontrivial(model, variables, x, bias_noise: float = 0.02):
    """Variables whose network is not positively homogeneous along the IG path: at initialisation every bias and
    BatchNorm mean is 0, so ``f(a x) = a f(x)`` and every quadrature rule but the left/linspace ones is exact with 2
    nodes (a degenerate benchmark). Here BatchNorm takes the running statistics of one train-mode pass over ``x``
    (x 1.05, as benchmarks/peers_captum.py) and every bias gets ``N(0, bias_noise^2)`` noise."""
    stats = nontrivial_batch_stats(model, variables, x)["batch_stats"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables["params"])
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    params = jax.tree_util.tree_unflatten(treedef, [
        a + bias_noise * jax.random.normal(k, a.shape, a.dtype) if "bias" in jax.tree_util.keystr(path) else a
        for (path, a), k in zip(leaves, keys)])
    return {"params": params, "batch_stats": stats}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg9")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ig-steps", default="4,8,16,32,64", help="step counts of the delta-vs-steps table")
    p.add_argument("--bias-noise", type=float, default=0.02, help="std of the noise added to every bias")
    p.add_argument("--trace-model", default="vgg4", help="softplus network of the trace part (small inputs)")
    p.add_argument("--trace-batch", type=int, default=4)
    p.add_argument("--trace-image-size", type=int, default=16)
    p.add_argument("--trace-matvecs", type=int, default=18)
    p.add_argument("--trace-keys", type=int, default=12)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: saliency,accuracy,trace")
    p.add_argument("--xla", default="default")
    p.add_argument("--threads", default=None, help="cores for XLA (default: all; benchmarks/_common.py)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    result = {"args": vars(args), "machine": machine({"xla_preset": XLA_PRESET, "saliency(PAIR)": "0.2.1",
                                                      "traceax": tx.__version__ if hasattr(tx, "__version__")
                                                      else "1.0.2"})}
    tables = []

    model = create_model(args.model, 10, width=args.width)
    x = jax.random.uniform(jax.random.PRNGKey(0), (args.batch_size, args.image_size, args.image_size, 3))
    variables = nontrivial(model, model.init(jax.random.PRNGKey(1), x[:1], train=False), x, args.bias_noise)
    h = S.ModelHandle(model.apply, variables)
    logits = h.logits(x)
    target = jnp.argmax(logits, -1)
    key = jax.random.PRNGKey(2)
    xs = np.asarray(x)
    tgt = np.asarray(target)

    @jax.jit
    def grad_batch(xb, cls):  # the model PAIR drives: gradients of logit `cls` for a batch of one image's points
        return logits_and_target_gradient(h.logits, xb, jnp.full((xb.shape[0],), cls)).gradient

    def call_model(x_batch, call_model_args=None, expected_keys=None):
        return {pair.INPUT_OUTPUT_GRADIENTS: np.asarray(grad_batch(jnp.asarray(x_batch, jnp.float32),
                                                                   call_model_args["class"]))}

    def pair_each(fn):
        return lambda: np.stack([fn(xs[i], {"class": int(tgt[i])}) for i in range(len(xs))])

    def jit_ours(method, **opts):
        compiled = S.jit_method(method, **opts)
        return lambda: compiled(h, x, target, key=key)

    if "saliency" not in skip:
        grad_s, ig_s, sg_s = pair.GradientSaliency(), pair.IntegratedGradients(), pair.GradientSaliency()
        fns = {
            "gradient / gradjax": jit_ours("gradient", reduce=None),
            "gradient / PAIR": pair_each(lambda xi, a: grad_s.GetMask(xi, call_model, a)),
            "IG 25 steps / gradjax (midpoint)": jit_ours("integrated_gradients", steps=25, reduce=None),
            "IG 25 steps / PAIR (linspace, batch_size=25)": pair_each(
                lambda xi, a: ig_s.GetMask(xi, call_model, a, x_steps=25, batch_size=25)),
            "SmoothGrad 25 samples / gradjax": jit_ours("smoothgrad", samples=25, reduce=None),
            "SmoothGrad 25 samples / PAIR": pair_each(
                lambda xi, a: sg_s.GetSmoothedMask(xi, call_model, a, stdev_spread=0.15, nsamples=25,
                                                   magnitude=False)),
        }
        sync = {k: (lambda a: a) for k in fns if "PAIR" in k}
        med, runs, loads = interleaved(fns, args.repeats, sync)
        ours_g, pair_g = np.asarray(fns["gradient / gradjax"]()), fns["gradient / PAIR"]()
        fx = np.asarray(logits)[np.arange(len(xs)), tgt]
        f0 = np.asarray(h.logits(jnp.zeros_like(x)))[np.arange(len(xs)), tgt]
        scale = np.abs(fx - f0)
        rel_delta = lambda attr: np.abs(attr.reshape(len(xs), -1).sum(1) - (fx - f0)) / scale  # noqa: E731
        agreement = {
            "gradient": f"max|diff|/max|ref| = {np.max(np.abs(ours_g - pair_g)) / np.max(np.abs(pair_g)):.1e}",
            "IG 25 steps": (f"worst completeness delta: gradjax {rel_delta(np.asarray(fns['IG 25 steps / gradjax (midpoint)']())).max():.1%}, "
                            f"PAIR {rel_delta(fns['IG 25 steps / PAIR (linspace, batch_size=25)']()).max():.1%}"),
            "SmoothGrad 25 samples": "different noise draws: no agreement check",
        }
        rows = {}
        lines = [f"PAIR saliency 0.2.1 vs gradjax, {args.model} width {args.width}, {args.batch_size} images "
                 f"{args.image_size}x{args.image_size}x3, same jitted JAX model and XLA backend "
                 f"({jax.devices()[0].device_kind}, {os.cpu_count()} cores), XLA preset `{XLA_PRESET}`, medians of "
                 f"{args.repeats} interleaved rounds, {load_note(loads)}.", "",
                 "| method | gradjax ms | PAIR ms | PAIR / gradjax (goal ≥ 1.5) | agreement |", "|---|---|---|---|---|"]
        for m in ("gradient", "IG 25 steps", "SmoothGrad 25 samples"):
            ko = next(k for k in fns if k.startswith(m + " / gradjax"))
            kp = next(k for k in fns if k.startswith(m + " / PAIR"))
            rows[m] = {"gradjax_s": med[ko], "pair_s": med[kp], "ratio": med[kp] / med[ko],
                       "agreement": agreement[m], "runs_gradjax": runs[ko], "runs_pair": runs[kp]}
            lines.append(f"| {m} | {1e3 * med[ko]:.1f} | {1e3 * med[kp]:.1f} | {med[kp] / med[ko]:.2f} | "
                         f"{agreement[m]} |")
        result["pair"] = {"rows": rows, "loads": loads}
        tables.append("\n".join(lines))
        print(tables[-1], flush=True)

    if "accuracy" not in skip:
        pair_ig = result.get("pair", {}).get("rows", {}).get("IG 25 steps", {}).get("pair_s")
        result["ig_accuracy"] = ig_accuracy(args, h, x, target, key, pair_ig)
        tables.append(result["ig_accuracy"]["table"])
        print(tables[-1], flush=True)

    if "trace" not in skip:
        result["trace"] = trace_peers(args)
        tables.append(result["trace"]["table"])
        print(tables[-1], flush=True)

    result["table"] = "\n\n".join(tables)
    loads = [a for part in ("pair", "ig_accuracy", "trace") for a in result.get(part, {}).get("loads", [])]
    return write_result(os.path.join(args.out, f"peers_jax-{jax.default_backend()}.json"), result, loads)


def ig_accuracy(args, h, x, target, key, pair_ig_s=None) -> dict:
    """Completeness delta against gradients for every rule, and the time to reach <= 1 %."""
    steps_list = [int(s) for s in args.ig_steps.split(",")]
    B = x.shape[0]
    diff = x  # zero baseline
    fx = h.logits(x)[jnp.arange(B), target]
    f0 = h.logits(jnp.zeros_like(x))[jnp.arange(B), target]
    scale = np.abs(np.asarray(fx - f0))

    chunk = 8

    @jax.jit
    def path_dots(alphas):  # [chunk] -> sum_i grad f_t(alpha x) * x per example, [chunk, B]
        pts = (alphas[:, None, None, None, None] * diff[None]).reshape((-1,) + x.shape[1:])
        g = logits_and_target_gradient(h.logits, pts, jnp.tile(target, chunk)).gradient.reshape((chunk,) + x.shape)
        return jnp.sum(g * diff[None], axis=(2, 3, 4))

    combos = [(r, s) for r in RULES for s in steps_list] + [("pair_linspace", 25), ("gauss_legendre", 50)]
    nodes = sorted({float(a) for r, s in combos for a in rule_nodes(s, r)[0]})
    vals = {}
    for i in range(0, len(nodes), chunk):
        part = nodes[i:i + chunk]
        out = np.asarray(path_dots(jnp.asarray(part + [part[-1]] * (chunk - len(part)), jnp.float32)))
        vals.update({a: out[j] for j, a in enumerate(part)})
    table = {}
    for r, s in combos:
        a, w = rule_nodes(s, r)
        total = sum(wi * vals[float(ai)] for ai, wi in zip(a, w))
        rel = np.abs(total - np.asarray(fx - f0)) / scale
        table[(r, s)] = {"gradients": len(a), "worst": float(rel.max()), "median": float(np.median(rel))}
    # the adaptive rule's nodes depend on the example: its own jitted IG with delta, per step count
    adaptive = jax.jit(lambda z, n: S.integrated_gradients_with_delta(h, z, target, steps=n, rule="adaptive",
                                                                      reduce=None)[1], static_argnums=1)
    for s in steps_list:
        if s >= 3:
            rel = np.abs(np.asarray(adaptive(x, s))) / scale
            table[("adaptive", s)] = {"gradients": s, "worst": float(rel.max()), "median": float(np.median(rel))}
    # first step count reaching <= 1 % on every image, per gradjax rule: timed
    first = {}
    for r in IG_RULES:
        ok = [s for s in steps_list if (r, s) in table and table[(r, s)]["worst"] <= 0.01]
        first[r] = ok[0] if ok else None
    fns = {}
    for r, s in first.items():
        if s is not None:
            compiled = S.jit_method("integrated_gradients", steps=s, rule=r, reduce=None)
            fns[f"{r} {s}"] = lambda compiled=compiled: compiled(h, x, target, key=key)
    pair_default = S.jit_method("integrated_gradients", steps=25, rule="midpoint", reduce=None)  # PAIR's work
    captum_default = S.jit_method("integrated_gradients", steps=50, rule="gauss_legendre", reduce=None)
    fns["work of PAIR default (25 gradients)"] = lambda: pair_default(h, x, target, key=key)
    fns["work of Captum default (50 gradients)"] = lambda: captum_default(h, x, target, key=key)
    med, _, loads = interleaved(fns, args.repeats)
    lines = [f"Integrated gradients, completeness delta |sum IG - (f(x) - f(0))| / |f(x) - f(0)| (worst / median of "
             f"{B} images) against steps; zero baseline; {load_note(loads)}.", "",
             "| rule | " + " | ".join(f"{s} steps" for s in steps_list) + " |",
             "|---|" + "---|" * len(steps_list)]
    for r in RULES + ("adaptive",):
        lines.append(f"| {r} | " + " | ".join(f"{table[(r, s)]['worst']:.2%} / {table[(r, s)]['median']:.2%}"
                                             if (r, s) in table else "—" for s in steps_list) + " |")
    lines += ["", "PAIR default: 25 linspace steps, worst delta {:.2%}; Captum default: 50 Gauss–Legendre steps, "
              "worst delta {:.2%}. Speed-up = time of the peer default's work in gradjax (and PAIR's own measured "
              "time) / gradjax time at the first step count within 1 % (goal ≥ 3).".format(
                  table[("pair_linspace", 25)]["worst"], table[("gauss_legendre", 50)]["worst"]), "",
              "| rule | first steps with worst delta ≤ 1 % | gradjax ms | vs 25 gradients (PAIR's work) | "
              "vs PAIR measured | vs 50 gradients (Captum's work) |", "|---|---|---|---|---|---|"]
    for r, s in first.items():
        if s is None:
            lines.append(f"| {r} | not reached by {steps_list[-1]} | — | — | — | — |")
            continue
        t = med[f"{r} {s}"]
        vs_pair = "—" if pair_ig_s is None else f"{pair_ig_s / t:.2f}x"
        lines.append(f"| {r} | {s} | {1e3 * t:.1f} | {med['work of PAIR default (25 gradients)'] / t:.2f}x | "
                     f"{vs_pair} | {med['work of Captum default (50 gradients)'] / t:.2f}x |")
    return {"delta": {f"{r} {s}": v for (r, s), v in table.items()}, "first_within_1pct": first,
            "times_s": med, "loads": loads, "table": "\n".join(lines)}


def trace_peers(args) -> dict:
    """gradjax vs traceax trace estimators at equal mat-vecs: time, variance over keys, compiled memory."""
    B, n, m = args.trace_batch, args.trace_image_size, args.trace_matvecs
    smooth = create_model(args.trace_model, 10, width=args.width, activation="softplus")
    x = jax.random.uniform(jax.random.PRNGKey(5), (B, n, n, 3))
    v = smooth.init(jax.random.PRNGKey(6), x[:1], train=False)
    f = lambda z: jax.nn.logsumexp(smooth.apply(v, z, train=False), axis=-1)  # noqa: E731
    D = int(math.prod(x.shape[1:]))
    exact = np.asarray(jax.jit(lambda z: T.exact_trace(f, z, max_dim=D, chunk=256))(x))

    def f_one(zflat):  # one example, flattened
        return f(zflat.reshape((1,) + x.shape[1:]))[0]

    def traceax_fn(estimator):
        def run(z, k):
            def per_example(zb, kb):
                hvp = lambda u: jax.jvp(jax.grad(f_one), (zb,), (u,))[1]  # noqa: E731
                op = lx.FunctionLinearOperator(hvp, jax.ShapeDtypeStruct((D,), z.dtype), lx.symmetric_tag)
                return estimator.estimate(kb, op, m)[0]
            return jax.vmap(per_example)(z.reshape(B, D), jax.random.split(k, B))
        return run

    sigma = 0.05
    ests = {
        f"gradjax Hutchinson ({m} HVPs)": lambda z, k: T.hutchinson_trace(f, z, k, num_probes=m, chunk=m),
        f"traceax Hutchinson ({m} HVPs)": traceax_fn(tx.HutchinsonEstimator(tx.RademacherSampler(jnp.float32))),
        f"gradjax Hutch++ ({m} HVPs)": lambda z, k: T.hutchpp_trace(f, z, k, num_matvecs=m, chunk=m),
        f"traceax Hutch++ ({m} HVPs)": traceax_fn(tx.HutchPlusPlusEstimator(tx.RademacherSampler(jnp.float32))),
        f"gradjax Taylor one-sided ({m} forwards, σ={sigma})": lambda z, k: T.taylor_trace(
            f, z, k, sigma=sigma, num_probes=m, chunk=m, warn_rtol=None),
        f"gradjax Taylor antithetic ({m} forwards, σ={sigma})": lambda z, k: T.taylor_trace(
            f, z, k, sigma=sigma, num_probes=m // 2, form="antithetic", chunk=m, warn_rtol=None),
    }
    compiled, temp = {}, {}
    for name, fn in ests.items():
        c = jax.jit(fn).lower(x, jax.random.PRNGKey(0)).compile()
        compiled[name] = c
        try:
            temp[name] = float(c.memory_analysis().temp_size_in_bytes)
        except Exception:
            temp[name] = float("nan")
    keys = [jax.random.PRNGKey(100 + i) for i in range(args.trace_keys)]
    estimates = {k: [] for k in ests}
    runs = {k: [] for k in ests}
    loads = []
    for name in ests:  # warm-up
        jax.block_until_ready(compiled[name](x, keys[0]))
    for kk in keys:  # round-robin over estimators, one key per round
        for name in ests:
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled[name](x, kk))
            runs[name].append(time.perf_counter() - t0)
            estimates[name].append(np.asarray(out))
        loads.append(os.getloadavg()[0])
    rows = {}
    for name in ests:
        e = np.stack(estimates[name])  # [keys, B]
        rows[name] = {"run_s": statistics.median(runs[name]), "temp_bytes": temp[name],
                      "rel_std": float(np.mean(e.std(0, ddof=1) / np.abs(exact))),
                      "rel_bias": float(np.mean((e.mean(0) - exact) / np.abs(exact)))}
    lines = [f"Per-example trace of ∇²_x logsumexp f(x), softplus {args.trace_model} width {args.width}, batch {B} "
             f"{n}x{n}x3 (D = {D}), {m} mat-vecs / forwards each, {args.trace_keys} keys (rounds, interleaved), "
             f"{load_note(loads)}; exact trace {np.round(exact, 2).tolist()}.", "",
             "| estimator | run ms (median) | std / |tr| (mean over examples) | mean error / |tr| | temp MB |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {1e3 * r['run_s']:.1f} | {r['rel_std']:.3f} | {r['rel_bias']:+.3f} | "
                     f"{r['temp_bytes'] / 2**20:.1f} |")
    return {"rows": rows, "exact": exact.tolist(), "loads": loads, "table": "\n".join(lines)}


if __name__ == "__main__":
    main()
