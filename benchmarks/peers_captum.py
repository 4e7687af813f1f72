"""gradjax vs PyTorch + Captum on the same network, in one run: speed ratios and agreement of the maps.

The Flax VGG's weights (with non-trivial BatchNorm statistics) are copied into an equivalent PyTorch module, so
both frameworks explain the same function. For each method both sides compute raw (channel-unreduced)
attributions of the predicted class on the same batch:

* input-gradient — ``captum.attr.Saliency(abs=False)``;
* integrated gradients, 32 midpoint steps, zero baseline — ``captum.attr.IntegratedGradients(method="riemann_middle")``;
* SmoothGrad², 16 samples — ``captum.attr.NoiseTunnel(Saliency, nt_type="smoothgrad_sq")`` (different noise
  draws: no agreement check);
* guided backprop — ``captum.attr.GuidedBackprop``;
* Grad-CAM on the last convolutional block — ``captum.attr.LayerGradCam`` + ``LayerAttribution.interpolate``
  (half-pixel bilinear upsampling on both sides);
* FullGrad (thesis eq. 3.2) — Captum has none; the peer is a PyTorch implementation written here in the style
  of the reference code (forward hooks on every biased Conv2d / BatchNorm2d output, one ``torch.autograd.grad`` call for
  the input- and all bias-gradients, ``psi = upsample o rescale o abs``).

Timing: every row of both sides round-robin in one loop (:func:`benchmarks._common.interleaved`), median of
``--repeats`` rounds after a warm-up round (gradjax compiled once, excluded), both on the CPU with all cores; the
load average is recorded (the machine is shared). ``--device cuda`` puts torch on the GPU JAX also uses (JAX's
default backend; run with ``JAX_PLATFORMS=cuda``): the peer's timed function ends with ``torch.cuda.synchronize()``
(gradjax's with ``block_until_ready``), ``--precision exact`` (default) turns TF32 off on both sides
(``torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False``; gradjax's models are
``precision="highest"`` by default), ``--precision fast`` allows TF32 on both; each row records images/s and the
peak memory (torch: ``torch.cuda.max_memory_allocated`` reset per row; JAX: the device's ``peak_bytes_in_use`` of
``memory_stats()``, cumulative over the run, where the backend reports it).
``ratio = peer time / gradjax time`` (> 1: gradjax is faster). ``max |diff| / max |ref|`` compares the
two attributions.

    pip install torch==2.13.0 captum   # (or: pip install -e ".[bench]")
    python -m benchmarks.peers_captum  # ~2 minutes on 2 CPU cores
    python -m benchmarks.peers_captum --smoke                        # tiny CPU check of the code path (~30 s)
    # on a GPU, JAX must not preallocate 75 % of the memory that torch shares (benchmarks/gpu_check.sh sets this):
    export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
    python -m benchmarks.peers_captum --device cuda --preset imagenet          # VGG-16-BN, batch 8 of 224x224
    python -m benchmarks.peers_captum --device cuda --preset imagenet-resnet   # CIFAR ResNet-18 twin, 8 of 224x224
"""
from __future__ import annotations

from benchmarks._common import configure_xla

XLA_PRESET = configure_xla()

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import (interleaved, load_note, machine, nontrivial_batch_stats, pin_torch_threads,
                                write_result)
from gradjax import saliency
from gradjax.models import create_model
from gradjax.models.vgg import VGG_CONFIGS

try:
    import torch
except ImportError as e:  # pragma: no cover - optional dependency
    raise SystemExit(f"this benchmark needs PyTorch and Captum ({e}); pip install torch==2.13.0 captum") from e
try:  # benchmarks.peers_train_steps imports this module's PyTorch twin and needs no Captum
    from captum.attr import GuidedBackprop, IntegratedGradients, LayerAttribution, LayerGradCam, NoiseTunnel, Saliency
    CAPTUM_ERROR = None
except ImportError as e:  # pragma: no cover - optional dependency
    CAPTUM_ERROR = e


def torch_vgg(model_name: str, width: float, in_channels: int, num_classes: int, variables) -> "torch.nn.Module":
    """The PyTorch twin of :class:`gradjax.models.vgg.VGG` (eval mode) carrying the Flax weights."""
    params, stats = variables["params"], variables["batch_stats"]
    tensor = lambda a: torch.tensor(np.asarray(a))
    layers, c_in, i = [], in_channels, 0
    for layer in VGG_CONFIGS[model_name]:
        if layer == "M":
            layers.append(torch.nn.MaxPool2d(2, 2))
            continue
        c_out = max(1, int(round(layer * width)))
        conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
        bn = torch.nn.BatchNorm2d(c_out, eps=1e-5)
        p, s = params[f"block{i}"], stats[f"block{i}"]
        with torch.no_grad():
            conv.weight.copy_(tensor(np.asarray(p["conv"]["kernel"]).transpose(3, 2, 0, 1)))
            conv.bias.copy_(tensor(p["conv"]["bias"]))
            bn.weight.copy_(tensor(p["bn"]["scale"]))
            bn.bias.copy_(tensor(p["bn"]["bias"]))
            bn.running_mean.copy_(tensor(s["bn"]["mean"]))
            bn.running_var.copy_(tensor(s["bn"]["var"]))
        layers += [conv, bn, torch.nn.ReLU()]
        c_in, i = c_out, i + 1
    head = torch.nn.Linear(c_in, num_classes)
    with torch.no_grad():
        head.weight.copy_(tensor(np.asarray(params["head"]["kernel"]).T))
        head.bias.copy_(tensor(params["head"]["bias"]))
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), head).eval()


class _SamePad(torch.nn.Module):
    """lax's 'SAME' padding of a stride-2 3x3 convolution on an even size: (0, 1) per axis (PyTorch's
    ``padding=1`` would shift the grid by one pixel)."""

    def forward(self, x):
        return torch.nn.functional.pad(x, (0, 1, 0, 1))


class _TorchBasicBlock(torch.nn.Module):
    """The PyTorch twin of :class:`gradjax.models.resnet.BasicBlock` (ReLU)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.pad = _SamePad() if stride == 2 else torch.nn.Identity()
        self.conv1 = torch.nn.Conv2d(c_in, c_out, 3, stride, padding=0 if stride == 2 else 1, bias=False)
        self.bn1, self.act1 = torch.nn.BatchNorm2d(c_out, eps=1e-5), torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
        self.bn2, self.act2 = torch.nn.BatchNorm2d(c_out, eps=1e-5), torch.nn.ReLU()
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                                torch.nn.BatchNorm2d(c_out, eps=1e-5))

    def forward(self, x):
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(self.pad(x))))))
        return self.act2(y + (x if self.shortcut is None else self.shortcut(x)))


def torch_resnet18(width: float, in_channels: int, num_classes: int, variables) -> "torch.nn.Module":
    """The PyTorch twin of :class:`gradjax.models.resnet.ResNet` (CIFAR ResNet-18, ReLU; eval mode) carrying the
    Flax weights."""
    params, stats = variables["params"], variables["batch_stats"]
    tensor = lambda a: torch.tensor(np.asarray(a))  # noqa: E731

    def conv(m, p):
        with torch.no_grad():
            m.weight.copy_(tensor(np.asarray(p["kernel"]).transpose(3, 2, 0, 1)))

    def bn(m, p, st):
        with torch.no_grad():
            m.weight.copy_(tensor(p["scale"]))
            m.bias.copy_(tensor(p["bias"]))
            m.running_mean.copy_(tensor(st["mean"]))
            m.running_var.copy_(tensor(st["var"]))

    c0 = max(1, int(round(64 * width)))
    stem = torch.nn.Conv2d(in_channels, c0, 3, padding=1, bias=False)
    stem_bn = torch.nn.BatchNorm2d(c0, eps=1e-5)
    conv(stem, params["stem_conv"])
    bn(stem_bn, params["stem_bn"], stats["stem_bn"])
    layers, c_in = [stem, stem_bn, torch.nn.ReLU()], c0
    for stage in range(4):
        for j in range(2):
            c_out, name = c0 * 2 ** stage, f"stage{stage}_block{j}"
            block = _TorchBasicBlock(c_in, c_out, 2 if (stage > 0 and j == 0) else 1)
            p, st = params[name], stats[name]
            conv(block.conv1, p["conv1"])
            bn(block.bn1, p["bn1"], st["bn1"])
            conv(block.conv2, p["conv2"])
            bn(block.bn2, p["bn2"], st["bn2"])
            if block.shortcut is not None:
                conv(block.shortcut[0], p["shortcut_conv"])
                bn(block.shortcut[1], p["shortcut_bn"], st["shortcut_bn"])
            layers.append(block)
            c_in = c_out
    head = torch.nn.Linear(c_in, num_classes)
    with torch.no_grad():
        head.weight.copy_(tensor(np.asarray(params["head"]["kernel"]).T))
        head.bias.copy_(tensor(params["head"]["bias"]))
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), head).eval()


def torch_fullgrad(model: "torch.nn.Module", x: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
    """FullGrad (thesis eq. 3.2) in PyTorch: ``psi(grad_x f * x) + sum_l psi(grad_{z_l} f * b_l)`` with
    ``psi = bilinear upsample (align_corners) o per-example min-max rescale o abs``, channels summed."""
    feats, biases = [], []

    def hook(module, inputs, output):
        feats.append(output)
        if isinstance(module, torch.nn.Conv2d):
            biases.append(module.bias)
        else:  # eval BatchNorm's implicit bias beta - gamma * mean / sqrt(var + eps)
            biases.append(module.bias - module.weight * module.running_mean / torch.sqrt(module.running_var + module.eps))

    handles = [m.register_forward_hook(hook) for m in model.modules()  # bias-free convolutions: no bias map
               if isinstance(m, torch.nn.BatchNorm2d) or (isinstance(m, torch.nn.Conv2d) and m.bias is not None)]
    try:
        x = x.clone().requires_grad_(True)
        out = model(x)
        grads = torch.autograd.grad(out.gather(1, target[:, None]).sum(), [x] + feats)
    finally:
        for h in handles:
            h.remove()

    def psi(m):
        m = m.abs()
        flat = m.reshape(m.shape[0], -1)
        lo, hi = flat.min(1)[0][:, None, None, None], flat.max(1)[0][:, None, None, None]
        m = torch.where(hi > lo, (m - lo) / (hi - lo).clamp_min(1e-30), torch.zeros_like(m)).sum(1, keepdim=True)
        return torch.nn.functional.interpolate(m, size=x.shape[2:], mode="bilinear", align_corners=True)[:, 0]

    total = psi(grads[0] * x)
    for g, b in zip(grads[1:], biases):
        total = total + psi(g * b[None, :, None, None])
    return total.detach()


PRESETS = {  # name: overrides of the command-line defaults
    "imagenet": {"model": "vgg16", "width": 1.0, "batch_size": 8, "image_size": 224, "classes": 1000, "repeats": 5},
    "imagenet-resnet": {"model": "resnet18", "width": 1.0, "batch_size": 8, "image_size": 224, "classes": 1000,
                        "repeats": 3},  # no stem stride / max-pool: ~2x VGG-16's FLOPs at 224x224
    "smoke-resnet": {"model": "resnet18", "width": 0.125, "batch_size": 2, "image_size": 16, "classes": 10,
                     "repeats": 1, "smoothgrad_samples": 2},
    "smoke": {"model": "vgg4", "width": 0.125, "batch_size": 2, "image_size": 16, "classes": 10, "repeats": 1,
              "smoothgrad_samples": 2},
}


def torch_device(name: str) -> "torch.device":
    """``torch.device(name)``; ``"cuda"`` needs ``torch.cuda.is_available()`` (else ``SystemExit``)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False (install a CUDA build of torch)")
    return torch.device(name)


def set_torch_precision(device: "torch.device", precision: str) -> None:
    """``exact``: no TF32 in torch's matmuls and cuDNN convolutions (float32 like gradjax's default
    ``precision="highest"``); ``fast``: TF32 allowed."""
    fast = precision == "fast"
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = fast
    if device.type == "cpu":  # the cores benchmarks._common.pin_threads pinned XLA to (--threads N)
        pin_torch_threads(torch)


def timed_peer(fn, device: "torch.device"):
    """``fn`` followed by ``torch.cuda.synchronize()`` on a GPU (inside the timed call), its result on the host."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def jax_peak_bytes() -> float:
    """Peak bytes in use on JAX's first device (``memory_stats()``; NaN where the backend reports none)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
        return float(stats.get("peak_bytes_in_use", float("nan")))
    except Exception:  # noqa: BLE001  (CPU backends report nothing)
        return float("nan")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="imagenet: VGG-16-BN, batch 8 of 224x224x3, 1000 classes; smoke: a tiny CPU check")
    p.add_argument("--smoke", action="store_true", help="same as --preset smoke")
    p.add_argument("--model", default="vgg9", choices=sorted(VGG_CONFIGS) + ["resnet18"])
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", "--size", dest="image_size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--smoothgrad-samples", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch's device (JAX: its default backend)")
    p.add_argument("--precision", default="exact", choices=["exact", "fast"],
                   help="exact: float32 products on both sides (no TF32); fast: TF32 allowed on both")
    p.add_argument("--xla", default="default", help="XLA:CPU flag preset (benchmarks/_common.py)")
    p.add_argument("--threads", default=None, help="cores for XLA and torch (default: all; benchmarks/_common.py)")
    p.add_argument("--conv-impl", default="lax", choices=["lax", "im2col", "im2col_small", "im2col_gemm"],
                   help="gradjax's convolutions (create_model(conv_impl=...), gradjax.models.cpu_ops; lax = default)")
    p.add_argument("--pool-impl", default="lax", choices=["lax", "mask"],
                   help="gradjax's max-pools (create_model(pool_impl=...); lax = default)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    if CAPTUM_ERROR is not None:
        raise SystemExit(f"this benchmark needs Captum ({CAPTUM_ERROR}); pip install captum")
    if args.smoke:
        args.preset = "smoke"
    if args.preset:  # a preset overrides the defaults; explicit flags given after it are not distinguished
        for k, v in PRESETS[args.preset].items():
            setattr(args, k, v)
    device = torch_device(args.device)
    set_torch_precision(device, args.precision)

    impls = {} if args.model == "resnet18" else {"conv_impl": args.conv_impl, "pool_impl": args.pool_impl}
    model = create_model(args.model, args.classes, width=args.width,
                         precision="highest" if args.precision == "exact" else "default", **impls)
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch_size, args.image_size, args.image_size, args.channels))
    variables = model.init(jax.random.PRNGKey(1), x[:1], train=False)
    variables = nontrivial_batch_stats(model, variables, x)
    handle = saliency.ModelHandle(model.apply, variables)
    if args.model == "resnet18":
        tmodel = torch_resnet18(args.width, args.channels, args.classes, variables).to(device)
    else:
        tmodel = torch_vgg(args.model, args.width, args.channels, args.classes, variables).to(device)
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).to(device)

    logits = np.asarray(handle.logits(x))
    with torch.no_grad():
        tlogits = tmodel(xt).cpu().numpy()
    if not (np.all(np.isfinite(logits)) and np.ptp(logits) > 0):
        raise SystemExit(f"degenerate network for the comparison (logits {logits[:2]})")
    logit_diff = float(np.max(np.abs(logits - tlogits)) / np.max(np.abs(logits)))
    target = jnp.argmax(logits, -1)
    tt = torch.from_numpy(np.array(target)).long().to(device)
    key = jax.random.PRNGKey(3)
    if args.model == "resnet18":  # Grad-CAM at the last residual block's output
        last_relu, cam_layer = [m for m in tmodel if isinstance(m, _TorchBasicBlock)][-1], "stage3_block1"
    else:
        last_relu = [m for m in tmodel if isinstance(m, torch.nn.ReLU)][-1]
        cam_layer = f"block{sum(1 for layer in VGG_CONFIGS[args.model] if layer != 'M') - 1}"

    nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1) if np.ndim(a) == 4 else np.asarray(a)

    def gradjax_fn(method, **options):  # gradjax methods never jit themselves: compile each once, explicitly
        compiled = saliency.jit_method(method, **options)
        return lambda: compiled(handle, x, target, key=key)

    cases = {
        "gradient": (gradjax_fn("gradient", reduce=None),
                     lambda: Saliency(tmodel).attribute(xt, target=tt, abs=False)),
        "integrated_gradients (32 steps)": (
            gradjax_fn("integrated_gradients", steps=32, reduce=None),
            lambda: IntegratedGradients(tmodel).attribute(xt, target=tt, n_steps=32, method="riemann_middle",
                                                          internal_batch_size=8 * args.batch_size)),
        "integrated_gradients (Captum default: 50 Gauss-Legendre steps)": (
            gradjax_fn("integrated_gradients", steps=50, rule="gauss_legendre", reduce=None),
            lambda: IntegratedGradients(tmodel).attribute(
                xt, target=tt, n_steps=50, method="gausslegendre",  # GPU: 50 x batch 8 of 224^2 at once ~ 100 GB
                internal_batch_size=8 * args.batch_size if device.type == "cuda" else None)),
        f"smoothgrad_sq ({args.smoothgrad_samples} samples)": (
            gradjax_fn("smoothgrad_sq", samples=args.smoothgrad_samples, reduce=None),
            lambda: NoiseTunnel(Saliency(tmodel)).attribute(xt, target=tt, nt_type="smoothgrad_sq",
                                                           nt_samples=args.smoothgrad_samples,
                                                           nt_samples_batch_size=8, stdevs=0.15, abs=False)),
        "guided_backprop": (gradjax_fn("guided_backprop", reduce=None),
                            lambda: GuidedBackprop(tmodel).attribute(xt, target=tt)),
        "gradcam (last block)": (
            gradjax_fn("gradcam", layer=cam_layer, align_corners=False),
            lambda: LayerAttribution.interpolate(
                LayerGradCam(tmodel, last_relu).attribute(xt, target=tt, relu_attributions=True),
                (args.image_size, args.image_size), "bilinear")[:, 0]),
        "fullgrad": (gradjax_fn("fullgrad"), lambda: torch_fullgrad(tmodel, xt, tt)),
    }
    compare = {"gradient", "integrated_gradients (32 steps)", "guided_backprop", "gradcam (last block)", "fullgrad",
               "integrated_gradients (Captum default: 50 Gauss-Legendre steps)"}

    # all rows round-robin in one loop (a load change on the shared machine hits every row alike)
    fns = {}
    for name, (ours, peer) in cases.items():
        fns[name + " / gradjax"] = ours
        fns[name + " / peer"] = timed_peer(peer, device)
    sync = {k: (lambda a: a) for k in fns if k.endswith(" / peer")}
    med, runs, loads = interleaved(fns, args.repeats, sync)
    peak_torch = {}
    if device.type == "cuda":  # one more call per row, each with its own peak
        for name, (_, peer) in cases.items():
            torch.cuda.reset_peak_memory_stats(device)
            timed_peer(peer, device)()
            peak_torch[name] = float(torch.cuda.max_memory_allocated(device))
    peak_jax = jax_peak_bytes()
    rows, deltas = {}, {}
    for name, (ours, peer) in cases.items():
        t_ours, t_peer = med[name + " / gradjax"], med[name + " / peer"]
        diff = None
        if name in compare:
            a, b = np.asarray(ours()), nhwc(peer().detach().cpu().numpy())
            diff = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
        if name.startswith("integrated_gradients"):  # completeness delta of both maps, worst image
            fx = logits[np.arange(len(logits)), np.asarray(target)]
            f0 = np.asarray(handle.logits(jnp.zeros_like(x)))[np.arange(len(logits)), np.asarray(target)]
            rel = lambda m: float(np.max(np.abs(m.reshape(len(fx), -1).sum(1) - (fx - f0)) / np.abs(fx - f0)))  # noqa: E731
            deltas[name] = (rel(np.asarray(ours())), rel(nhwc(peer().detach().cpu().numpy())))
        rows[name] = {"gradjax_s": t_ours, "peer_s": t_peer, "ratio": t_peer / t_ours, "rel_max_diff": diff,
                      "gradjax_images_per_s": args.batch_size / t_ours, "peer_images_per_s": args.batch_size / t_peer,
                      "peer_peak_bytes": peak_torch.get(name, float("nan")),
                      "runs_gradjax": runs[name + " / gradjax"], "runs_peer": runs[name + " / peer"]}

    if device.type == "cuda":
        where = (f"JAX on {jax.devices()[0].device_kind}, torch on {torch.cuda.get_device_name(device)}, precision "
                 f"{args.precision}; JAX peak memory {peak_jax / 2**20:.0f} MiB over the run")
    else:
        where = f"CPU ({os.cpu_count()} cores)"
    lines = [f"{args.model} width {args.width}, batch {args.batch_size}x{args.image_size}x{args.image_size}x"
             f"{args.channels}, {args.classes} classes, gradjax conv/pool `{args.conv_impl}/{args.pool_impl}`, "
             f"{where}, medians of {args.repeats} interleaved rounds, "
             f"{load_note(loads)}; XLA preset `{XLA_PRESET}`; jax {jax.__version__}, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads); logits agree to {logit_diff:.1e} (relative).", "",
             "| method | gradjax ms | PyTorch/Captum ms | peer / gradjax (goal ≥ 1.0) | gradjax img/s | peer img/s "
             "| peer peak MiB | max abs diff / max abs |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        d = "—" if r["rel_max_diff"] is None else f"{r['rel_max_diff']:.1e}"
        mem = "—" if np.isnan(r["peer_peak_bytes"]) else f"{r['peer_peak_bytes'] / 2**20:.0f}"
        lines.append(f"| {name} | {1e3 * r['gradjax_s']:.1f} | {1e3 * r['peer_s']:.1f} | {r['ratio']:.2f} | "
                     f"{r['gradjax_images_per_s']:.0f} | {r['peer_images_per_s']:.0f} | {mem} | {d} |")
    lines += [f"- {name}: worst completeness delta gradjax {a:.2%}, Captum {b:.2%}" for name, (a, b) in deltas.items()]
    table = "\n".join(lines)
    print(table)
    import captum  # noqa: PLC0415
    result = {"args": vars(args), "machine": machine({"torch": torch.__version__, "captum": captum.__version__,
                                                      "xla_preset": XLA_PRESET}),
              "loads": loads, "logit_rel_diff": logit_diff, "jax_peak_bytes": peak_jax, "rows": rows,
              "table": table}
    suffix = "" if XLA_PRESET == "default" else "-" + XLA_PRESET
    suffix += "" if args.preset is None else "-" + args.preset
    suffix += "" if args.precision == "exact" else "-" + args.precision
    suffix += "" if (args.conv_impl, args.pool_impl) == ("lax", "lax") else f"-{args.conv_impl}-{args.pool_impl}"
    return write_result(os.path.join(args.out, f"peers_captum-{args.device}{suffix}.json"), result, loads)


if __name__ == "__main__":
    main()
