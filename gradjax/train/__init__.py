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

Cross-entropy (:func:`gradjax.losses.classification.classification_loss`, also ``train.classification_loss``)
is one such function; Jacobian matching, gradient-norm penalties and score-matching are others and go through the
very same step (their extra, double-backprop passes use the BatchNorm policies of :mod:`gradjax.model`:
:func:`~gradjax.model.apply_train` for the clean pass, then :func:`~gradjax.model.apply_frozen` with its moments),
so there is one training loop (:func:`fit`) for all.

:func:`make_train_step` turns ``loss_fn`` into ``step(state, batch, frozen=None) -> (state, metrics)``, which is
wrapped three ways from the same code:

* :func:`jit_train_step` — one device;
* :func:`pmap_train_step` — ``jax.pmap`` data parallelism (the design card). The batch carries a leading device
  axis (``shard(batch, mesh, device_axis=True)``); the state is replicated (``replicate(state, mesh,
  device_axis=True)``); ``frozen`` is broadcast (``in_axes=None``) and must **not** carry a device axis.
  Gradients, loss, metrics and model state are averaged with ``lax.pmean`` over ``axis_name``; BatchNorm must be
  built with the same ``axis_name`` so that it normalizes with global batch statistics;
* :func:`sharded_train_step` — ``jax.jit`` with a ``NamedSharding`` that splits the batch over a device mesh
  (JAX's recommended form; ``pmap`` is in maintenance mode); state and ``frozen`` are replicated. The loss is
  written for the global batch and XLA inserts the collectives, so no ``axis_name`` is needed. The same step runs
  on a mesh of every device of every process (:mod:`gradjax.distributed`).

All three give the same parameters and model state as the single-device step on the same global batch (tested on
8 fake CPU devices, for cross-entropy and for double-backprop losses). All run on one device (Colab's TPU chip).

**Divergence guard.** The step computes ``finite = isfinite(loss) & all(isfinite(grads))``. A non-finite step
is not applied (parameters, model state *and* optimizer state are kept), and sets the sticky ``state.diverged``
flag, after which the state is frozen — so the state is always the last good one without a device-to-host sync
every step. :func:`fit` checks the flag at every log interval, saves the frozen (last good) state, and raises
:class:`TrainingDivergedError` with the step number.

**Modules** (every public name is re-exported here, ``from gradjax import train; train.fit(...)``):

* :mod:`~gradjax.train.steps` — :class:`TrainState`, :func:`create_train_state`, :class:`StepContext`,
  :func:`make_train_step` (the update and its divergence guard), :func:`jit_train_step`,
  :func:`pmap_train_step`, :func:`sharded_train_step`;
* :mod:`~gradjax.train.batch_spec` — :class:`ArraySpec`, :func:`image_batch_spec`, :func:`validate_batch`,
  :func:`validate_frozen` (host-side checks before the compiled step);
* :mod:`~gradjax.train.placement` — :func:`data_mesh`, :func:`replicate`, :func:`shard`, :func:`unreplicate`
  (one mesh, one replicate, one shard, for one process and for many);
* :mod:`~gradjax.train.checkpoint` — :class:`Checkpointer` (orbax, resume), :func:`state_to_pytree`;
* :mod:`~gradjax.train.loop` — :func:`fit`, :class:`MetricsLogger` (JSON lines, tqdm);
* :mod:`~gradjax.train.evaluation` — :func:`make_eval_step`, :func:`evaluate` (host or global batches).
"""
from gradjax.losses.classification import classification_loss
from gradjax.train import batch_spec, checkpoint, evaluation, loop, placement, steps
from gradjax.train.batch_spec import ArraySpec, BatchSpec, image_batch_spec, validate_batch, validate_frozen
from gradjax.train.checkpoint import Checkpointer, state_to_pytree
from gradjax.train.evaluation import evaluate, make_eval_step
from gradjax.train.loop import MetricsLogger, fit
from gradjax.train.placement import data_mesh, replicate, shard, unreplicate
from gradjax.train.steps import (LossFn, StepContext, TrainingDivergedError, TrainState, create_train_state,
                                 jit_train_step, make_train_step, pmap_train_step, sharded_train_step)

__all__ = [
    "StepContext", "LossFn", "TrainState", "TrainingDivergedError", "create_train_state", "make_train_step",
    "jit_train_step", "pmap_train_step", "sharded_train_step",
    "ArraySpec", "BatchSpec", "image_batch_spec", "validate_batch", "validate_frozen",
    "data_mesh", "replicate", "shard", "unreplicate",
    "Checkpointer", "state_to_pytree", "MetricsLogger", "fit", "make_eval_step", "evaluate",
    "classification_loss",
]
