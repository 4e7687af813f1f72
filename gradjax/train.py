"""Training engine: one train-step builder for every objective, on one device, with ``pmap`` or with sharding.

The contract is a per-device loss function

    loss_fn(params, batch_stats, batch, rng) -> (loss, aux),  aux = {"batch_stats": new_stats, "metrics": {...}}

(``aux["metrics"]`` optional). Cross-entropy (:func:`classification_loss`) is one such function; Jacobian
matching, gradient-norm penalties and score-matching are others and go through the very same step, so there is
one training loop (:func:`fit`) for all of them.

:func:`make_train_step` turns ``loss_fn`` into ``step(state, batch) -> (state, metrics)``, which is wrapped three
ways from the same code:

* :func:`jit_train_step` — one device;
* :func:`pmap_train_step` — ``jax.pmap`` data parallelism (the design card). Gradients, loss, metrics and batch
  statistics are averaged with ``lax.pmean`` over ``axis_name``; BatchNorm must be built with the same
  ``axis_name`` so that it normalizes with global batch statistics;
* :func:`sharded_train_step` — ``jax.jit`` with a ``NamedSharding`` that splits the batch over a device mesh
  (JAX's recommended form; ``pmap`` is in maintenance mode). The loss is written for the global batch and XLA
  inserts the collectives, so no ``axis_name`` is needed.

All three give the same parameters and batch statistics as the single-device step on the same global batch
(tested on 8 fake CPU devices). All run on one device (Colab's single-chip TPU runtime).

**Divergence guard.** The step computes ``finite = isfinite(loss) & all(isfinite(grads))``. A non-finite step
is not applied, and sets the sticky ``state.diverged`` flag, after which the state is frozen — so the state is
always the last good one without a device-to-host sync every step. :func:`fit` checks the flag at every log
interval, saves the frozen (last good) state, and raises :class:`TrainingDivergedError` with the step number.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gradjax._validation import check_finite, check_floating, check_images, check_labels, check_rank

PyTree = Any
Batch = Mapping[str, Any]
LossFn = Callable[[PyTree, PyTree, Batch, jax.Array], tuple[jax.Array, dict]]


class TrainingDivergedError(RuntimeError):
    """Raised by :func:`fit` when a step produced a non-finite loss or gradient."""


class TrainState(struct.PyTreeNode):
    """Everything that changes during training (a pytree; ``apply_fn`` and ``tx`` are static).

    step: number of applied updates; params / batch_stats: model variables; opt_state: optax state;
    rng: base PRNG key (step ``t`` uses ``fold_in(rng, t)``, so randomness does not depend on how the run was
    split by restarts); diverged: sticky flag set by the divergence guard.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    rng: jax.Array
    diverged: jax.Array
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(cls, *, apply_fn: Callable, params: PyTree, tx: optax.GradientTransformation,
               batch_stats: PyTree = None, rng: jax.Array) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats if batch_stats is not None else {},
                   opt_state=tx.init(params), rng=rng, diverged=jnp.zeros((), bool), apply_fn=apply_fn, tx=tx)

    @property
    def variables(self) -> dict:
        """``{"params", "batch_stats"}`` for ``apply_fn`` in eval mode."""
        v = {"params": self.params}
        if self.batch_stats:
            v["batch_stats"] = self.batch_stats
        return v

    def logits_fn(self) -> Callable[[jax.Array], jax.Array]:
        """The eval-mode model as a pure function ``x -> logits`` (the library's model protocol)."""
        variables = self.variables
        return lambda x: self.apply_fn(variables, x, train=False)


@functools.partial(jax.jit, static_argnums=0)
def _jit_init(model, key: jax.Array, sample_input: jax.Array) -> PyTree:
    """``model.init`` as one compiled program, cached per (hashable, equal-by-value) Linen module and input shape,
    so re-initializing the same architecture (retraining, seeds) does not recompile."""
    return model.init(key, sample_input, train=False)


def create_train_state(model, tx: optax.GradientTransformation, sample_input: jax.Array, *, seed: int = 0) -> TrainState:
    """Initialize ``model`` (a Flax Linen module) on ``sample_input`` [B, ...] and wrap it in a TrainState."""
    init_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
    variables = _jit_init(model, init_key, jnp.asarray(sample_input))
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}), rng=state_key)


# ----------------------------------------------------------------------------------------------------- losses
def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy ``-1/B sum_i log softmax(logits_i)[y_i]`` (with optional label smoothing)."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
    if label_smoothing:
        targets = targets * (1 - label_smoothing) + label_smoothing / num_classes
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def apply_train(apply_fn: Callable, params: PyTree, batch_stats: PyTree, x: jax.Array) -> tuple[jax.Array, PyTree]:
    """Train-mode forward pass returning ``(logits, new_batch_stats)`` (models without BatchNorm return ``{}``)."""
    if batch_stats:
        logits, mutated = apply_fn({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
        return logits, mutated["batch_stats"]
    return apply_fn({"params": params}, x, train=True), batch_stats


def classification_loss(apply_fn: Callable, *, weight_decay: float = 0.0, label_smoothing: float = 0.0) -> LossFn:
    """Cross-entropy objective: ``CE(f(x), y) + weight_decay/2 * ||params||^2``; metrics: loss, accuracy."""

    def loss_fn(params, batch_stats, batch, rng):
        del rng
        logits, new_stats = apply_train(apply_fn, params, batch_stats, batch["image"])
        ce = cross_entropy(logits, batch["label"], label_smoothing=label_smoothing)
        loss = ce
        if weight_decay:
            loss = loss + 0.5 * weight_decay * sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"batch_stats": new_stats, "metrics": {"cross_entropy": ce, "accuracy": acc}}

    return loss_fn


# ------------------------------------------------------------------------------------------------ train step
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(loss_fn: LossFn, *, axis_name: Optional[str] = None) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Build the (un-jitted) step ``(state, batch) -> (state, metrics)`` from a per-device ``loss_fn``.

    One SGD-style update ``params <- params + tx.update(grad loss)``. With ``axis_name`` (inside ``pmap``) the
    gradient, loss, metrics and batch statistics are averaged over devices with ``lax.pmean``; the RNG is
    folded with the device index so that noise differs between devices. Non-finite steps are rejected and set
    ``state.diverged`` (see module docstring).
    """

    def step(state: TrainState, batch: Batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.batch_stats, batch, rng)
        new_stats = aux.get("batch_stats", state.batch_stats)
        metrics = dict(aux.get("metrics", {}))
        metrics["loss"] = loss
        if axis_name is not None:
            grads, new_stats, metrics = lax.pmean((grads, new_stats, metrics), axis_name)
        updates, new_opt = state.tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        ok = _all_finite((metrics["loss"], grads)) & jnp.logical_not(state.diverged)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = state.replace(step=state.step + ok.astype(state.step.dtype),
                                  params=keep(new_params, state.params),
                                  batch_stats=keep(new_stats, state.batch_stats),
                                  opt_state=keep(new_opt, state.opt_state),
                                  diverged=state.diverged | ~_all_finite((metrics["loss"], grads)))
        metrics["finite"] = ok
        return new_state, metrics

    return step


def validate_batch(batch: Batch, num_classes: Optional[int] = None, *, check_nan: bool = True,
                   leading_axes: int = 1) -> None:
    """Check a batch before it enters a compiled step: ``image`` float [*lead, H, W, C] (``leading_axes`` = 2
    for a ``pmap`` batch [devices, B, ...]), ``label`` int [*lead] within ``[0, num_classes)``, the same batch
    size, and (``check_nan``) no NaN/inf images. Raises ``ValueError`` saying what is wrong."""
    if "image" not in batch:
        raise ValueError(f"a batch must be a dict with an 'image' entry; got keys {sorted(batch)}.")
    lead = lambda x: np.reshape(x, (-1,) + tuple(np.shape(x)[leading_axes:]))
    images = lead(batch["image"])
    check_rank(images, 4, "batch['image']", "NHWC images [B, H, W, C]")
    check_floating(images, "batch['image']")
    if check_nan:
        check_finite(images, "batch['image']")
    if "label" in batch:
        check_labels(lead(batch["label"]), num_classes, np.shape(images)[0], "batch['label']")


def _validated(step, num_classes: Optional[int], leading_axes: int = 1):
    """Validate every batch on the host (shapes, dtypes, label range); the NaN scan only on the first call, so
    that a NaN arising later is caught by the divergence guard instead of costing a scan per step."""
    calls = [0]

    def checked(state, batch):
        validate_batch(batch, num_classes, check_nan=calls[0] == 0, leading_axes=leading_axes)
        calls[0] += 1
        return step(state, batch)

    checked.compiled = step  # the raw jitted / pmapped function, e.g. for .lower()
    return checked


def jit_train_step(loss_fn: LossFn, *, num_classes: Optional[int] = None, donate: bool = True, validate: bool = True):
    """Single-device jit-compiled step. With ``validate`` every batch is checked on the host first
    (:func:`validate_batch`; labels against ``num_classes`` when given)."""
    step = jax.jit(make_train_step(loss_fn), donate_argnums=(0,) if donate else ())
    return _validated(step, num_classes) if validate else step


def pmap_train_step(loss_fn: LossFn, *, axis_name: str = "batch", devices=None, num_classes: Optional[int] = None,
                    donate: bool = True, validate: bool = True):
    """``jax.pmap`` data-parallel step. Inputs: state replicated (:func:`replicate`), batch with a leading device
    axis (:func:`shard_batch`). Build the model's BatchNorm with the same ``axis_name``."""
    step = jax.pmap(make_train_step(loss_fn, axis_name=axis_name), axis_name=axis_name, devices=devices,
                    donate_argnums=(0,) if donate else ())
    return _validated(step, num_classes, leading_axes=2) if validate else step


def data_mesh(devices=None, axis: str = "data") -> Mesh:
    """A 1-D device mesh over all (or the given) devices for data parallelism."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), (axis,))


def sharded_train_step(loss_fn: LossFn, mesh: Mesh, *, axis: str = "data", num_classes: Optional[int] = None,
                       donate: bool = True, validate: bool = True):
    """``jax.jit`` step with the batch split over ``mesh`` along its leading axis and the state replicated.

    The same global-batch ``loss_fn`` as on one device; XLA partitions it and inserts the all-reduces (so the
    gradient is already the global one — nothing to average by hand). Put inputs on devices with
    :func:`put_replicated` / :func:`put_sharded`.
    """
    replicated = NamedSharding(mesh, P())
    split = NamedSharding(mesh, P(axis))
    step = make_train_step(loss_fn)
    step = jax.jit(step, in_shardings=(replicated, split), out_shardings=(replicated, replicated),
                   donate_argnums=(0,) if donate else ())
    return _validated(step, num_classes) if validate else step


def replicate(tree: PyTree, devices=None) -> PyTree:
    """Copy a pytree to every local device (leading device axis), for ``pmap``."""
    devices = list(devices or jax.local_devices())
    stack = lambda x: jnp.broadcast_to(jnp.asarray(x), (len(devices),) + jnp.shape(x))
    # (jax.device_put_replicated is deprecated since JAX 0.8: stack, then let an identity pmap place the copies)
    return jax.pmap(lambda t: t, devices=devices)(jax.tree.map(stack, tree))


def unreplicate(tree: PyTree) -> PyTree:
    """First replica of a replicated pytree."""
    return jax.tree.map(lambda x: x[0], tree)


def shard_batch(batch: Batch, num_devices: Optional[int] = None) -> Batch:
    """Reshape ``[B, ...]`` arrays to ``[devices, B/devices, ...]`` for ``pmap``."""
    n = num_devices or jax.local_device_count()
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"global batch size {x.shape[0]} is not divisible by the {n} devices.")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])
    return jax.tree.map(split, dict(batch))


def put_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
    return jax.device_put(tree, NamedSharding(mesh, P()))


def put_sharded(batch: Batch, mesh: Mesh, axis: str = "data") -> Batch:
    n = mesh.shape[axis]
    for v in jax.tree.leaves(batch):
        if v.shape[0] % n:
            raise ValueError(f"global batch size {v.shape[0]} is not divisible by the {n} devices of the mesh.")
    return jax.device_put(dict(batch), NamedSharding(mesh, P(axis)))


# ------------------------------------------------------------------------------------------------- eval step
def make_eval_step(apply_fn: Callable) -> Callable[[TrainState, Batch], dict]:
    """Jitted eval-mode step returning *sums* over the batch (so uneven last batches average correctly):
    ``{"correct", "cross_entropy_sum", "count"}``."""

    @jax.jit
    def eval_step(state: TrainState, batch: Batch) -> dict:
        logits = apply_fn(state.variables, batch["image"], train=False)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return {"correct": jnp.sum(jnp.argmax(logits, -1) == batch["label"]), "cross_entropy_sum": jnp.sum(ce),
                "count": jnp.asarray(batch["label"].shape[0])}

    return eval_step


def evaluate(state: TrainState, batches: Iterable[Batch], eval_step: Optional[Callable] = None) -> dict:
    """Accuracy and mean cross-entropy over ``batches`` (host-side sums of :func:`make_eval_step`)."""
    eval_step = eval_step or make_eval_step(state.apply_fn)
    tot = {"correct": 0.0, "cross_entropy_sum": 0.0, "count": 0}
    for batch in batches:
        check_images(batch["image"], "batch['image']")
        out = jax.device_get(eval_step(state, batch))
        for k in tot:
            tot[k] += float(out[k])
    if tot["count"] == 0:
        raise ValueError("evaluate() got no batches.")
    return {"accuracy": tot["correct"] / tot["count"], "cross_entropy": tot["cross_entropy_sum"] / tot["count"],
            "count": int(tot["count"])}


# ----------------------------------------------------------------------------------------------- checkpoints
_STATE_FIELDS = ("step", "params", "batch_stats", "opt_state", "rng", "diverged")


def state_to_pytree(state: TrainState) -> dict:
    return {k: getattr(state, k) for k in _STATE_FIELDS}


class Checkpointer:
    """Orbax ``CheckpointManager`` for TrainStates (async saves; :meth:`wait` before reading from disk)."""

    def __init__(self, directory: str, *, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, state: TrainState, *, force: bool = True) -> None:
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=self._ocp.args.StandardSave(jax.device_get(state_to_pytree(state))), force=force)

    def restore(self, template: TrainState, step: Optional[int] = None) -> TrainState:
        """Restore into the structure (and dtypes) of ``template``; the latest step by default."""
        self.manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = jax.tree.map(np.asarray, jax.device_get(state_to_pytree(template)))
        restored = self.manager.restore(step, args=self._ocp.args.StandardRestore(target))
        return template.replace(**{k: jax.tree.map(jnp.asarray, restored[k]) for k in _STATE_FIELDS})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ---------------------------------------------------------------------------------------------- the loop
class MetricsLogger:
    """Append JSON lines ``{"step":..., ...}`` to ``path`` (or keep them in memory only if ``path`` is None)."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.records: list[dict] = []
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, record: dict) -> None:
        record = {k: (float(v) if isinstance(v, (np.floating, np.integer, jax.Array, np.ndarray)) else v) for k, v in record.items()}
        self.records.append(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def fit(state: TrainState, train_step: Callable, epoch_batches: Callable[[int, int], Iterator[Batch]], *,
        num_epochs: int, steps_per_epoch: int, checkpoint_dir: Optional[str] = None, checkpoint_every: Optional[int] = None,
        log_path: Optional[str] = None, log_every: int = 20, eval_fn: Optional[Callable[[TrainState], dict]] = None,
        max_steps: Optional[int] = None, progress: bool = True, to_device: Callable[[Batch], Batch] = lambda b: b,
        ) -> tuple[TrainState, list[dict]]:
    """The training loop shared by every objective.

    ``epoch_batches(epoch, start)`` yields the batches of ``epoch`` from batch ``start`` on (a deterministic
    order, e.g. :func:`gradjax.data.batches`); ``train_step`` is any step from this module (for ``pmap`` pass
    ``to_device=shard_batch`` and a replicated state). With ``checkpoint_dir`` the run resumes from the latest
    checkpoint there and saves every ``checkpoint_every`` steps (default: each epoch) and at the end, so an
    interrupted run continues to the same result. ``max_steps`` stops early (used to simulate interruption).
    Metrics (train every ``log_every`` steps, ``eval_fn(state)`` each epoch) go to JSON lines at ``log_path``.
    Raises :class:`TrainingDivergedError` if a step was non-finite, after saving the last good state.
    """
    from tqdm.auto import tqdm

    is_pmapped = jnp.ndim(state.step) == 1
    host = (lambda s: unreplicate(s)) if is_pmapped else (lambda s: s)
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir else None
    if ckpt is not None and ckpt.latest_step() is not None:
        restored = ckpt.restore(host(state))
        # jitted steps with in_shardings re-place a single-device state themselves; pmap needs the device axis.
        state = replicate(restored) if is_pmapped else restored
    logger = MetricsLogger(log_path)
    total = num_epochs * steps_per_epoch if max_steps is None else min(max_steps, num_epochs * steps_per_epoch)
    step0 = int(jax.device_get(host(state).step))
    checkpoint_every = checkpoint_every or steps_per_epoch
    pbar = tqdm(total=total, initial=min(step0, total), disable=not progress, desc="train", dynamic_ncols=True)
    pending: list[dict] = []
    t0 = time.time()

    def check_and_log(step_now: int, epoch: int):
        nonlocal pending
        if not pending:
            return
        metrics = jax.device_get(pending)
        pending = []
        if is_pmapped:
            metrics = [unreplicate(m) for m in metrics]
        bad = [i for i, m in enumerate(metrics) if not bool(m["finite"])]
        if bad:
            good = host(state)
            if ckpt is not None:
                ckpt.save(good)
                ckpt.close()
            pbar.close()
            where = f"; the last good state (step {int(good.step)}) is saved in {ckpt.directory}" if ckpt else ""
            raise TrainingDivergedError(
                f"training diverged: non-finite loss or gradient within the {len(metrics)} steps before step "
                f"{step_now} (loss={float(metrics[bad[0]]['loss'])}); updates stopped at step {int(good.step)}{where}. "
                "Lower the learning rate, check the inputs for NaN, or increase the estimator's noise scale.")
        mean = {k: float(np.mean([float(m[k]) for m in metrics])) for k in metrics[0] if k != "finite"}
        logger.log({"step": step_now, "epoch": epoch, **mean, "elapsed_s": time.time() - t0})
        pbar.set_postfix({k: f"{v:.4g}" for k, v in mean.items() if k in ("loss", "accuracy")})

    step = step0
    try:
        while step < total:
            epoch, start = divmod(step, steps_per_epoch)
            for batch in epoch_batches(epoch, start):
                state, metrics = train_step(state, to_device(batch))
                pending.append(metrics)
                step += 1
                pbar.update(1)
                if step % log_every == 0:
                    check_and_log(step, epoch)
                if ckpt is not None and step % checkpoint_every == 0:
                    check_and_log(step, epoch)
                    ckpt.save(host(state))
                if step % steps_per_epoch == 0 or step >= total:
                    check_and_log(step, epoch)
                    if eval_fn is not None and step % steps_per_epoch == 0:
                        logger.log({"step": step, "epoch": epoch, **{f"eval_{k}": v for k, v in eval_fn(host(state)).items()}})
                if step >= total:
                    break
        check_and_log(step, step // steps_per_epoch)
        if ckpt is not None:
            ckpt.save(host(state))
            ckpt.close()
    finally:
        pbar.close()
    return state, logger.records
