"""Training engine: one train-step builder for every objective, on one device, with ``pmap`` or with sharding.

**The contract** is a per-device loss function

    loss_fn(params, model_state, batch, ctx) -> (loss, aux)

* ``params``: the trainable parameters (differentiated);
* ``model_state``: the model's non-param collections, e.g. ``{"batch_stats": ...}``, or ``{}``;
* ``batch``: a dict of arrays with a leading batch axis (split over devices under ``pmap``/sharding; validated
  on the host against a :data:`BatchSpec` before the compiled step);
* ``ctx``: a :class:`StepContext` ``(rng, step, frozen)``: this step's PRNG key, the number of updates applied so
  far (for schedules), and ``frozen``, a pytree of fixed inputs (a teacher's variables, fixed tensors) passed to
  the compiled step as an *argument* — so it is not baked into the program as constants — replicated on every
  device and never split, reshaped or validated as a batch;
* ``loss``: a float scalar; ``aux = {"model_state": new_model_state, "metrics": {name: scalar}}`` (both optional;
  the model state stays unchanged by default).

Cross-entropy (:func:`classification_loss`) is one such function; Jacobian matching, gradient-norm penalties and
score-matching are others and go through the very same step (their extra, double-backprop passes use the
BatchNorm policies of :mod:`gradjax.model`: :func:`~gradjax.model.apply_train` for the clean pass, then
:func:`~gradjax.model.apply_frozen` with its moments), so there is one training loop (:func:`fit`) for all.

:func:`make_train_step` turns ``loss_fn`` into ``step(state, batch, frozen=None) -> (state, metrics)``, which is
wrapped three ways from the same code:

* :func:`jit_train_step` — one device;
* :func:`pmap_train_step` — ``jax.pmap`` data parallelism (the design card). The batch carries a leading device
  axis; the state is replicated (:func:`replicate`); ``frozen`` is broadcast (``in_axes=None``) and must **not**
  carry a device axis. Gradients, loss, metrics and model state are averaged with ``lax.pmean`` over
  ``axis_name``; BatchNorm must be built with the same ``axis_name`` so that it normalizes with global batch
  statistics;
* :func:`sharded_train_step` — ``jax.jit`` with a ``NamedSharding`` that splits the batch over a device mesh
  (JAX's recommended form; ``pmap`` is in maintenance mode); state and ``frozen`` are replicated. The loss is
  written for the global batch and XLA inserts the collectives, so no ``axis_name`` is needed.

All three give the same parameters and model state as the single-device step on the same global batch (tested on
8 fake CPU devices, for cross-entropy and for double-backprop losses). All run on one device (Colab's TPU chip).

**Divergence guard.** The step computes ``finite = isfinite(loss) & all(isfinite(grads))``. A non-finite step
is not applied (parameters, model state *and* optimizer state are kept), and sets the sticky ``state.diverged``
flag, after which the state is frozen — so the state is always the last good one without a device-to-host sync
every step. :func:`fit` checks the flag at every log interval, saves the frozen (last good) state, and raises
:class:`TrainingDivergedError` with the step number.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gradjax._validation import check_images
from gradjax.model import ModelHandle, apply_eval, apply_frozen, apply_train  # noqa: F401  (re-exported)

PyTree = Any
Batch = Mapping[str, Any]


class StepContext(NamedTuple):
    """The ``ctx`` argument of a loss function.

    Attributes:
      rng: this step's PRNG key, ``fold_in(state.rng, state.step)`` (then folded with the device index under
        ``pmap``, so that noise differs between devices); independent of how the run was split by restarts.
      step: int32 scalar, the number of updates applied so far (for schedules of regularizer weights etc.).
      frozen: the pytree given to ``step(state, batch, frozen)`` (``None`` if not given): fixed inputs such as a
        teacher's variables; an argument of the compiled step, identical on every device.
    """

    rng: jax.Array
    step: jax.Array
    frozen: PyTree


LossFn = Callable[[PyTree, PyTree, Batch, StepContext], tuple[jax.Array, dict]]
"""``loss_fn(params, model_state, batch, ctx) -> (scalar loss, {"model_state": ..., "metrics": {...}})``."""


class TrainingDivergedError(RuntimeError):
    """Raised by :func:`fit` when a step produced a non-finite loss or gradient."""


class TrainState(struct.PyTreeNode):
    """Everything that changes during training (a pytree; ``apply_fn`` and ``tx`` are static).

    step: number of applied updates (int32); params: trainable variables; model_state: the model's other
    collections (``{"batch_stats": ...}`` or ``{}``); opt_state: optax state; rng: base PRNG key (step ``t`` uses
    ``fold_in(rng, t)``); diverged: sticky flag set by the divergence guard.
    """

    step: jax.Array
    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    rng: jax.Array
    diverged: jax.Array
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(cls, *, apply_fn: Callable, params: PyTree, tx: optax.GradientTransformation,
               model_state: Optional[Mapping] = None, rng: jax.Array) -> "TrainState":
        """A state at step 0: ``tx.init(params)`` as optimizer state, ``diverged = False``."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, model_state=dict(model_state or {}),
                   opt_state=tx.init(params), rng=rng, diverged=jnp.zeros((), bool), apply_fn=apply_fn, tx=tx)

    @property
    def batch_stats(self) -> PyTree:
        """BatchNorm running statistics, ``model_state["batch_stats"]`` (``{}`` for a model without them)."""
        return self.model_state.get("batch_stats", {})

    @property
    def variables(self) -> dict:
        """``{"params": ..., **model_state}``, the variables of ``apply_fn``."""
        return {"params": self.params, **self.model_state}

    def model(self) -> ModelHandle:
        """The eval-mode model, ``ModelHandle(apply_fn, variables)`` (the library's model interface; a handle is
        itself a ``logits_fn``)."""
        return ModelHandle(self.apply_fn, self.variables)

    def logits_fn(self) -> Callable[[jax.Array], jax.Array]:
        """Alias of :meth:`model` (kept for old call sites)."""
        return self.model()


def create_train_state(model, tx: optax.GradientTransformation, sample_input: jax.Array, *, seed: int = 0,
                       init_fn: Optional[Callable[[jax.Array, jax.Array], PyTree]] = None) -> TrainState:
    """Initialize ``model`` (a Flax Linen module) on ``sample_input`` [B, ...] and wrap it in a TrainState.

    ``init_fn(key, sample_input) -> variables`` defaults to ``model.init(key, x, train=False)`` run eagerly. To
    initialize the same architecture many times (retraining, seeds) without re-tracing, build one
    ``init_fn = jax.jit(functools.partial(model.init, train=False))`` and pass it every time (the caller owns
    that compile cache). ``params`` become ``state.params``; every other collection ``state.model_state``.
    """
    init_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
    init_fn = init_fn or (lambda key, x: model.init(key, x, train=False))
    variables = init_fn(init_key, jnp.asarray(sample_input))
    model_state = {k: v for k, v in variables.items() if k not in ("params", "perturbations", "biases")}
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx, model_state=model_state,
                             rng=state_key)


# ----------------------------------------------------------------------------------------------------- losses
def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy ``-1/B sum_i log softmax(logits_i)[y_i]`` (with optional label smoothing)."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
    if label_smoothing:
        targets = targets * (1 - label_smoothing) + label_smoothing / num_classes
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def classification_loss(apply_fn: Callable, *, weight_decay: float = 0.0, label_smoothing: float = 0.0) -> LossFn:
    """Cross-entropy objective ``CE(f(x), y) + weight_decay/2 * ||params||^2`` on ``batch["image"]``,
    ``batch["label"]`` with a train-mode pass (:func:`~gradjax.model.apply_train`); metrics: cross_entropy,
    accuracy."""

    def loss_fn(params, model_state, batch, ctx):
        del ctx
        logits, new_state, _ = apply_train(apply_fn, params, model_state, batch["image"])
        ce = cross_entropy(logits, batch["label"], label_smoothing=label_smoothing)
        loss = ce
        if weight_decay:
            loss = loss + 0.5 * weight_decay * sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"model_state": new_state, "metrics": {"cross_entropy": ce, "accuracy": acc}}

    return loss_fn


# ------------------------------------------------------------------------------------------------ train step
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _pmean_inexact(tree, axis_name: str):
    """``lax.pmean`` of the floating leaves (integer counters etc. keep the device-local value)."""
    return jax.tree.map(lambda x: lax.pmean(x, axis_name) if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else x,
                        tree)


def _check_loss_output(out, model_state: PyTree) -> tuple[jax.Array, PyTree, dict]:
    """Static checks of ``loss_fn``'s output (run while tracing, before anything is compiled)."""
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(f"loss_fn must return (loss, aux); got {type(out).__name__}"
                         + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "") + ".")
    loss, aux = out
    if jnp.shape(loss) != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
        raise ValueError(f"loss_fn must return a float scalar loss; got shape {tuple(jnp.shape(loss))}, dtype "
                         f"{jnp.result_type(loss)}. Reduce per-example losses (e.g. jnp.mean) inside loss_fn.")
    aux = {} if aux is None else aux
    if not isinstance(aux, Mapping) or set(aux) - {"model_state", "metrics"}:
        raise ValueError("loss_fn's aux must be a dict with optional keys 'model_state' and 'metrics'; got "
                         + (f"keys {sorted(aux)}." if isinstance(aux, Mapping) else f"{type(aux).__name__}."))
    new_state = aux.get("model_state", model_state)
    if jax.tree.structure(new_state) != jax.tree.structure(model_state) or any(
            jnp.shape(a) != jnp.shape(b) for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(model_state))):
        raise ValueError("aux['model_state'] must have the structure and shapes of the model_state given to loss_fn "
                         f"({jax.tree.structure(model_state)}); got {jax.tree.structure(new_state)}.")
    metrics = aux.get("metrics", {})
    if not isinstance(metrics, Mapping):
        raise ValueError(f"aux['metrics'] must be a dict of scalars; got {type(metrics).__name__}.")
    bad = {k: tuple(jnp.shape(v)) for k, v in metrics.items() if jnp.shape(v) != ()}
    if bad:
        raise ValueError(f"aux['metrics'] must map names to scalars; got non-scalar metrics {bad}.")
    if "loss" in metrics or "finite" in metrics:
        raise ValueError("aux['metrics'] must not use the reserved names 'loss' and 'finite'.")
    return loss, new_state, dict(metrics)


def make_train_step(loss_fn: LossFn, *, axis_name: Optional[str] = None
                    ) -> Callable[..., tuple[TrainState, dict]]:
    """Build the (un-jitted) step ``(state, batch, frozen=None) -> (state, metrics)`` from a per-device ``loss_fn``.

    One update ``params <- params + tx.update(grad_params loss)`` with ``ctx = StepContext(fold_in(state.rng,
    state.step), state.step, frozen)``. With ``axis_name`` (inside ``pmap``) the gradient, loss, metrics and model
    state are averaged over devices with ``lax.pmean`` and the RNG is folded with the device index. Non-finite
    steps are rejected and set ``state.diverged`` (see module docstring). ``metrics`` holds the loss function's
    metrics plus ``loss`` and ``finite``.
    """

    def step(state: TrainState, batch: Batch, frozen: PyTree = None):
        rng = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
        ctx = StepContext(rng=rng, step=state.step, frozen=frozen)

        def checked_loss(params):
            loss, new_state, metrics = _check_loss_output(loss_fn(params, state.model_state, batch, ctx),
                                                          state.model_state)
            return loss, (new_state, metrics)

        (loss, (new_state, metrics)), grads = jax.value_and_grad(checked_loss, has_aux=True)(state.params)
        metrics["loss"] = loss
        if axis_name is not None:
            grads, new_state, metrics = _pmean_inexact((grads, new_state, metrics), axis_name)
        updates, new_opt = state.tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        finite = _all_finite((metrics["loss"], grads))
        ok = finite & jnp.logical_not(state.diverged)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = state.replace(step=state.step + ok.astype(state.step.dtype),
                                  params=keep(new_params, state.params),
                                  model_state=keep(new_state, state.model_state),
                                  opt_state=keep(new_opt, state.opt_state),
                                  diverged=state.diverged | ~finite)
        metrics["finite"] = ok
        return new_state, metrics

    return step


# ------------------------------------------------------------------------------------------ batch validation
@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """What one batch entry must be (checked on the host before the compiled step).

    Attributes:
      rank: number of axes *including* the batch axis (images 4, labels 1, 2-D points 2); ``None`` = any (>= 1).
      kind: ``"float"`` (a floating dtype), ``"int"`` (an integer dtype) or ``"any"``.
      shape: optional per-example shape (without the batch axis); ``None`` entries match any size.
      num_classes: for ``"int"`` entries, values must lie in ``[0, num_classes)``.
      finite: for ``"float"`` entries, no NaN/inf (scanned on a step's first call only; later NaNs are caught by
        the divergence guard).
      optional: the entry may be absent.
    """

    rank: Optional[int] = None
    kind: str = "float"
    shape: Optional[tuple] = None
    num_classes: Optional[int] = None
    finite: bool = True
    optional: bool = False

    def __post_init__(self):
        if self.kind not in ("float", "int", "any"):
            raise ValueError(f"ArraySpec.kind must be 'float', 'int' or 'any'; got {self.kind!r}.")
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))
            if self.rank is not None and self.rank != len(self.shape) + 1:
                raise ValueError(f"ArraySpec: rank {self.rank} disagrees with per-example shape {self.shape}.")
            object.__setattr__(self, "rank", len(self.shape) + 1)
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"ArraySpec.rank counts the batch axis and must be >= 1; got {self.rank}.")
        if self.num_classes is not None and self.kind != "int":
            raise ValueError("ArraySpec.num_classes applies to kind='int' entries only.")


BatchSpec = Mapping[str, ArraySpec]
"""``{entry name: ArraySpec}``. Every required entry must be present and no other entry is allowed (every entry is
split over devices along its leading axis, so it must be per-example); all share one batch size."""


def image_batch_spec(num_classes: Optional[int] = None, *, labels: bool = True) -> dict[str, ArraySpec]:
    """The default spec: ``image`` float ``[B, H, W, C]``, and ``label`` int ``[B]`` in ``[0, num_classes)``
    (required if ``labels``, else optional)."""
    return {"image": ArraySpec(rank=4, kind="float"),
            "label": ArraySpec(rank=1, kind="int", num_classes=num_classes, optional=not labels)}


def _leaf_name(path) -> str:
    return "".join(str(k) for k in path) or "frozen"


def _local_values(x) -> np.ndarray:
    """The values of ``x`` this process can read: all of it, or (a global array spanning other processes' devices,
    see :mod:`gradjax.distributed`) its addressable shards — each process checks the rows it supplied."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        shards = [np.asarray(sh.data).reshape(-1) for sh in x.addressable_shards]
        return np.concatenate(shards) if shards else np.zeros((0,), x.dtype)
    return np.asarray(x)


def validate_batch(batch: Batch, spec: Optional[BatchSpec] = None, *, num_classes: Optional[int] = None,
                   check_values: bool = True, leading_axes: int = 1, num_devices: Optional[int] = None,
                   divisible_by: Optional[int] = None) -> None:
    """Check ``batch`` against ``spec`` (default :func:`image_batch_spec` ``(num_classes, labels=False)``) before
    it enters a compiled step. ``leading_axes=2`` for a ``pmap`` batch ``[devices, B, ...]`` (the device axis must
    equal ``num_devices`` when given); ``divisible_by``: the global batch size must divide over that many devices.
    Value checks (label range, NaN/inf) run with ``check_values``. Raises ``ValueError`` saying what is wrong."""
    if spec is None:
        spec = image_batch_spec(num_classes, labels=False)
    elif num_classes is not None:
        raise ValueError("pass either a batch spec or num_classes (a shortcut for image_batch_spec), not both.")
    if not isinstance(batch, Mapping):
        raise ValueError(f"a batch must be a dict of arrays with entries {sorted(spec)}; got {type(batch).__name__}.")
    missing = [k for k, s in spec.items() if not s.optional and k not in batch]
    if missing:
        raise ValueError(f"the batch has no entry {missing} required by the batch spec (it has {sorted(batch)}).")
    extra = sorted(set(batch) - set(spec))
    if extra:
        raise ValueError(f"batch entries {extra} are not in the batch spec {sorted(spec)}. Every batch entry is "
                         "split along its leading (batch) axis: add it to the spec with an ArraySpec, or pass fixed "
                         "tensors through `frozen` instead.")
    lead_dims = None
    for name in spec:
        if name not in batch:
            continue
        s, x = spec[name], batch[name]
        label = f"batch[{name!r}]"
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{label} must be an array; got {type(x).__name__}.")
        shape = tuple(np.shape(x))
        if len(shape) < leading_axes or (s.rank is not None and len(shape) != s.rank + leading_axes - 1):
            want = "a batch axis" if s.rank is None else f"rank {s.rank} (with the batch axis)"
            dev = " after the leading device axis" if leading_axes == 2 else ""
            raise ValueError(f"{label} must have {want}{dev}; got shape {shape}.")
        if lead_dims is None:
            lead_dims = (name, shape[:leading_axes])
        elif shape[:leading_axes] != lead_dims[1]:
            raise ValueError(f"{label} has leading (batch) shape {shape[:leading_axes]} but batch[{lead_dims[0]!r}] "
                             f"has {lead_dims[1]}: every entry must have the same batch size.")
        if s.shape is not None:
            per_example = shape[leading_axes:]
            if any(w is not None and w != d for w, d in zip(s.shape, per_example)):
                raise ValueError(f"{label} must have per-example shape {s.shape} (None = any); got {per_example}.")
        dtype = np.dtype(x.dtype)
        if s.kind == "float" and not np.issubdtype(dtype, np.floating):
            raise ValueError(f"{label} must be a floating-point array; got dtype {dtype}. Cast it, e.g. "
                             "x.astype(np.float32).")
        if s.kind == "int" and not np.issubdtype(dtype, np.integer):
            raise ValueError(f"{label} must be an integer array (class indices); got dtype {dtype}.")
        if check_values and s.kind == "int" and s.num_classes is not None and np.size(x):
            arr = _local_values(x)
            if arr.min() < 0 or arr.max() >= s.num_classes:
                raise ValueError(f"{label} must lie in [0, {s.num_classes}); got values in [{arr.min()}, {arr.max()}].")
        if check_values and s.kind == "float" and s.finite:
            arr = _local_values(x)
            n_bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            if n_bad:
                raise ValueError(f"{label} contains {n_bad} non-finite value(s) (NaN or inf).")
    if lead_dims is None:
        raise ValueError("the batch is empty: it has none of the spec's entries.")
    if lead_dims[1][-1] < 1:
        raise ValueError("the batch has no examples (batch size 0).")
    if leading_axes == 2 and num_devices is not None and lead_dims[1][0] != num_devices:
        raise ValueError(f"a pmap batch needs a leading device axis of size {num_devices} (use shard_batch); "
                         f"batch[{lead_dims[0]!r}] has leading shape {lead_dims[1]}.")
    if divisible_by and lead_dims[1][0] % divisible_by:
        raise ValueError(f"global batch size {lead_dims[1][0]} is not divisible by the {divisible_by} devices.")


def validate_frozen(frozen: PyTree, *, where: str = "jit") -> None:
    """Check ``frozen`` before it enters a compiled step: every leaf is an array (or a Python number) and none is
    split across devices. ``frozen`` is *one* copy, identical on every device, never split along a batch axis:

    * under ``pmap`` it is broadcast (``in_axes=None``), so a leaf must **not** carry a leading device axis — pass
      the un-replicated pytree, not ``replicate(frozen)``;
    * under sharding it is placed with a replicated ``NamedSharding`` — a leaf sharded over the mesh (e.g. by
      ``put_sharded``) is an error.

    Per-example tensors (e.g. precomputed teacher logits ``[B, K]``) must go in the batch (with a spec entry) so
    that they are split with the examples they belong to. Raises ``ValueError``.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(frozen)[0]:
        name = f"frozen{_leaf_name(path)}" if path else "frozen"
        if isinstance(leaf, (bool, int, float, complex, np.ndarray, np.generic)):
            continue
        if not isinstance(leaf, jax.Array):
            raise ValueError(f"{name} must be an array or a number (it is an argument of the compiled step); got "
                             f"{type(leaf).__name__}. Close over non-array configuration in loss_fn instead.")
        if not leaf.sharding.is_fully_replicated:
            fix = ("under pmap, frozen is broadcast to every device (in_axes=None) and must not carry a leading "
                   "device axis: pass the un-replicated pytree, not replicate(frozen)" if where == "pmap" else
                   "frozen inputs are one copy shared by every device, never split along a batch axis: pass a host "
                   "or single-device array, or put_replicated(frozen, mesh)")
            raise ValueError(f"{name} (shape {tuple(leaf.shape)}) is split across devices ({leaf.sharding}); {fix}. "
                             "Per-example tensors belong in the batch.")


def _validated(step, spec: Optional[BatchSpec], num_classes: Optional[int], where: str, *, leading_axes: int = 1,
               num_devices: Optional[int] = None, divisible_by: Optional[int] = None):
    """Validate every batch and ``frozen`` on the host (shapes, dtypes, label range); the NaN scan only on the
    first call, so that a NaN arising later is caught by the divergence guard instead of costing a scan per step."""
    if spec is not None and num_classes is not None:
        raise ValueError("pass either batch_spec or num_classes (a shortcut for image_batch_spec), not both.")
    calls = [0]

    def checked(state, batch, frozen=None):
        validate_batch(batch, spec, num_classes=num_classes, check_values=calls[0] == 0,
                       leading_axes=leading_axes, num_devices=num_devices, divisible_by=divisible_by)
        validate_frozen(frozen, where=where)
        calls[0] += 1
        return step(state, batch, frozen)

    checked.compiled = step  # the raw jitted / pmapped function, e.g. for .lower(state, batch, frozen)
    return checked


def jit_train_step(loss_fn: LossFn, *, batch_spec: Optional[BatchSpec] = None, num_classes: Optional[int] = None,
                   donate: bool = True, validate: bool = True):
    """Single-device jit-compiled ``step(state, batch, frozen=None)``. With ``validate`` every batch is checked on
    the host first against ``batch_spec`` (default :func:`image_batch_spec`; ``num_classes=`` is a shortcut for
    ``image_batch_spec(num_classes)``), and ``frozen`` with :func:`validate_frozen`."""
    step = jax.jit(make_train_step(loss_fn), donate_argnums=(0,) if donate else ())
    return _validated(step, batch_spec, num_classes, "jit") if validate else step


def pmap_train_step(loss_fn: LossFn, *, axis_name: str = "batch", devices=None,
                    batch_spec: Optional[BatchSpec] = None, num_classes: Optional[int] = None,
                    donate: bool = True, validate: bool = True):
    """``jax.pmap`` data-parallel ``step(state, batch, frozen=None)``. Inputs: state replicated
    (:func:`replicate`), batch with a leading device axis (:func:`shard_batch`), ``frozen`` *without* a device
    axis (broadcast with ``in_axes=None``). Build the model's BatchNorm with the same ``axis_name``."""
    step = jax.pmap(make_train_step(loss_fn, axis_name=axis_name), axis_name=axis_name, in_axes=(0, 0, None),
                    devices=devices, donate_argnums=(0,) if donate else ())
    n = len(devices) if devices is not None else jax.local_device_count()
    return _validated(step, batch_spec, num_classes, "pmap", leading_axes=2, num_devices=n) if validate else step


def data_mesh(devices=None, axis: str = "data") -> Mesh:
    """A 1-D device mesh over all (or the given) devices for data parallelism."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), (axis,))


def sharded_train_step(loss_fn: LossFn, mesh: Mesh, *, axis: str = "data", batch_spec: Optional[BatchSpec] = None,
                       num_classes: Optional[int] = None, donate: bool = True, validate: bool = True):
    """``jax.jit`` ``step(state, batch, frozen=None)`` with the batch split over ``mesh`` along its leading axis
    and the state and ``frozen`` replicated (``NamedSharding(mesh, P())``).

    The same global-batch ``loss_fn`` as on one device; XLA partitions it and inserts the all-reduces (so the
    gradient is already the global one — nothing to average by hand). Put inputs on devices with
    :func:`put_replicated` / :func:`put_sharded` (host arrays are placed by ``jit`` itself).
    """
    replicated = NamedSharding(mesh, P())
    split = NamedSharding(mesh, P(axis))
    step = make_train_step(loss_fn)
    step = jax.jit(step, in_shardings=(replicated, split, replicated), out_shardings=(replicated, replicated),
                   donate_argnums=(0,) if donate else ())
    return _validated(step, batch_spec, num_classes, "sharded", divisible_by=mesh.shape[axis]) if validate else step


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
    """Place every leaf of ``tree`` (a state, a teacher's variables) on all devices of ``mesh``, replicated."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def put_sharded(batch: Batch, mesh: Mesh, axis: str = "data") -> Batch:
    """Split every ``[B, ...]`` entry of ``batch`` over ``mesh`` along its leading axis (``B`` must divide)."""
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
    """Accuracy and mean cross-entropy over ``batches`` (host-side sums of :func:`make_eval_step`).

    In a multi-process run each process evaluates all of ``batches`` with a local copy of the (replicated) state;
    :func:`gradjax.distributed.evaluate` splits the work over all devices instead."""
    eval_step = eval_step or make_eval_step(state.apply_fn)
    if _multiprocess():  # a state replicated over all processes: every process evaluates its own full copy
        state = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) and not x.is_fully_addressable
                             else x, state)
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
_STATE_FIELDS = ("step", "params", "model_state", "opt_state", "rng", "diverged")


def replicate_global(tree: PyTree) -> PyTree:
    """Leaves as global arrays replicated over every device of every process (leaves that already span other
    processes are kept). Every process must pass the same values."""
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()).reshape(-1), ("data",)), P())

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def state_to_pytree(state: TrainState) -> dict:
    """The array fields of a :class:`TrainState` as a plain dict (what a checkpoint stores)."""
    return {k: getattr(state, k) for k in _STATE_FIELDS}


def _multiprocess() -> bool:
    return jax.process_count() > 1


def _global_restore_target(leaf):
    """A restore target for one state leaf in a multi-process run: its global sharding, or replicated over all
    devices of all processes."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        sharding = leaf.sharding
    else:
        sharding = NamedSharding(Mesh(np.asarray(jax.devices()).reshape(-1), ("data",)), P())
    return jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf), sharding=sharding)


class Checkpointer:
    """Orbax ``CheckpointManager`` for TrainStates (async saves; :meth:`wait` before reading from disk).

    Multi-process (:mod:`gradjax.distributed`): every process constructs it with the same ``directory`` (on a
    filesystem all hosts reach, e.g. a GCS bucket or NFS) and calls :meth:`save` / :meth:`restore` together;
    the state's global (replicated) arrays are written once, and restored as global arrays replicated over all
    devices (or with the template's global sharding)."""

    def __init__(self, directory: str, *, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> Optional[int]:
        """The step of the newest checkpoint in the directory, or ``None`` if there is none."""
        return self.manager.latest_step()

    def save(self, state: TrainState, *, force: bool = True) -> None:
        """Save ``state`` under its step (asynchronously; a step already saved is skipped)."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        tree = state_to_pytree(state)
        if _multiprocess():  # global arrays: orbax writes each replicated array once, all processes take part
            tree = replicate_global(tree)
        else:
            tree = jax.device_get(tree)
        self.manager.save(step, args=self._ocp.args.StandardSave(tree), force=force)

    def restore(self, template: TrainState, step: Optional[int] = None) -> TrainState:
        """Restore into the structure (and dtypes) of ``template``; the latest step by default."""
        self.manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if _multiprocess():
            target = jax.tree.map(_global_restore_target, state_to_pytree(template))
        else:
            target = jax.tree.map(np.asarray, jax.device_get(state_to_pytree(template)))
        restored = self.manager.restore(step, args=self._ocp.args.StandardRestore(target))
        return template.replace(**{k: jax.tree.map(jnp.asarray, restored[k]) for k in _STATE_FIELDS})

    def wait(self) -> None:
        """Block until pending asynchronous saves are written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the checkpoint manager."""
        self.manager.wait_until_finished()
        self.manager.close()


# ---------------------------------------------------------------------------------------------- the loop
class MetricsLogger:
    """Append JSON lines ``{"step":..., ...}`` to ``path`` (or keep them in memory only if ``path`` is None).

    In a multi-process run only process 0 writes the file (every process keeps the same records in memory)."""

    def __init__(self, path: Optional[str]):
        self.path = path if jax.process_index() == 0 else None
        self.records: list[dict] = []
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, record: dict) -> None:
        """Keep ``record`` (array values converted to floats) and append it to the file as one JSON line."""
        record = {k: (float(v) if isinstance(v, (np.floating, np.integer, jax.Array, np.ndarray)) else v) for k, v in record.items()}
        self.records.append(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def fit(state: TrainState, train_step: Callable, epoch_batches: Callable[[int, int], Iterator[Batch]], *,
        num_epochs: int, steps_per_epoch: int, checkpoint_dir: Optional[str] = None, checkpoint_every: Optional[int] = None,
        log_path: Optional[str] = None, log_every: int = 20, eval_fn: Optional[Callable[[TrainState], dict]] = None,
        max_steps: Optional[int] = None, progress: bool = True, to_device: Callable[[Batch], Batch] = lambda b: b,
        frozen: PyTree = None) -> tuple[TrainState, list[dict]]:
    """The training loop shared by every objective.

    ``epoch_batches(epoch, start)`` yields the batches of ``epoch`` from batch ``start`` on (a deterministic
    order, e.g. :func:`gradjax.data.batches`); ``train_step`` is any step from this module (for ``pmap`` pass
    ``to_device=shard_batch`` and a replicated state). With ``checkpoint_dir`` the run resumes from the latest
    checkpoint there and saves every ``checkpoint_every`` steps (default: each epoch) and at the end, so an
    interrupted run continues to the same result. ``max_steps`` stops early (used to simulate interruption).
    Metrics (train every ``log_every`` steps, ``eval_fn(state)`` each epoch) go to JSON lines at ``log_path``.
    ``frozen`` (e.g. a teacher's variables) is passed to every step as ``train_step(state, batch, frozen)``
    (un-replicated, also under ``pmap``; see :func:`validate_frozen`).
    Raises :class:`TrainingDivergedError` if a step was non-finite, after saving the last good state.

    Multi-process (:mod:`gradjax.distributed`): every process calls ``fit`` with the same arguments, a
    :func:`sharded_train_step` on the global mesh, a state replicated with ``distributed.replicate`` and
    ``epoch_batches`` from ``distributed.global_batches`` (each process reads its rows); checkpoints are written
    by all processes together, metrics (``log_path``) and the progress bar by process 0 only.
    """
    from tqdm.auto import tqdm

    is_pmapped = jnp.ndim(state.step) == 1
    host = (lambda s: unreplicate(s)) if is_pmapped else (lambda s: s)
    ckpt = Checkpointer(checkpoint_dir) if checkpoint_dir else None
    if ckpt is not None and ckpt.latest_step() is not None:
        restored = ckpt.restore(host(state))
        # pmap needs the device axis; otherwise put every leaf where the given state had it (e.g. replicated over a
        # mesh), so a resumed run calls the already compiled step with the same input placement (no recompile).
        if is_pmapped:
            state = replicate(restored)
        else:
            state = jax.tree.map(lambda r, t: jax.device_put(r, t.sharding) if isinstance(t, jax.Array) else r,
                                 restored, state)
    logger = MetricsLogger(log_path)
    total = num_epochs * steps_per_epoch if max_steps is None else min(max_steps, num_epochs * steps_per_epoch)
    step0 = int(jax.device_get(host(state).step))
    checkpoint_every = checkpoint_every or steps_per_epoch
    pbar = tqdm(total=total, initial=min(step0, total), disable=not progress or jax.process_index() != 0, desc="train",
                dynamic_ncols=True)
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
                state, metrics = (train_step(state, to_device(batch)) if frozen is None
                                  else train_step(state, to_device(batch), frozen))
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
