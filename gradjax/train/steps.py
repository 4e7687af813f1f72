"""Step builders: one train step for every objective, compiled for one device, ``pmap`` or a device mesh.

:class:`TrainState` (everything that changes during training), :class:`StepContext` (the ``ctx`` of a loss
function), :func:`make_train_step` (one update with the divergence guard) and its three wrappers
:func:`jit_train_step`, :func:`pmap_train_step`, :func:`sharded_train_step`, each validating batches on the host
against a batch spec (:mod:`gradjax.train.batch_spec`) before the compiled step. The contract is in
:mod:`gradjax.train`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gradjax.model import ModelHandle
from gradjax.train.batch_spec import BatchSpec, validate_batch, validate_frozen

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


# ------------------------------------------------------------------------------ the step and its divergence guard
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
    steps are rejected and set ``state.diverged`` (the divergence guard, see :mod:`gradjax.train`). ``metrics``
    holds the loss function's metrics plus ``loss`` and ``finite``.
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


# ------------------------------------------------------------------------------------------- compiled forms
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
    (``replicate(state, mesh, device_axis=True)``), batch with a leading device axis (``shard(batch, mesh,
    device_axis=True)``; :mod:`~gradjax.train.placement`), ``frozen`` *without* a device axis (broadcast with
    ``in_axes=None``). Build the model's BatchNorm with the same ``axis_name``."""
    step = jax.pmap(make_train_step(loss_fn, axis_name=axis_name), axis_name=axis_name, in_axes=(0, 0, None),
                    devices=devices, donate_argnums=(0,) if donate else ())
    n = len(devices) if devices is not None else jax.local_device_count()
    return _validated(step, batch_spec, num_classes, "pmap", leading_axes=2, num_devices=n) if validate else step


def sharded_train_step(loss_fn: LossFn, mesh: Mesh, *, axis: str = "data", batch_spec: Optional[BatchSpec] = None,
                       num_classes: Optional[int] = None, donate: bool = True, validate: bool = True):
    """``jax.jit`` ``step(state, batch, frozen=None)`` with the batch split over ``mesh`` along its leading axis
    and the state and ``frozen`` replicated (``NamedSharding(mesh, P())``).

    The same global-batch ``loss_fn`` as on one device; XLA partitions it and inserts the all-reduces (so the
    gradient is already the global one — nothing to average by hand). Put inputs on devices with
    :func:`~gradjax.train.placement.replicate` / :func:`~gradjax.train.placement.shard` (host arrays are placed
    by ``jit`` itself); the mesh is :func:`~gradjax.train.placement.data_mesh`.
    """
    replicated = NamedSharding(mesh, P())
    split = NamedSharding(mesh, P(axis))
    step = make_train_step(loss_fn)
    step = jax.jit(step, in_shardings=(replicated, split, replicated), out_shardings=(replicated, replicated),
                   donate_argnums=(0,) if donate else ())
    return _validated(step, batch_spec, num_classes, "sharded", divisible_by=mesh.shape[axis]) if validate else step
