"""Layouts and ``jax.checkpoint`` policies: time and compiled memory of gradients, FullGrad, a batched IG chunk and
two train steps, per rematerialisation policy and input layout.

**Remat.** Reverse-mode differentiation keeps the forward pass's intermediate values (residuals) for the backward
pass; ``jax.checkpoint`` (``flax.linen.remat``) with a policy keeps only what the policy names and recomputes the
rest in the backward pass — memory traded for recomputation. Variants (``--variants``):

* ``none`` — the model as it is;
* ``whole:<policy>`` — ``jax.checkpoint(apply, policy=<policy>)`` around the whole ``model.apply``
  (:class:`gradjax._chunking.CheckpointedApply`; the 2026-12-02 runs used the same ``jax.checkpoint`` call written
  out here);
* ``blocks:<policy>`` — ``flax.linen.remat`` of every VGG ``ConvBlock`` / ResNet ``BasicBlock`` (the library's
  model code unchanged: the block class is swapped in its module while this script traces, then restored);

with policies ``nothing`` (``jax.checkpoint_policies.nothing_saveable``), ``dots`` (``dots_saveable`` =
``checkpoint_dots``: keeps the outputs of ``dot_general`` **and** ``conv_general_dilated``), ``dots_no_batch``
(``dots_with_no_batch_dims_saveable``: only the Dense layer's matmul; every convolution recomputed) and
``everything`` (``everything_saveable``). Workloads: the input-gradient of a batch, FullGrad, one batched IG chunk
(``--ig-steps`` path points in one vmapped call, ``chunk = steps``), a cross-entropy train step and a
double-backprop (gradient-norm, eq. 2.3) train step of the one engine (:func:`gradjax.train.jit_train_step`).
Models: VGG-9 width 0.25 on 32x32x3 (ReLU) and the chapter-5 ResNet-18 (softplus, beta 10) width 1/8 on 16x16x1.
Recomputation: the convolutions in the jaxpr and in XLA's optimised program (``compiled.as_text()``) — XLA may
undo a remat. Memory: the compiled program's temporaries (``compiled.memory_analysis().temp_size_in_bytes``); the
process's peak RSS is recorded once (it cannot be split per program in one process). Agreement:
max |out - out_none| / max |out_none| (train steps: of the parameter update).

**Memory budget.** IG with ``--budget-steps`` path points at one batch, per variant in ``--budget-variants``, as
chunks of ``--budget-chunks`` (the memory-bounded ``lax.scan`` path) and in one call: does remat let a larger chunk
fit the same compiled memory at a lower time?

**Layouts.** Flax convolutions are NHWC. ``NCHW`` takes the input as ``[B, C, H, W]`` and transposes it at the
boundary (the gradient comes back NCHW); ``auto`` compiles with ``in_shardings=Format(Layout.AUTO)``
(``jax.experimental.layout``), letting XLA choose the layouts of the inputs and parameters, and puts the arguments
into the chosen formats before timing. Outputs are checked against NHWC.

Everything of one model is timed round-robin in one process (``benchmarks/_common.py:interleaved``; medians, the
load average recorded — the machine is shared); the budget and layout rows rotate the order every round.

    python -m benchmarks.remat_layouts --repeats 5          # ~15 minutes on a loaded 2-core CPU

Writes ``benchmarks/results/remat_layouts-<backend>.json``.
"""
from __future__ import annotations

from benchmarks._common import configure_xla

XLA_PRESET = configure_xla()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental.layout import Format, Layout  # noqa: E402

from benchmarks._common import compiled_cost, interleaved, load_note, machine  # noqa: E402
from gradjax import saliency  # noqa: E402
from gradjax._chunking import REMAT_POLICIES, CheckpointedApply  # noqa: E402
from gradjax import train as gtrain  # noqa: E402
from gradjax.losses import terms as LT  # noqa: E402
from gradjax.model import ModelHandle  # noqa: E402
from gradjax.models import create_model  # noqa: E402
from gradjax.models import resnet as resnet_module  # noqa: E402
from gradjax.models import vgg as vgg_module  # noqa: E402

POLICIES = REMAT_POLICIES  # "nothing", "dots", "dots_no_batch", "everything" -> jax.checkpoint_policies.*
MODELS = {  # name: (create_model kwargs, input shape [B, H, W, C], module holding the block class, block class name)
    "vgg9": (dict(name="vgg9", width=0.25, activation="relu"), (8, 32, 32, 3), vgg_module, "ConvBlock"),
    "resnet18": (dict(name="resnet18", width=0.125, activation="softplus"), (16, 16, 16, 1), resnet_module,
                 "BasicBlock"),
}
WORKLOADS = ("input-gradient", "FullGrad", "IG chunk", "CE step", "grad-norm step")


def remat_block(cls: type, policy) -> type:
    """``flax.linen.remat`` of a block class whose ``__call__(x, *, train)`` takes ``train`` by keyword (remat
    needs it static and positional); same class name, so parameter paths are unchanged."""
    class Positional(cls):
        def __call__(self, x, train):
            return cls.__call__(self, x, train=train)

    rematted = nn.remat(Positional, policy=policy, static_argnums=(2,))

    class Keyword(rematted):
        def __call__(self, x, *, train):
            return rematted.__call__(self, x, train)

    Keyword.__name__ = Keyword.__qualname__ = cls.__name__
    return Keyword


@contextlib.contextmanager
def variant_context(variant: str, module, block: str):
    """While tracing a ``blocks:<policy>`` variant, the model's block class is the rematted one."""
    kind, _, policy = variant.partition(":")
    if kind != "blocks":
        yield
        return
    original = getattr(module, block)
    setattr(module, block, remat_block(original, POLICIES[policy]))
    try:
        yield
    finally:
        setattr(module, block, original)


def variant_apply(model, variant: str):
    """A fresh ``apply(variables, x, **kwargs)`` for ``variant`` (a new function object per variant, so no trace
    cache is shared between variants)."""
    kind, _, policy = variant.partition(":")
    if kind == "whole":  # the library's wrapper (a fresh function object on top, as for the other variants)
        wrapped = CheckpointedApply(model.apply, policy)
        return lambda variables, x, *args, **kwargs: wrapped(variables, x, *args, **kwargs)
    if kind not in ("none", "blocks"):
        raise ValueError(f"unknown variant {variant!r}: none, whole:<policy> or blocks:<policy>")
    return lambda variables, x, *args, **kwargs: model.apply(variables, x, *args, **kwargs)


def rel_diff(a, b) -> float:
    """max |a - b| / max |b| over the leaves."""
    da = max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return da / max(max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(b)), 1e-30)


def build(workload: str, apply, variables, x, target, ig_steps: int, state=None, batch=None, chunk=None):
    """``(jitted, args, output-to-compare)`` of one workload."""
    if workload == "input-gradient":
        return jax.jit(lambda v, xb: saliency.input_gradient(ModelHandle(apply, v), xb, target, reduce=None)), \
            (variables, x)
    if workload == "FullGrad":
        return jax.jit(lambda v, xb: saliency.fullgrad(ModelHandle(apply, v), xb, target)), (variables, x)
    if workload == "IG chunk":
        c = ig_steps if chunk is None else chunk
        return jax.jit(lambda v, xb: saliency.integrated_gradients(ModelHandle(apply, v), xb, target, steps=ig_steps,
                                                                   chunk=c, reduce=None)), (variables, x)
    terms = [LT.cross_entropy_term()] + ([LT.gradient_norm_term(0.1)] if workload == "grad-norm step" else [])
    step = gtrain.jit_train_step(LT.make_loss_fn(apply, terms), donate=False, validate=False)
    return step, (state, batch, None)


def step_update(out, state):
    """The parameter update of a train step's output (what remat must not change)."""
    return jax.tree.map(jnp.subtract, out[0].params, state.params)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: ``VmHWM`` of ``/proc/self/status`` (reset by ``exec``, unlike
    ``ru_maxrss``, which a child started by ``subprocess`` inherits from its parent's high-water mark)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(args) -> dict:
    """One memory-budget configuration alone in this process: prints the peak RSS (MB) after initialisation,
    after compiling and after running it (a high-water mark, so each includes the earlier)."""
    variant, chunk = args.rss_child.split(",")
    kwargs, shape, module, block = MODELS[args.models.split(",")[0]]
    model = create_model(num_classes=10, **kwargs)
    x = jax.random.uniform(jax.random.PRNGKey(0), shape)
    variables = model.init(jax.random.PRNGKey(1), x[:1], train=False)
    target = jax.block_until_ready(jnp.argmax(model.apply(variables, x), -1))
    out = {"init": peak_rss_mb()}
    with variant_context(variant, module, block):
        jitted, fargs = build("IG chunk", variant_apply(model, variant), variables, x, target, args.budget_steps,
                              chunk=int(chunk))
        compiled = jitted.lower(*fargs).compile()
    out["compiled"] = peak_rss_mb()
    jax.block_until_ready(compiled(*fargs))
    out["run"] = peak_rss_mb()
    print(json.dumps(out))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vgg9,resnet18")
    p.add_argument("--variants", default="none,whole:nothing,whole:dots,whole:dots_no_batch,whole:everything,"
                                         "blocks:nothing,blocks:dots")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--ig-steps", type=int, default=16)
    p.add_argument("--budget-steps", type=int, default=32)
    p.add_argument("--budget-chunks", default="8,32")
    p.add_argument("--budget-variants", default="none,blocks:nothing,whole:dots")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rss", action="store_true",
                   help="also run each memory-budget configuration alone in a child process and record its peak RSS")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)  # "VARIANT,CHUNK": the child's job
    p.add_argument("--skip", default="", help="comma-separated parts to skip: remat, budget, layouts")
    p.add_argument("--xla", default="default", help="XLA:CPU flag preset (read before JAX starts)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    if args.rss_child:
        return rss_child(args)
    skip = set(filter(None, args.skip.split(",")))
    variants = args.variants.split(",")
    if variants[0] != "none":
        variants = ["none"] + [v for v in variants if v != "none"]
    workloads = args.workloads.split(",")
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        raise SystemExit(f"unknown workloads {bad}; choose from {WORKLOADS}")
    result = {"args": vars(args), "models": {}}
    tables = []
    for mname in args.models.split(","):
        kwargs, shape, module, block = MODELS[mname]
        model = create_model(num_classes=10, **kwargs)
        x = jax.random.uniform(jax.random.PRNGKey(0), shape)
        variables = model.init(jax.random.PRNGKey(1), x[:1], train=False)
        target = jnp.argmax(model.apply(variables, x), -1)
        batch = {"image": x, "label": target}
        state = gtrain.create_train_state(model, optax.sgd(0.1), x[:1])
        res = {"remat": {}, "budget": {}, "layouts": {}}
        # ------------------------------------------------------------------------------------------- remat
        fns, info, outs = {}, {}, {}
        if "remat" not in skip:
            for variant in variants:
                apply = variant_apply(model, variant)
                for w in workloads:
                    with variant_context(variant, module, block):
                        jitted, fargs = build(w, apply, variables, x, target, args.ig_steps, state, batch)
                        cost = compiled_cost(jitted, *fargs)
                    compiled = cost.pop("compiled")
                    key = f"{w} | {variant}"
                    fns[key] = lambda compiled=compiled, fargs=fargs: compiled(*fargs)
                    out = compiled(*fargs)
                    outs[key] = step_update(out, state) if w.endswith("step") else out
                    info[key] = dict(cost, workload=w, variant=variant)
                    print(f"{mname} {key}: compiled in {cost['compile_s']:.1f} s, temp "
                          f"{cost['temp_bytes'] / 2**20:.1f} MB", flush=True)
            med, runs, loads = interleaved(fns, args.repeats)
            for key in fns:
                w, variant = info[key]["workload"], info[key]["variant"]
                base = f"{w} | none"
                res["remat"][key] = dict(info[key], run_s=med[key], runs_s=runs[key],
                                         time_over_none=med[key] / med[base],
                                         temp_over_none=info[key]["temp_bytes"] / info[base]["temp_bytes"],
                                         flops_over_none=info[key]["flops"] / info[base]["flops"],
                                         rel_diff=rel_diff(outs[key], outs[base]))
            res["remat_loads"] = loads
            lines = [f"**{mname}** ({kwargs}, input {list(shape)}), IG chunk = {args.ig_steps} path points in one "
                     f"call; medians of {args.repeats} interleaved rounds, {load_note(loads)}.", "",
                     "| workload | variant | ms | time / none | temp MB | temp / none | XLA FLOPs / none | "
                     "convs: jaxpr → compiled | rel. diff |", "|---|---|---|---|---|---|---|---|---|"]
            for key, r in res["remat"].items():
                lines.append(f"| {r['workload']} | {r['variant']} | {1e3 * r['run_s']:.1f} | "
                             f"{r['time_over_none']:.2f} | {r['temp_bytes'] / 2**20:.1f} | {r['temp_over_none']:.2f} | "
                             f"{r['flops_over_none']:.2f} | {r['convs']} → {r['compiled_convs']} | "
                             f"{r['rel_diff']:.1e} |")
            tables.append("\n".join(lines))
            print(tables[-1], flush=True)
        # ------------------------------------------------------------------------------------------ budget
        if "budget" not in skip:
            fns, info = {}, {}
            for variant in args.budget_variants.split(","):
                apply = variant_apply(model, variant)
                for c in [int(c) for c in args.budget_chunks.split(",")]:
                    with variant_context(variant, module, block):
                        jitted, fargs = build("IG chunk", apply, variables, x, target, args.budget_steps, chunk=c)
                        cost = compiled_cost(jitted, *fargs)
                    compiled = cost.pop("compiled")
                    key = f"IG-{args.budget_steps}, chunk {c} | {variant}"
                    fns[key] = lambda compiled=compiled, fargs=fargs: compiled(*fargs)
                    info[key] = dict(cost, chunk=c, variant=variant)
                    print(f"{mname} {key}: temp {cost['temp_bytes'] / 2**20:.1f} MB", flush=True)
            med, runs, loads = interleaved(fns, args.repeats, rotate=True)
            lines = [f"**{mname}**, IG with {args.budget_steps} path points on the batch of {shape[0]}; medians of "
                     f"{args.repeats} interleaved rounds, {load_note(loads)}.", "",
                     "| chunk | variant | ms | temp MB |", "|---|---|---|---|"]
            if args.rss:
                lines[-2] += " peak RSS MB: after init → compile → run |"
                lines[-1] += "---|"
            for key in fns:
                res["budget"][key] = dict(info[key], run_s=med[key], runs_s=runs[key])
                lines.append(f"| {info[key]['chunk']} | {info[key]['variant']} | {1e3 * med[key]:.1f} | "
                             f"{info[key]['temp_bytes'] / 2**20:.1f} |")
                if args.rss:
                    cmd = [sys.executable, "-m", "benchmarks.remat_layouts", "--models", mname, "--budget-steps",
                           str(args.budget_steps), "--xla", args.xla, "--rss-child",
                           f"{info[key]['variant']},{info[key]['chunk']}"]
                    child = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    rss = json.loads(child.stdout.strip().splitlines()[-1])
                    res["budget"][key]["peak_rss_mb"] = rss
                    lines[-1] += f" {rss['init']:.0f} → {rss['compiled']:.0f} → {rss['run']:.0f} |"
            res["budget_loads"] = loads
            tables.append("\n".join(lines))
            print(tables[-1], flush=True)
        # ----------------------------------------------------------------------------------------- layouts
        if "layouts" not in skip:
            fns, info, outs = {}, {}, {}
            x_nchw = jnp.transpose(x, (0, 3, 1, 2))
            for w in ("input-gradient", "IG chunk"):
                steps = args.ig_steps

                def f_nhwc(v, xb, w=w):
                    h = ModelHandle(lambda *a, **k: model.apply(*a, **k), v)
                    if w == "input-gradient":
                        return saliency.input_gradient(h, xb, target, reduce=None)
                    return saliency.integrated_gradients(h, xb, target, steps=steps, chunk=steps, reduce=None)

                def f_nchw(v, xc, f_nhwc=f_nhwc):  # the caller's tensors are NCHW; the model sees NHWC
                    return jnp.transpose(f_nhwc(v, jnp.transpose(xc, (0, 2, 3, 1))), (0, 3, 1, 2))

                forms = {"NHWC": (jax.jit(f_nhwc), (variables, x)),
                         "NCHW (transpose at the boundary)": (jax.jit(f_nchw), (variables, x_nchw)),
                         "NHWC, Layout.AUTO": (jax.jit(lambda v, xb, f=f_nhwc: f(v, xb),
                                                       in_shardings=Format(Layout.AUTO)), None)}
                for form, (jitted, fargs) in forms.items():
                    key = f"{w} | {form}"
                    if fargs is None:  # AUTO: compile for shapes, then put the arguments into the chosen formats
                        spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (variables, x))
                        cost = compiled_cost(jitted, *spec)
                        formats = cost["compiled"].input_formats[0]
                        fargs = tuple(jax.tree.map(jax.device_put, arg, fmt)
                                      for arg, fmt in zip((variables, x), formats))
                        leaves = [fm.layout.major_to_minor for fm in jax.tree.leaves(
                            formats, is_leaf=lambda t: isinstance(t, Format)) if fm.layout is not None]
                        row_major = all(tuple(m) == tuple(range(len(m))) for m in leaves)
                        chosen = [f"{len(leaves)} arrays, " + ("all row-major (XLA's default)" if row_major else
                                                               "not all row-major: " + " ".join(
                                                                   sorted({str(m) for m in leaves})))]
                    else:
                        cost = compiled_cost(jitted, *fargs)
                        chosen = None
                    compiled = cost.pop("compiled")
                    out = compiled(*fargs)
                    outs[key] = jnp.transpose(out, (0, 2, 3, 1)) if form.startswith("NCHW") else out
                    fns[key] = lambda compiled=compiled, fargs=fargs: compiled(*fargs)
                    info[key] = dict(cost, workload=w, form=form, chosen_layouts=chosen)
                    print(f"{mname} {key}: temp {cost['temp_bytes'] / 2**20:.1f} MB; layouts {chosen}", flush=True)
            med, runs, loads = interleaved(fns, args.repeats, rotate=True)
            lines = [f"**{mname}**, layouts; medians of {args.repeats} interleaved rounds, {load_note(loads)}.", "",
                     "| workload | input layout | ms | time / NHWC | temp MB | rel. diff to NHWC | layouts XLA chose |",
                     "|---|---|---|---|---|---|---|"]
            for key in fns:
                w = info[key]["workload"]
                base = f"{w} | NHWC"
                res["layouts"][key] = dict(info[key], run_s=med[key], runs_s=runs[key],
                                           time_over_nhwc=med[key] / med[base], rel_diff=rel_diff(outs[key],
                                                                                                  outs[base]))
                r = res["layouts"][key]
                lines.append(f"| {w} | {info[key]['form']} | {1e3 * med[key]:.1f} | {r['time_over_nhwc']:.2f} | "
                             f"{r['temp_bytes'] / 2**20:.1f} | {r['rel_diff']:.1e} | "
                             f"{'-' if r['chosen_layouts'] is None else ' '.join(r['chosen_layouts'])} |")
            res["layout_loads"] = loads
            tables.append("\n".join(lines))
            print(tables[-1], flush=True)
        result["models"][mname] = res
    result["machine"] = machine({"xla_preset": XLA_PRESET, "peak_rss_mb": peak_rss_mb()})
    result["tables"] = tables
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"remat_layouts-{jax.default_backend()}"
                                  f"{'' if XLA_PRESET == 'default' else '-' + XLA_PRESET}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=float)
    print(f"peak RSS of the process {result['machine']['peak_rss_mb']:.0f} MB; wrote {path}")
    return result


if __name__ == "__main__":
    main()
