"""gradjax vs PyTorch train steps, side by side on the same VGG and batch: ms/step, images/s, ratio, memory.

The gradjax steps are the library's: :func:`gradjax.losses.make_loss_fn` with the terms of
:mod:`gradjax.losses.terms`, compiled by :func:`gradjax.train.jit_train_step` (plain SGD, ``donate=False``). The
PyTorch steps are written here in the usual PyTorch way — one train-mode forward, the input-gradient by
``torch.autograd.grad(..., create_graph=True)`` (double backprop), ``loss.backward()``, ``optimizer.step()`` — on
the PyTorch twin of the same network carrying the same weights (:func:`benchmarks.peers_captum.torch_vgg`); the
teacher (Jacobian and full-gradient matching) is a second copy of the initial weights, frozen, in eval mode.

Objectives (weights as in the thesis / the library's defaults):

* ``CE`` — cross-entropy;
* ``CE + grad-norm`` — eq. 2.3, ``0.1 * ||grad_x log softmax(f(x))_y||^2``;
* ``CE + J`` — Jacobian matching of the correct-class logit, ``||grad_x S_y - grad_x T_y||^2`` (Prop. 1);
* ``CE + full-gradient matching`` — eq. 4.3, ``10 * sum_l ||psi(f^b_l) - psi(g^b_l)||^2`` over the earliest
  convolution (merged with its BatchNorm) of each of 3 resolutions, ``psi`` = channel sum, per-example unit L2 norm;
* ``CE + score matching`` — eq. 5.4 with §5.3.3's stability term, ``1e-3 * (h + ½||grad f||^2 + 1e-4 h^2)``, ``h``
  the one-sided Taylor trace with σ = 0.01 and one Gaussian probe (the authors' estimator).

Not bit-for-bit the same function: gradjax's extra passes use its default BatchNorm policy ``--bn-policy frozen``
(per-example gradients: the clean pass's batch moments held constant, one more forward), while the PyTorch steps
differentiate the train-mode pass itself (cross-example BatchNorm gradients, no extra forward — the cheaper and
usual choice, so the comparison does not favour gradjax). ``--bn-policy train`` makes gradjax normalize its extra
passes with their own batch moments, as the PyTorch steps do. The first step's loss of both sides is recorded
(``loss_gradjax``, ``loss_torch``): CE and full-gradient matching agree to float32 round-off under either policy,
grad-norm and Jacobian matching under ``--bn-policy train`` (checked on the CPU smoke preset, 2026-12-04); score
matching never exactly (different probe noise).

Timing: every step of both sides round-robin (:func:`benchmarks._common.interleaved`, rotated), ``--steps`` steps
per timed call, medians of ``--repeats`` rounds after a warm-up round (compilation excluded); on a GPU the PyTorch
call ends with ``torch.cuda.synchronize()``. ``ratio = PyTorch time / gradjax time`` (> 1: gradjax faster). Memory:
PyTorch's ``torch.cuda.max_memory_allocated`` per row (reset before one extra call), gradjax's compiled temporary
bytes (``memory_analysis``) per row and the device's ``peak_bytes_in_use`` over the run where reported.
``--precision exact`` (default): no TF32 on either side.

    pip install torch==2.13.0 captum                      # (or: pip install -e ".[bench]")
    python -m benchmarks.peers_train_steps --smoke         # tiny CPU check of every row (< 1 minute)
    # on a GPU (JAX must not preallocate the memory torch shares; benchmarks/gpu_check.sh sets this):
    export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
    python -m benchmarks.peers_train_steps --device cuda   # VGG-16-BN, batch 64 of 32x32x3
    python -m benchmarks.peers_train_steps --device cuda --preset imagenet   # batch 8 of 224x224
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._common import interleaved, load_note, load_record, machine
from benchmarks.peers_captum import jax_peak_bytes, set_torch_precision, timed_peer, torch_device, torch_vgg
from gradjax import train as gtrain
from gradjax.losses import terms as LT
from gradjax.models import create_model
from gradjax.models.vgg import VGG_CONFIGS

import torch  # noqa: E402  (peers_captum has already checked that it is installed)
import torch.nn.functional as F  # noqa: E402

PRESETS = {
    "cifar": {"model": "vgg16", "width": 1.0, "batch": 64, "size": 32, "classes": 10, "steps": 5, "repeats": 5},
    "imagenet": {"model": "vgg16", "width": 1.0, "batch": 8, "size": 224, "classes": 1000, "steps": 2, "repeats": 5},
    "smoke": {"model": "vgg4", "width": 0.125, "batch": 4, "size": 16, "classes": 10, "steps": 1, "repeats": 1},
}
GRAD_NORM, FG_WEIGHT, SM_WEIGHT, SM_MU, SM_SIGMA = 0.1, 10.0, 1e-3, 1e-4, 0.01


def gradjax_terms(name: str) -> list:
    """The library's terms of objective ``name``."""
    ce = LT.cross_entropy_term()
    return {"CE": [ce],
            "CE + grad-norm": [ce, LT.gradient_norm_term(GRAD_NORM)],
            "CE + J": [ce, LT.jacobian_matching_term()],
            "CE + full-gradient matching": [ce, LT.full_gradient_matching_term(FG_WEIGHT)],
            "CE + score matching": [ce, LT.score_matching_term(SM_WEIGHT, mu=SM_MU, sigma=SM_SIGMA)]}[name]


OBJECTIVES = ("CE", "CE + grad-norm", "CE + J", "CE + full-gradient matching", "CE + score matching")


# ------------------------------------------------------------------------------------------------ PyTorch side
def fg_layers(model: "torch.nn.Module", num_resolutions: int = 3) -> list:
    """The BatchNorm modules of the earliest convolution of each of the first ``num_resolutions`` resolutions
    (before the first max-pool, after it, ...) — gradjax's ``default_pairs`` for a VGG."""
    out, new_resolution = [], True
    for m in model:
        if isinstance(m, torch.nn.MaxPool2d):
            new_resolution = True
        elif isinstance(m, torch.nn.BatchNorm2d) and new_resolution:
            out.append(m)
            new_resolution = False
    return out[:num_resolutions]


def bias_gradient_maps(model, layers, x, y, create_graph: bool):
    """``f^b_l = grad_{z_l} f_y * b_l`` at the BatchNorm outputs ``z_l`` of ``layers`` (conv and BN merged: the
    folded bias ``beta + gamma (b_conv - mean) / sqrt(var + eps)`` with the moments the pass used), channel-summed
    to ``[B, h, w]``; and the logits."""
    feats, biases = [], []

    def hook(module, inputs, output):
        conv_bias = prev[module].bias
        if module.training:
            mean = inputs[0].mean((0, 2, 3)).detach()
            var = inputs[0].var((0, 2, 3), unbiased=False).detach()
        else:
            mean, var = module.running_mean, module.running_var
        folded = module.bias + module.weight * (conv_bias - mean) / torch.sqrt(var + module.eps)
        feats.append(output)
        biases.append(folded)

    mods = list(model)
    prev = {m: mods[i - 1] for i, m in enumerate(mods) if m in layers}
    handles = [m.register_forward_hook(hook) for m in layers]
    if not any(q.requires_grad for q in model.parameters()):  # a frozen teacher: the graph hangs off the input
        x = x.detach().requires_grad_(True)
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(out.gather(1, y[:, None]).sum(), feats, create_graph=create_graph)
    return [(g * b[None, :, None, None]).sum(1) for g, b in zip(grads, biases)], out


def unit(m):
    """Per-example unit L2 norm (a zero map stays zero)."""
    n = m.flatten(1).norm(dim=1).clamp_min(1e-30)[:, None, None]
    return m / n


def torch_loss(name: str, model, teacher, fg_s, fg_t, x, y):
    """The loss of objective ``name`` on one batch, PyTorch style (train-mode student, double backprop)."""
    if name == "CE":
        return F.cross_entropy(model(x), y)
    if name == "CE + full-gradient matching":
        s_maps, out = bias_gradient_maps(model, fg_s, x, y, create_graph=True)
        t_maps, _ = bias_gradient_maps(teacher, fg_t, x, y, create_graph=False)
        pen = sum(((unit(a) - unit(b.detach())) ** 2).sum((1, 2)) for a, b in zip(s_maps, t_maps))
        return F.cross_entropy(out, y) + FG_WEIGHT * pen.mean()
    x = x.clone().requires_grad_(True)
    out = model(x)
    ce = F.cross_entropy(out, y)
    if name == "CE + grad-norm":
        logp = torch.log_softmax(out, 1).gather(1, y[:, None]).sum()
        g = torch.autograd.grad(logp, x, create_graph=True)[0]
        return ce + GRAD_NORM * g.pow(2).sum((1, 2, 3)).mean()
    f = out.gather(1, y[:, None])[:, 0]
    g = torch.autograd.grad(f.sum(), x, create_graph=True)[0]
    if name == "CE + J":
        xt = x.detach().requires_grad_(True)
        gt = torch.autograd.grad(teacher(xt).gather(1, y[:, None]).sum(), xt)[0]
        return ce + (g - gt).pow(2).sum((1, 2, 3)).mean()
    if name == "CE + score matching":  # one-sided Taylor trace, one Gaussian probe (a train-mode noisy pass)
        noisy = model(x.detach() + SM_SIGMA * torch.randn_like(x)).gather(1, y[:, None])[:, 0]
        h = 2.0 / SM_SIGMA ** 2 * (noisy - f)
        reg = h + 0.5 * g.pow(2).sum((1, 2, 3)) + SM_MU * h ** 2
        return ce + SM_WEIGHT * reg.mean()
    raise ValueError(f"unknown objective {name!r}")


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cifar", choices=sorted(PRESETS),
                   help="cifar (default): VGG-16-BN, batch 64 of 32x32x3; imagenet: batch 8 of 224x224x3, 1000 "
                        "classes; smoke: a tiny CPU check")
    p.add_argument("--smoke", action="store_true", help="same as --preset smoke")
    p.add_argument("--model", default=None, choices=sorted(VGG_CONFIGS))
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--classes", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="train steps per timed call")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {list(OBJECTIVES)}")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch's device (JAX: its default backend)")
    p.add_argument("--precision", default="exact", choices=["exact", "fast"],
                   help="exact: float32 products on both sides (no TF32); fast: TF32 allowed on both")
    p.add_argument("--bn-policy", default="frozen", choices=["frozen", "train"],
                   help="gradjax's BatchNorm policy of the extra passes (make_loss_fn(policy=...))")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.preset = "smoke"
    for k, v in PRESETS[args.preset].items():  # explicit flags override the preset
        if getattr(args, k) is None:
            setattr(args, k, v)
    names = list(OBJECTIVES) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise SystemExit(f"unknown objectives {unknown}; choose from {list(OBJECTIVES)}")
    device = torch_device(args.device)
    set_torch_precision(device, args.precision)
    torch.manual_seed(0)

    rng = np.random.default_rng(0)
    image = rng.normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
    label = (np.arange(args.batch) % args.classes).astype(np.int32)
    batch = {"image": jnp.asarray(image), "label": jnp.asarray(label)}
    model = create_model(args.model, args.classes, width=args.width,
                         precision="highest" if args.precision == "exact" else "default")
    state0 = gtrain.create_train_state(model, optax.sgd(args.lr), batch["image"][:2])
    variables = {"params": state0.params, **state0.model_state}
    frozen = {"teacher": variables}
    xt = torch.from_numpy(image.transpose(0, 3, 1, 2).copy()).to(device)
    yt = torch.from_numpy(label.astype(np.int64)).to(device)
    teacher = torch_vgg(args.model, args.width, 3, args.classes, variables).to(device)
    for q in teacher.parameters():
        q.requires_grad_(False)

    fns, info = {}, {}
    for name in names:
        step = gtrain.jit_train_step(LT.make_loss_fn(model.apply, gradjax_terms(name), teacher_apply_fn=model.apply,
                                                     policy=args.bn_policy),
                                     num_classes=args.classes, donate=False, validate=False)
        compiled = step.lower(state0, batch, frozen).compile()
        try:
            temp = float(compiled.memory_analysis().temp_size_in_bytes)
        except Exception:  # noqa: BLE001  (not every backend reports it)
            temp = float("nan")
        first_loss = float(compiled(state0, batch, frozen)[1]["loss"])

        def ours(compiled=compiled):
            s = state0
            for _ in range(args.steps):
                s, _ = compiled(s, batch, frozen)
            return s.params

        tmodel = torch_vgg(args.model, args.width, 3, args.classes, variables).to(device).train()
        opt = torch.optim.SGD(tmodel.parameters(), lr=args.lr)
        fg_s, fg_t = fg_layers(tmodel), fg_layers(teacher)
        snapshot = {k: v.clone() for k, v in tmodel.state_dict().items()}
        torch_first = float(torch_loss(name, tmodel, teacher, fg_s, fg_t, xt, yt).detach().cpu())
        tmodel.load_state_dict(snapshot)  # the forward above updated the running statistics

        def peer(tmodel=tmodel, opt=opt, fg_s=fg_s, name=name):
            for _ in range(args.steps):
                opt.zero_grad(set_to_none=True)
                loss = torch_loss(name, tmodel, teacher, fg_s, fg_t, xt, yt)
                loss.backward()
                opt.step()
            return loss

        fns[name + " / gradjax"] = ours
        fns[name + " / PyTorch"] = timed_peer(peer, device)
        info[name] = {"loss_gradjax": first_loss, "loss_torch": torch_first, "gradjax_temp_bytes": temp}
        print(f"prepared {name}: first loss gradjax {first_loss:.6g}, PyTorch {torch_first:.6g}", flush=True)

    sync = {k: (lambda a: a) for k in fns if k.endswith(" / PyTorch")}
    med, runs, loads = interleaved(fns, args.repeats, sync, rotate=True)
    rows = {}
    for name in names:
        t_ours = med[name + " / gradjax"] / args.steps
        t_peer = med[name + " / PyTorch"] / args.steps
        peak = float("nan")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            fns[name + " / PyTorch"]()
            peak = float(torch.cuda.max_memory_allocated(device))
        rows[name] = {"gradjax_ms": 1e3 * t_ours, "torch_ms": 1e3 * t_peer, "ratio": t_peer / t_ours,
                      "gradjax_images_per_s": args.batch / t_ours, "torch_images_per_s": args.batch / t_peer,
                      "torch_peak_bytes": peak, **info[name],
                      "runs_gradjax_ms": [1e3 * t / args.steps for t in runs[name + " / gradjax"]],
                      "runs_torch_ms": [1e3 * t / args.steps for t in runs[name + " / PyTorch"]]}
    peak_jax = jax_peak_bytes()

    where = (f"JAX on {jax.devices()[0].device_kind}, torch on "
             f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'}")
    mib = lambda b: "—" if np.isnan(b) else f"{b / 2**20:.0f}"  # noqa: E731
    lines = [f"{args.model} width {args.width}, batch {args.batch} of {args.size}x{args.size}x3, {args.classes} "
             f"classes, SGD; {where}; precision {args.precision}; gradjax BatchNorm policy {args.bn_policy}; medians "
             f"of {args.repeats} interleaved rounds of {args.steps} steps, {load_note(loads)}; jax {jax.__version__}, "
             f"torch {torch.__version__}; JAX peak memory {mib(peak_jax)} MiB over the run.", "",
             "| objective | gradjax ms/step | PyTorch ms/step | PyTorch / gradjax (goal ≥ 2 for double backprop) | "
             "gradjax img/s | PyTorch img/s | gradjax temp MiB | PyTorch peak MiB | first loss gradjax / PyTorch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['gradjax_ms']:.2f} | {r['torch_ms']:.2f} | {r['ratio']:.2f} | "
                     f"{r['gradjax_images_per_s']:.0f} | {r['torch_images_per_s']:.0f} | "
                     f"{mib(r['gradjax_temp_bytes'])} | {mib(r['torch_peak_bytes'])} | "
                     f"{r['loss_gradjax']:.5g} / {r['loss_torch']:.5g} |")
    table = "\n".join(lines)
    print(table)
    result = {"args": vars(args), "machine": machine({"torch": torch.__version__}), "loads": loads,
              "jax_peak_bytes": peak_jax, "rows": rows, "table": table}
    os.makedirs(args.out, exist_ok=True)
    suffix = f"-{args.preset}" + ("" if args.precision == "exact" else "-" + args.precision)
    suffix += "" if args.bn_policy == "frozen" else "-bn" + args.bn_policy
    with open(os.path.join(args.out, f"peers_train_steps-{args.device}{suffix}.json"), "w") as f:
        json.dump({**result, "load": load_record(loads)}, f, indent=2, default=float)
    return result


if __name__ == "__main__":
    main()
