"""Input-gradients, logit/loss/probability gradients and Jacobians of a classifier.

Every function takes a plain callable ``logits_fn(x) -> logits`` with ``x`` of shape ``[B, ...]`` (any trailing
shape: ``[B, D]`` vectors, ``[B, H, W, C]`` images, ...) and ``logits`` of shape ``[B, K]``. Typically
``logits_fn = lambda x: model.apply(variables, x)`` in eval mode, a closure over the parameters. Nothing here
depends on Flax.

Notation (thesis §2.4 and §5.2): ``f_i(x)`` is the pre-softmax logit of class ``i``; the *logit-gradient* is
``∇_x f_i(x)``; the *loss-gradient* is ``∇_x ℓ_i(x)`` with ``ℓ_i(x) = -log softmax(f(x)/T)_i`` the cross-entropy;
the *probability-gradient* is ``∇_x softmax(f(x)/T)_i``.

Per-example gradients, two batch modes (keyword ``batch_mode``):

``"sum"`` (default) — the *sum trick*. For a batch ``x = (x_1, …, x_B)`` whose examples are processed
    independently (eval mode: no batch statistics, no attention across the batch) the logit ``f_{i_b}(x)_b``
    depends only on ``x_b``, so
    ``∇_{x_b} Σ_{b'} f_{i_{b'}}(x)_{b'} = ∇_{x_b} f_{i_b}(x_b)``: one reverse pass over the summed selected
    logits gives every per-example gradient at the cost of a single backward pass. Implemented with
    ``jax.vjp`` and a one-hot cotangent, which also returns the logits (no second forward pass).
``"vmap"`` — ``jax.vmap`` over single examples, each run as a batch of one (``x_b[None]``). Correct also for
    models that mix examples within a batch (e.g. BatchNorm in training mode), where the sum trick would leak
    cross-example terms; costs a batch-of-one forward/backward per example (vectorized by ``vmap``).

Targets: an integer array ``[B]`` of class indices, or the sentinel :data:`PREDICTED` meaning the arg-max class
of the logits at ``x`` (the "top class" of thesis §2.4.1).

All functions are pure, jittable (``logits_fn`` and the keyword options are static) and vmappable, and
differentiable w.r.t. anything ``logits_fn`` closes over (double backprop, as needed by the Jacobian-matching
and gradient-norm losses of thesis ch. 2).
"""
from __future__ import annotations

from typing import Callable, Literal, Union

import jax
import jax.numpy as jnp

from gradjax import _validation as V

__all__ = [
    "PREDICTED",
    "Target",
    "resolve_target",
    "select",
    "logit_gradient",
    "logits_and_logit_gradient",
    "loss_gradient",
    "loss_and_loss_gradient",
    "probability_gradient",
    "probabilities_and_probability_gradient",
    "jacobian",
    "value_and_input_gradient",
]

PREDICTED = V.PREDICTED
"""Target sentinel: use the arg-max (top) class of the logits at ``x`` (thesis §2.4.1). The same object as
``gradjax.fullgrad.PREDICTED``."""

Target = Union[jax.Array, str]
LogitsFn = Callable[[jax.Array], jax.Array]
BatchMode = Literal["sum", "vmap"]

_BATCH_MODES = ("sum", "vmap")
_JACOBIAN_MODES = ("full", "target", "top")


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------
def _check_input(x, name: str = "x") -> None:
    if jnp.ndim(x) < 1:
        raise ValueError(f"{name} must have a leading batch axis, shape [B, ...]; got a scalar.")
    V.check_floating(x, name)
    V.check_finite(x, name)


def _check_batch_mode(batch_mode) -> None:
    if batch_mode not in _BATCH_MODES:
        raise ValueError(f"batch_mode must be one of {_BATCH_MODES}; got {batch_mode!r}.")


def _check_target_static(target, batch_size: int, name: str = "target") -> None:
    """Checks possible before the forward pass (rank, dtype, batch size)."""
    if isinstance(target, str):
        if target != PREDICTED:
            raise ValueError(f"{name} must be an integer array [B] or gradjax.gradients.PREDICTED "
                             f"({PREDICTED!r}); got the string {target!r}.")
        return
    V.check_labels(target, None, batch_size, name=name)


def _check_logits(logits, batch_size: int) -> None:
    if jnp.ndim(logits) != 2:
        raise ValueError(f"logits_fn must return logits of shape [B, K]; got shape {tuple(jnp.shape(logits))}.")
    if jnp.shape(logits)[0] != batch_size:
        raise ValueError(f"logits_fn returned {jnp.shape(logits)[0]} rows for a batch of {batch_size} examples.")
    V.check_floating(logits, "logits")


def _check_target_range(target, num_classes: int, name: str = "target") -> None:
    if not isinstance(target, str):
        V.check_labels(target, num_classes, name=name)


def _check_temperature(temperature) -> None:
    if V.is_concrete(temperature) and not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0; got {float(temperature)}.")


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def resolve_target(logits: jax.Array, target: Target) -> jax.Array:
    """Class indices ``[B]`` (int32) for ``target``: the array itself, or ``argmax_k logits[b, k]`` for
    :data:`PREDICTED` (thesis §2.4.1, "top class"). ``logits``: ``[B, K]``."""
    if isinstance(target, str):
        if target != PREDICTED:
            raise ValueError(f"unknown target sentinel {target!r}; use gradjax.gradients.PREDICTED.")
        return jnp.argmax(jax.lax.stop_gradient(logits), axis=-1).astype(jnp.int32)
    return jnp.asarray(target).astype(jnp.int32)


def select(values: jax.Array, target: jax.Array) -> jax.Array:
    """``values[b, target[b]]`` for ``values`` ``[B, K]`` and integer ``target`` ``[B]`` -> ``[B]``."""
    return jnp.take_along_axis(values, target[:, None], axis=-1)[:, 0]


def _single(fn: Callable) -> Callable:
    """Turn a batched ``fn([B, ...]) -> [B, ...]`` into a per-example function (a batch of one)."""
    return lambda xi, *args: jax.tree_util.tree_map(lambda a: a[0], fn(xi[None], *(a[None] for a in args)))


def value_and_input_gradient(
    f: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    *,
    batch_mode: BatchMode = "sum",
) -> tuple[jax.Array, jax.Array]:
    """Per-example value and input-gradient of a batched scalar function.

    ``f(x) -> [B]`` with ``x`` ``[B, ...]``; returns ``(f(x) [B], ∇_{x_b} f(x)_b [B, ...])``.
    ``batch_mode="sum"``: ``∇_x Σ_b f(x)_b`` via one ``jax.vjp`` with an all-ones cotangent (valid when examples
    are independent); ``"vmap"``: ``vmap`` of the gradient of each example run as a batch of one.
    """
    _check_input(x)
    _check_batch_mode(batch_mode)
    return _value_and_grad(f, x, batch_mode)


def _value_and_grad(f, x, batch_mode):
    B = jnp.shape(x)[0]
    if batch_mode == "sum":
        fx, pullback = jax.vjp(f, x)
        if jnp.shape(fx) != (B,):
            raise ValueError(f"f must return one value per example, shape ({B},); got {tuple(jnp.shape(fx))}.")
        (g,) = pullback(jnp.ones_like(fx))
        return fx, g

    def one(xi):
        fi, pb = jax.vjp(lambda z: f(z[None])[0], xi)
        if jnp.shape(fi) != ():
            raise ValueError(f"f must return one value per example; got per-example shape {jnp.shape(fi)}.")
        (gi,) = pb(jnp.ones_like(fi))
        return fi, gi

    return jax.vmap(one)(x)


# ----------------------------------------------------------------------------------------------------------
# logit-gradients
# ----------------------------------------------------------------------------------------------------------
def logits_and_logit_gradient(
    logits_fn: LogitsFn,
    x: jax.Array,
    target: Target = PREDICTED,
    *,
    batch_mode: BatchMode = "sum",
) -> tuple[jax.Array, jax.Array]:
    """Logits and the logit-gradient of the selected class, from one forward and one backward pass.

    Computes ``(f(x) [B, K], ∇_{x_b} f_{t_b}(x_b) [B, ...])`` where ``t_b = target[b]`` or, for
    :data:`PREDICTED`, ``t_b = argmax_k f_k(x_b)`` (thesis §2.4.1 "top class"; §5.2 calls ``∇_x f_i`` the
    *logit-gradient*, the score ``∇_x log p_θ(x | y=i)`` of the implicit density model of §5.3).

    ``batch_mode="sum"`` (default): ``jax.vjp(logits_fn, x)`` pulled back with the cotangent ``onehot(t)`` gives
    ``∇_x Σ_b f_{t_b}(x)_b``, which equals the per-example gradients when examples are independent (eval mode).
    ``batch_mode="vmap"``: the same per example, each run as a batch of one (for models that mix examples).
    """
    _check_input(x)
    _check_batch_mode(batch_mode)
    B = jnp.shape(x)[0]
    _check_target_static(target, B)

    if batch_mode == "sum":
        logits, pullback = jax.vjp(logits_fn, x)
        _check_logits(logits, B)
        _check_target_range(target, jnp.shape(logits)[1])
        t = resolve_target(logits, target)
        (g,) = pullback(jax.nn.one_hot(t, jnp.shape(logits)[1], dtype=logits.dtype))
        return logits, g

    logits_shape = jax.eval_shape(logits_fn, x)
    _check_logits(logits_shape, B)
    _check_target_range(target, logits_shape.shape[1])
    one_logits = _single(logits_fn)

    def one(xi, ti):
        li, pb = jax.vjp(one_logits, xi)
        if ti is None:
            ti = jnp.argmax(jax.lax.stop_gradient(li)).astype(jnp.int32)
        (gi,) = pb(jax.nn.one_hot(ti, li.shape[0], dtype=li.dtype))
        return li, gi

    if isinstance(target, str):
        return jax.vmap(lambda xi: one(xi, None))(x)
    return jax.vmap(one)(x, jnp.asarray(target).astype(jnp.int32))


def logit_gradient(
    logits_fn: LogitsFn,
    x: jax.Array,
    target: Target = PREDICTED,
    *,
    batch_mode: BatchMode = "sum",
) -> jax.Array:
    """Logit-gradient ``∇_{x_b} f_{t_b}(x_b)`` per example, shape of ``x`` (thesis §5.2, §2.4.1).

    ``target``: int array ``[B]`` or :data:`PREDICTED` (arg-max class). See
    :func:`logits_and_logit_gradient` for the ``batch_mode`` options (sum trick vs ``vmap``).
    """
    return logits_and_logit_gradient(logits_fn, x, target, batch_mode=batch_mode)[1]


# ----------------------------------------------------------------------------------------------------------
# loss- and probability-gradients
# ----------------------------------------------------------------------------------------------------------
def _per_example(fn_of_logits: Callable, logits_fn: LogitsFn, x, target, batch_mode, temperature):
    """Value ``[B]`` and input-gradient of ``fn_of_logits(logits/T, t)``, with the target resolved from the
    logits at the clean ``x`` (so PREDICTED is a fixed class, not a function of the perturbation)."""
    _check_input(x)
    _check_batch_mode(batch_mode)
    _check_temperature(temperature)
    B = jnp.shape(x)[0]
    _check_target_static(target, B, name="labels")
    shape = jax.eval_shape(logits_fn, x)
    _check_logits(shape, B)
    _check_target_range(target, shape.shape[1], name="labels")

    def value(z, t):
        logits = logits_fn(z)
        t = resolve_target(logits, target) if t is None else t
        return fn_of_logits(logits / temperature, t)

    t = None if isinstance(target, str) else jnp.asarray(target).astype(jnp.int32)
    if batch_mode == "sum":
        return _value_and_grad(lambda z: value(z, t), x, "sum")

    def one(xi, ti):
        fi, pb = jax.vjp(lambda z: value(z[None], None if ti is None else ti[None])[0], xi)
        (gi,) = pb(jnp.ones_like(fi))
        return fi, gi

    if t is None:
        return jax.vmap(lambda xi: one(xi, None))(x)
    return jax.vmap(one)(x, t)


def _cross_entropy(scaled_logits, t):
    return -select(jax.nn.log_softmax(scaled_logits, axis=-1), t)


def _probability(scaled_logits, t):
    return select(jax.nn.softmax(scaled_logits, axis=-1), t)


def loss_and_loss_gradient(
    logits_fn: LogitsFn,
    x: jax.Array,
    labels: Target,
    *,
    temperature: float = 1.0,
    batch_mode: BatchMode = "sum",
) -> tuple[jax.Array, jax.Array]:
    """Per-example cross-entropy and its input-gradient (the *loss-gradient* of thesis §5.2).

    ``ℓ_b(x) = -log softmax(f(x_b)/T)_{y_b} = -f_{y_b}(x_b)/T + logsumexp_k f_k(x_b)/T``;
    returns ``(ℓ [B], ∇_{x_b} ℓ_b [B, ...])``. ``labels``: int array ``[B]`` or :data:`PREDICTED`.
    Softmax shift invariance (thesis §5.2, Observation): adding the same ``g(x)`` to every logit leaves both
    outputs unchanged.
    """
    return _per_example(_cross_entropy, logits_fn, x, labels, batch_mode, temperature)


def loss_gradient(
    logits_fn: LogitsFn,
    x: jax.Array,
    labels: Target,
    *,
    temperature: float = 1.0,
    batch_mode: BatchMode = "sum",
) -> jax.Array:
    """Loss-gradient ``∇_{x_b} [-log softmax(f(x_b)/T)_{y_b}]`` per example, shape of ``x`` (thesis §5.2)."""
    return loss_and_loss_gradient(logits_fn, x, labels, temperature=temperature, batch_mode=batch_mode)[1]


def probabilities_and_probability_gradient(
    logits_fn: LogitsFn,
    x: jax.Array,
    target: Target = PREDICTED,
    *,
    temperature: float = 1.0,
    batch_mode: BatchMode = "sum",
) -> tuple[jax.Array, jax.Array]:
    """Softmax probability of the target class and its input-gradient.

    ``p_b = softmax(f(x_b)/T)_{t_b}`` (the ``S_s^i`` of thesis Prop. 2 / eq. 2.3); returns
    ``(p [B], ∇_{x_b} p_b [B, ...])``.
    """
    return _per_example(_probability, logits_fn, x, target, batch_mode, temperature)


def probability_gradient(
    logits_fn: LogitsFn,
    x: jax.Array,
    target: Target = PREDICTED,
    *,
    temperature: float = 1.0,
    batch_mode: BatchMode = "sum",
) -> jax.Array:
    """Probability-gradient ``∇_{x_b} softmax(f(x_b)/T)_{t_b}`` per example, shape of ``x``."""
    return probabilities_and_probability_gradient(
        logits_fn, x, target, temperature=temperature, batch_mode=batch_mode)[1]


# ----------------------------------------------------------------------------------------------------------
# Jacobians
# ----------------------------------------------------------------------------------------------------------
def jacobian(
    logits_fn: LogitsFn,
    x: jax.Array,
    *,
    mode: Literal["full", "target", "top"] = "full",
    target: Target | None = None,
    batch_mode: BatchMode = "sum",
) -> jax.Array:
    """Input-Jacobian of the logits, in full or approximated by one row (thesis §2.4.1).

    * ``mode="full"``: ``J[b, k] = ∇_{x_b} f_k(x_b)``, shape ``[B, K, *x.shape[1:]]`` — the Jacobian needed by
      Propositions 1 and 2 (``σ² Σ_k ‖∇_x S^k(x)‖²``). Computed with one forward pass and ``K`` reverse passes:
      the pullback of ``jax.vjp(logits_fn, x)`` is ``vmap``-ed over the ``K`` one-hot cotangents of the summed
      logits (sum trick; ``batch_mode="vmap"`` uses ``jax.jacrev`` per example instead).
    * ``mode="target"``: the row of the given class, ``∇_{x_b} f_{t_b}(x_b)``, shape ``[B, *x.shape[1:]]``
      (§2.4.1: "only the output variable involving the correct answer is used"); ``target`` is required.
    * ``mode="top"``: the row of the arg-max logit (§2.4.1: "the output variable with the largest magnitude,
      as it often corresponds to the right label"; we take the largest logit, i.e. the predicted class),
      shape ``[B, *x.shape[1:]]``. ``target`` must be ``None`` or :data:`PREDICTED`.
    """
    if mode not in _JACOBIAN_MODES:
        raise ValueError(f"mode must be one of {_JACOBIAN_MODES}; got {mode!r}.")
    if mode == "target":
        if target is None:
            raise ValueError("mode='target' needs target=int array [B] (or PREDICTED).")
        return logit_gradient(logits_fn, x, target, batch_mode=batch_mode)
    if mode == "top":
        if target is not None and not (isinstance(target, str) and target == PREDICTED):
            raise ValueError("mode='top' uses the arg-max class; pass target=None (or PREDICTED), "
                             "or use mode='target' for given classes.")
        return logit_gradient(logits_fn, x, PREDICTED, batch_mode=batch_mode)

    if target is not None:
        raise ValueError("mode='full' returns every class; target must be None.")
    _check_input(x)
    _check_batch_mode(batch_mode)
    B = jnp.shape(x)[0]
    if batch_mode == "sum":
        logits, pullback = jax.vjp(logits_fn, x)
        _check_logits(logits, B)
        K = jnp.shape(logits)[1]
        # cotangent k selects logit k of every example: eye(K)[k] broadcast over the batch -> [K, B, K]
        cot = jnp.broadcast_to(jnp.eye(K, dtype=logits.dtype)[:, None, :], (K, B, K))
        (jac,) = jax.vmap(pullback)(cot)  # [K, B, ...]
        return jnp.moveaxis(jac, 0, 1)
    shape = jax.eval_shape(logits_fn, x)
    _check_logits(shape, B)
    return jax.vmap(jax.jacrev(_single(logits_fn)))(x)
