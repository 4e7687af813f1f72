"""Where the time goes: each VGG layer type, forward and backward, gradjax/JAX vs PyTorch on the same shapes.

For every 3x3 convolution of ``--model`` at ``--width`` (the network of ``benchmarks/peers_captum.py``; each
distinct ``(H, C_in, C_out)`` once) and for BatchNorm (eval: the per-channel affine map), 2x2 max-pool and ReLU at
each block's output shape, batch ``--batch-size``:

* ``fwd`` — the layer;
* ``dx`` — the input-gradient (vector-Jacobian product with a fixed cotangent ``g``);
* ``dw`` — the weight-gradient (convolutions only).

Competitors (all timed round-robin in one process, :func:`benchmarks._common.interleaved`, rotated):

* ``torch`` — NCHW, ``torch.nn.functional`` forwards; backwards are the ATen kernels autograd calls
  (``aten.convolution_backward`` with one output mask, ``max_pool2d_with_indices_backward``; BatchNorm and ReLU
  via ``torch.autograd.grad`` of a retained graph);
* ``lax`` — gradjax's default: ``lax.conv_general_dilated`` NHWC/HWIO, ``flax.linen.max_pool`` (its backward is
  XLA's ``select_and_scatter``), ``jax.vjp``;
* ``lax-nchw`` — the same convolution in NCHW/OIHW (layout check);
* ``im2col`` — :func:`gradjax.models.cpu_ops.conv_im2col` (``backward="gemm"``: custom VJP, every pass a matrix
  product), ``im2col-ad`` its ``backward="autodiff"`` form, ``patches`` ``lax.conv_general_dilated_patches`` +
  a matrix product (differentiated by JAX); for the max-pool ``mask`` =
  :func:`gradjax.models.cpu_ops.max_pool_mask`.

Every jitted JAX function is compiled before timing; the ``dx``/``dw`` functions take ``g`` as an argument (XLA
drops the unused forward of a linear layer's VJP). Reported: median ms per call and ``ratio = time / torch's``
(> 1: slower than PyTorch), with the load record of :mod:`benchmarks._common`.

    python -m benchmarks.layer_profile                      # VGG-9 width 0.25, batch 256, ~2-3 min on 2 cores
    python -m benchmarks.layer_profile --smoke              # tiny code-path check (~20 s)

Writes ``benchmarks/results/layer_profile-cpu.json``.
"""
from __future__ import annotations

from benchmarks._common import configure_xla

XLA_PRESET = configure_xla()

import argparse  # noqa: E402
import os  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks._common import interleaved, load_note, machine, pin_torch_threads, write_result  # noqa: E402
from gradjax.models.cpu_ops import conv_im2col, max_pool_mask  # noqa: E402
from gradjax.models.vgg import VGG_CONFIGS  # noqa: E402

try:
    import torch
except ImportError as e:  # pragma: no cover - optional dependency
    raise SystemExit(f"this benchmark needs PyTorch ({e}); pip install torch==2.13.0") from e

PREC = lax.Precision.HIGHEST  # gradjax's models default to precision="highest" (the same float32 products on a CPU)


def conv_shapes(model: str, width: float, size: int, in_channels: int = 3) -> tuple[list, list]:
    """Distinct ``(H, C_in, C_out)`` of the 3x3 convolutions, and the block output shapes ``(H, C)`` in order."""
    convs, outs, h, c = [], [], size, in_channels
    for layer in VGG_CONFIGS[model]:
        if layer == "M":
            h //= 2
            continue
        o = max(1, int(round(layer * width)))
        if (h, c, o) not in convs:
            convs.append((h, c, o))
        if (h, o) not in outs:
            outs.append((h, o))
        c = o
    return convs, outs


def jax_conv(impl: str):
    """``(x, w) -> z`` NHWC/HWIO for an implementation name."""
    if impl == "lax":
        return lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                     precision=PREC)
    if impl == "im2col":
        return lambda x, w: conv_im2col(x, w, precision=PREC, backward="gemm")
    if impl == "im2col-ad":
        return lambda x, w: conv_im2col(x, w, precision=PREC, backward="autodiff")
    if impl == "patches":
        def f(x, w):
            kh, kw, c, o = w.shape
            cols = lax.conv_general_dilated_patches(x, (kh, kw), (1, 1), "SAME",
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=PREC)
            # patch features are ordered (c, i, j)
            return jnp.dot(cols, w.transpose(2, 0, 1, 3).reshape(c * kh * kw, o), precision=PREC)
        return f
    raise ValueError(impl)


def conv_case(b: int, h: int, c: int, o: int, impls: list[str], key) -> tuple[dict, dict]:
    """Timed callables of one convolution shape: ``{name: fn}`` and a correctness record per implementation."""
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, (b, h, h, c))
    w = jax.random.normal(k2, (3, 3, c, o)) / np.sqrt(9 * c)
    g = jax.random.normal(k3, (b, h, h, o))
    fns, check = {}, {}
    ref = None
    for impl in impls:
        if impl == "lax-nchw":
            xn, wn, gn = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), g.transpose(0, 3, 1, 2)
            f = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                                      precision=PREC)  # noqa: E731
            args = (xn, wn, gn)
        else:
            f, args = jax_conv(impl), (x, w, g)
        fwd = jax.jit(f)
        dx = jax.jit(lambda x, w, g, f=f: jax.vjp(lambda x: f(x, w), x)[1](g)[0])
        dw = jax.jit(lambda x, w, g, f=f: jax.vjp(lambda w: f(x, w), w)[1](g)[0])
        a = args
        fns[f"fwd/{impl}"] = lambda fwd=fwd, a=a: fwd(a[0], a[1])
        fns[f"dx/{impl}"] = lambda dx=dx, a=a: dx(*a)
        fns[f"dw/{impl}"] = lambda dw=dw, a=a: dw(*a)
        if impl != "lax-nchw":
            outs = (np.asarray(fwd(x, w)), np.asarray(dx(x, w, g)), np.asarray(dw(x, w, g)))
            if ref is None:
                ref = outs
            check[impl] = [float(np.max(np.abs(p - q)) / np.max(np.abs(q))) for p, q in zip(outs, ref)]
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    wt = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy())
    gt = torch.from_numpy(np.asarray(g).transpose(0, 3, 1, 2).copy())
    conv_bwd = torch.ops.aten.convolution_backward
    fns["fwd/torch"] = lambda: torch.nn.functional.conv2d(xt, wt, padding=1)
    fns["dx/torch"] = lambda: conv_bwd(gt, xt, wt, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                       [True, False, False])[0]
    fns["dw/torch"] = lambda: conv_bwd(gt, xt, wt, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                       [False, True, False])[1]
    with torch.no_grad():
        tref = (fns["fwd/torch"]().numpy().transpose(0, 2, 3, 1), fns["dx/torch"]().numpy().transpose(0, 2, 3, 1),
                fns["dw/torch"]().numpy().transpose(2, 3, 1, 0))
    check["torch"] = [float(np.max(np.abs(p - q)) / np.max(np.abs(q))) for p, q in zip(tref, ref)]
    return fns, check


def elementwise_cases(b: int, h: int, c: int, key, pool_impls: list[str]) -> tuple[dict, dict]:
    """BatchNorm (eval affine), ReLU and 2x2 max-pool at ``[b, h, h, c]``: forward and input-gradient."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    x = jax.random.normal(k1, (b, h, h, c))
    scale, shift = jax.random.uniform(k2, (c,), minval=0.5, maxval=1.5), jax.random.normal(k3, (c,))
    mean, var = jnp.zeros((c,)), jnp.ones((c,))
    g = jax.random.normal(k4, (b, h, h, c))
    gp = g[:, ::2, ::2]
    fns, check = {}, {}

    def bn(x):  # TappedBatchNorm's eval form: s * x + c
        s = scale * lax.rsqrt(var + 1e-5)
        return x * s + (shift - s * mean)

    jfs = {"bn": (bn, g), "relu": (jax.nn.relu, g)}
    for impl in pool_impls:
        pool = (lambda x: nn.max_pool(x, (2, 2), (2, 2))) if impl == "lax" else max_pool_mask
        jfs[f"maxpool-{impl}"] = (pool, gp)
    grads = {}
    for name, (f, cot) in jfs.items():
        fwd, dx = jax.jit(f), jax.jit(lambda x, g, f=f: jax.vjp(f, x)[1](g)[0])
        layer, impl = (name.split("-") + ["lax"])[:2]
        fns[f"fwd/{impl}/{layer}"] = lambda fwd=fwd: fwd(x)
        fns[f"dx/{impl}/{layer}"] = lambda dx=dx, cot=cot: dx(x, cot)
        grads[name] = np.asarray(dx(x, cot))
    if "maxpool-mask" in grads:
        check["maxpool mask vs lax dx"] = float(np.max(np.abs(grads["maxpool-mask"] - grads["maxpool-lax"])))
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    gt = torch.from_numpy(np.asarray(g).transpose(0, 3, 1, 2).copy())
    gpt = torch.from_numpy(np.asarray(gp).transpose(0, 3, 1, 2).copy())
    st, ct = (torch.from_numpy(np.array(a)) for a in (scale, shift))
    mt, vt = torch.zeros(c), torch.ones(c)
    F = torch.nn.functional
    y_bn = F.batch_norm(xt, mt, vt, st, ct, training=False, eps=1e-5)
    y_relu = torch.relu(xt)
    y_pool, idx = F.max_pool2d(xt, 2, 2, return_indices=True)
    with torch.no_grad():
        fns["fwd/torch/bn"] = lambda: F.batch_norm(xt, mt, vt, st, ct, training=False, eps=1e-5)
        fns["fwd/torch/relu"] = lambda: torch.relu(xt)
        fns["fwd/torch/maxpool"] = lambda: F.max_pool2d(xt, 2, 2)
    fns["dx/torch/bn"] = lambda: torch.autograd.grad(y_bn, xt, gt, retain_graph=True)[0]
    fns["dx/torch/relu"] = lambda: torch.autograd.grad(y_relu, xt, gt, retain_graph=True)[0]
    fns["dx/torch/maxpool"] = lambda: torch.ops.aten.max_pool2d_with_indices_backward(
        gpt, xt.detach(), [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
    for k in ("fwd/torch/bn", "fwd/torch/relu", "fwd/torch/maxpool"):  # no autograd graph in the timed forwards
        f0 = fns[k]
        fns[k] = lambda f0=f0: _no_grad(f0)
    return fns, check


def _no_grad(f):
    with torch.no_grad():
        return f()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg9", choices=sorted(VGG_CONFIGS))
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--conv-impls", default="lax,lax-nchw,im2col,im2col-ad,patches")
    p.add_argument("--pool-impls", default="lax,mask")
    p.add_argument("--smoke", action="store_true", help="vgg4 width 0.125, batch 4 of 16x16, 1 repeat")
    p.add_argument("--xla", default="default")
    p.add_argument("--threads", default=None)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.width, args.image_size, args.batch_size, args.repeats = "vgg4", 0.125, 16, 4, 1
    pin_torch_threads(torch)
    impls = args.conv_impls.split(",")
    convs, outs = conv_shapes(args.model, args.width, args.image_size)
    key = jax.random.PRNGKey(0)
    rows, checks, all_loads = {}, {}, []
    b = args.batch_size
    for i, (h, c, o) in enumerate(convs):
        fns, check = conv_case(b, h, c, o, impls, jax.random.fold_in(key, i))
        sync = {k: (lambda a: a) for k in fns if "torch" in k}
        med, runs, loads = interleaved(fns, args.repeats, sync, rotate=True)
        all_loads += loads
        name = f"conv3x3 {h}x{h} {c}->{o}"
        rows[name] = {"shape": [b, h, h, c, o], "ms": {k: 1e3 * v for k, v in med.items()},
                      "runs_ms": {k: [1e3 * t for t in v] for k, v in runs.items()}}
        checks[name] = check
        print(name, {k: round(1e3 * v, 2) for k, v in med.items()}, flush=True)
    for i, (h, c) in enumerate(outs):
        fns, check = elementwise_cases(b, h, c, jax.random.fold_in(key, 100 + i), args.pool_impls.split(","))
        sync = {k: (lambda a: a) for k in fns if "torch" in k}
        med, runs, loads = interleaved(fns, args.repeats, sync, rotate=True)
        all_loads += loads
        name = f"bn/relu/maxpool {h}x{h}x{c}"
        rows[name] = {"shape": [b, h, h, c], "ms": {k: 1e3 * v for k, v in med.items()},
                      "runs_ms": {k: [1e3 * t for t in v] for k, v in runs.items()}}
        checks[name] = check
        print(name, {k: round(1e3 * v, 2) for k, v in med.items()}, flush=True)

    # tables: ms and time / torch's per pass
    lines = [f"Per-layer times, {args.model} width {args.width} shapes, batch {b}, {args.image_size}x{args.image_size}"
             f" input; medians of {args.repeats} rotated round-robin rounds; {load_note(all_loads)}; XLA preset "
             f"`{XLA_PRESET}`; jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads). "
             "Entry: ms (time / PyTorch's).", ""]
    conv_cols = ["torch"] + impls
    lines += ["| convolution | pass | " + " | ".join(conv_cols) + " |", "|---|---|" + "---|" * len(conv_cols)]
    totals = {k: 0.0 for k in conv_cols}
    for name, r in rows.items():
        if not name.startswith("conv"):
            continue
        for ps in ("fwd", "dx", "dw"):
            t = r["ms"][f"{ps}/torch"]
            cells = []
            for k in conv_cols:
                v = r["ms"][f"{ps}/{k}"]
                totals[k] += v
                cells.append(f"{v:.2f}" if k == "torch" else f"{v:.2f} ({v / t:.2f})")
            lines.append(f"| {name[8:]} | {ps} | " + " | ".join(cells) + " |")
    lines.append("| **all convolutions** | fwd+dx+dw | " + " | ".join(
        f"**{totals[k]:.1f}**" + ("" if k == "torch" else f" ({totals[k] / totals['torch']:.2f})")
        for k in conv_cols) + " |")
    lines += ["", "| layer | shape | pass | torch | lax | " + " | ".join(f"maxpool-{q}" for q in
                                                                       args.pool_impls.split(",") if q != "lax") + " |",
              "|---|---|---|---|---|" + "---|" * (len(args.pool_impls.split(",")) - 1)]
    for name, r in rows.items():
        if name.startswith("conv"):
            continue
        for layer in ("bn", "relu", "maxpool"):
            for ps in ("fwd", "dx"):
                t = r["ms"][f"{ps}/torch/{layer}"]
                v = r["ms"][f"{ps}/lax/{layer}"]
                extra = [f"{r['ms'][f'{ps}/{q}/maxpool']:.2f} ({r['ms'][f'{ps}/{q}/maxpool'] / t:.2f})"
                         if layer == "maxpool" else "—" for q in args.pool_impls.split(",") if q != "lax"]
                lines.append(f"| {layer} | {name.split()[-1]} | {ps} | {t:.2f} | {v:.2f} ({v / t:.2f}) | "
                             + " | ".join(extra) + " |")
    table = "\n".join(lines)
    print(table)
    result = {"args": vars(args), "machine": machine({"torch": torch.__version__, "xla_preset": XLA_PRESET}),
              "rows": rows, "checks": checks, "loads": all_loads, "table": table}
    suffix = "-smoke" if args.smoke else ""
    return write_result(os.path.join(args.out, f"layer_profile-cpu{suffix}.json"), result, all_loads)


if __name__ == "__main__":
    main()
