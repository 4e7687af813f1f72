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

**The one gradient primitive.** :func:`logits_and_target_gradient` — one ``jax.vjp`` of a logits function pulled
back with the one-hot cotangent of the target class — is what every gradient in gradjax is built on: the logit-,
loss- and probability-gradients here, the full-gradients and tap gradients of :mod:`gradjax.fullgrad`, and every
saliency method (through a modified logits function: a method interceptor for guided backprop, a perturbed layer
output for Grad-CAM, bias taps for FullGrad).

**Train-mode models** (``has_aux``): a logits function may return ``(logits, aux)``, e.g. a train-mode Flax pass
``lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"])`` returning the updated
``batch_stats``; with ``has_aux=True`` every function also returns ``aux``. (Train-mode BatchNorm couples the
examples, so use ``batch_mode="vmap"`` or a frozen-moments pass, :func:`gradjax.model.apply_frozen`, for exact
per-example gradients.)

**Models.** ``logits_fn`` is a plain callable; a :class:`gradjax.model.ModelHandle` is one too (``handle(x)`` are
its eval-mode logits), and an NNX model works through ``nnx.split``/``nnx.merge``.

**Jit.** All functions are pure, never jit themselves, and are jittable (``logits_fn`` and the keyword options are
static) and vmappable, and differentiable w.r.t. anything ``logits_fn`` closes over (double backprop, as needed by
the Jacobian-matching and gradient-norm losses of thesis ch. 2). The caller jits, e.g.::

    grad_fn = jax.jit(lambda params, x, y: logit_gradient(lambda z: model.apply(params, z), x, y))

Called eagerly (no ``jit``), a function runs operation by operation, each operation compiled once per shape by
JAX, so a repeated eager call compiles nothing new. Value checks (NaN input, target range) run on concrete
arguments only.

**Precision.** Every gradient here is traced under :func:`gradjax.precision.policy`: float32-exact products
(``"highest"``) on GPUs and TPUs too, unless a matmul precision has been set (``with
jax.default_matmul_precision("tensorfloat32"):`` opts into TF32 / bfloat16 speed). So the double-backprop losses of
:mod:`gradjax.losses` are exact whatever the model; a model's own forward pass outside gradjax follows JAX's setting.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple, Union

import jax
import jax.numpy as jnp

from gradjax import _validation as V
from gradjax import precision as _precision

__all__ = [
    "PREDICTED",
    "Target",
    "TargetGradient",
    "resolve_target",
    "select",
    "per_example_sum",
    "logits_and_target_gradient",
    "logits_and_jacobian",
    "value_and_input_gradient",
    "logit_gradient",
    "logits_and_logit_gradient",
    "loss_gradient",
    "loss_and_loss_gradient",
    "probability_gradient",
    "probabilities_and_probability_gradient",
    "jacobian",
]

PREDICTED = V.PREDICTED
"""Target sentinel: use the arg-max (top) class of the logits at ``x`` (thesis §2.4.1). The same object as
``gradjax.fullgrad.PREDICTED`` and ``gradjax.saliency.PREDICTED``."""

Target = Union[jax.Array, int, str]
LogitsFn = Callable[[jax.Array], Any]
BatchMode = Literal["sum", "vmap"]

_BATCH_MODES = ("sum", "vmap")
_JACOBIAN_MODES = ("full", "target", "top")


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------
def _check_logits(logits, batch_size: int | None = None) -> None:
    if jnp.ndim(logits) != 2:
        raise ValueError(f"the model must return logits of shape [B, K]; got shape {tuple(jnp.shape(logits))}.")
    if batch_size is not None and jnp.shape(logits)[0] != batch_size:
        raise ValueError(f"the model returned {jnp.shape(logits)[0]} rows for a batch of {batch_size} examples.")
    V.check_floating(logits, "logits")


def _check_temperature(temperature) -> None:
    if V.is_concrete(temperature) and not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0; got {float(temperature)}.")


def _split_aux(out, has_aux: bool):
    if not has_aux:
        return out, None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError("with has_aux=True the function must return a pair (output, aux).")
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------------
# the one gradient primitive
# ----------------------------------------------------------------------------------------------------------
def resolve_target(logits: jax.Array, target: Target) -> jax.Array:
    """Class indices ``[B]`` (int32) for ``target`` at ``logits [B, K]``: the array itself (a scalar broadcast to the
    batch), or ``argmax_k logits[b, k]`` for :data:`PREDICTED` (thesis §2.4.1, "top class"; no gradient flows
    through the arg-max). The one target normalizer of gradjax: checks rank, dtype, batch size and, on concrete
    values, ``0 <= t < K`` (``gradjax._validation.normalize_target``)."""
    _check_logits(logits)
    if callable(target):  # a rule on the logits of the same pass, e.g. a teacher's top class
        target = target(jax.lax.stop_gradient(logits))
    target = V.normalize_target(target, logits.shape[0], logits.shape[1])
    if isinstance(target, str):
        return jnp.argmax(jax.lax.stop_gradient(logits), axis=-1).astype(jnp.int32)
    return jnp.asarray(target).astype(jnp.int32)


def select(values: jax.Array, target: jax.Array) -> jax.Array:
    """``values[b, target[b]]`` for ``values`` ``[B, K]`` and integer ``target`` ``[B]`` -> ``[B]``."""
    return jnp.take_along_axis(values, target[:, None], axis=-1)[:, 0]


def per_example_sum(a: jax.Array) -> jax.Array:
    """``[B, ...] -> [B]``: the sum over every axis but the batch axis (``<a_b, 1>`` per example)."""
    return jnp.sum(a.reshape(a.shape[0], -1), axis=1)


@_precision.exact_by_default
def _vjp(fn: Callable, primal: Any, has_aux: bool):
    """``(fn(primal), cotangent -> gradient, aux)``: the single ``jax.vjp`` every gradient of gradjax comes from.
    Traced under :func:`gradjax.precision.policy` (float32-exact products unless a matmul precision is set); the
    pullback's products inherit the forward products' precision."""
    if has_aux:
        out, pullback, aux = jax.vjp(fn, primal, has_aux=True)
    else:
        (out, pullback), aux = jax.vjp(fn, primal), None
    return out, (lambda cotangent: pullback(cotangent)[0]), aux


class TargetGradient(NamedTuple):
    """Output of :func:`logits_and_target_gradient`.

    Attributes:
      logits: ``[B, K]`` — ``f(primal)``.
      target: ``[B]`` int32 — the resolved classes ``t`` (:data:`PREDICTED` -> arg-max of ``logits``).
      gradient: the pytree of ``primal`` — ``d/d primal sum_b f_{t_b}(primal)_b``.
      aux: what ``logits_fn`` returned beside the logits (``has_aux=True``), else ``None``.
    """

    logits: jax.Array
    target: jax.Array
    gradient: Any
    aux: Any = None


def logits_and_target_gradient(logits_fn: Callable[[Any], Any], primal: Any, target: Target = PREDICTED, *,
                               has_aux: bool = False) -> TargetGradient:
    """The gradient primitive: logits, resolved target and ``d/d primal sum_b f_{t_b}(primal)_b`` from one forward
    and one backward pass.

    ``logits_fn(primal) -> logits [B, K]`` (or ``(logits, aux)`` with ``has_aux=True``, e.g. updated
    ``batch_stats`` of a train-mode pass); ``primal`` is any pytree — the input ``x [B, ...]``, or ``(x, taps)``
    for full-gradients (thesis §3.4), or a zero perturbation of a layer output for Grad-CAM. One ``jax.vjp`` of
    ``logits_fn`` at ``primal`` is pulled back with the cotangent ``onehot(t) [B, K]``, which selects logit
    ``t_b`` of example ``b``: the sum trick (see the module docstring), exact per-example gradients when examples
    are independent (eval mode). ``target`` is an int array ``[B]`` (a scalar is broadcast) or :data:`PREDICTED`
    (``t_b = argmax_k f_k``, no gradient through the arg-max), or a callable ``logits -> [B]`` evaluated on this
    pass's logits (under ``stop_gradient``).

    Low level: checks the logits' shape and the target (rank, dtype, batch size; the class range on concrete
    values) but not ``primal`` — public functions validate their inputs before calling it.
    """
    logits, pullback, aux = _vjp(logits_fn, primal, has_aux)
    t = resolve_target(logits, target)
    gradient = pullback(jax.nn.one_hot(t, logits.shape[1], dtype=logits.dtype))
    return TargetGradient(logits, t, gradient, aux)


def logits_and_jacobian(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(f(x) [B, K], J [B, K, *x.shape[1:]])`` with ``J[b, k] = grad_{x_b} f_k(x_b)``: one forward pass and ``K``
    pullbacks of the same :func:`jax.vjp` (``vmap``-ed over the one-hot cotangents ``eye(K)[k]`` broadcast over the
    batch — the sum trick, exact when examples are independent). The full input-Jacobian of thesis §2.4.1 /
    Propositions 1–2. Low level: static checks only; differentiable (double backprop)."""
    logits, pullback, _ = _vjp(logits_fn, x, False)
    _check_logits(logits, jnp.shape(x)[0])
    B, K = jnp.shape(logits)
    cot = jnp.broadcast_to(jnp.eye(K, dtype=logits.dtype)[:, None, :], (K, B, K))
    return logits, jnp.moveaxis(jax.vmap(pullback)(cot), 0, 1)  # [K, B, ...] -> [B, K, ...]


def _single(fn: Callable, has_aux: bool = False) -> Callable:
    """Turn a batched ``fn([B, ...]) -> [B, ...]`` into a per-example function (a batch of one); with
    ``has_aux`` the aux output is passed through untouched."""
    if has_aux:
        def one(xi):
            out, aux = fn(xi[None])
            return out[0], aux
        return one
    return lambda xi: jax.tree_util.tree_map(lambda a: a[0], fn(xi[None]))


def value_and_input_gradient(
    f: Callable[[jax.Array], Any],
    x: jax.Array,
    *,
    batch_mode: BatchMode = "sum",
    has_aux: bool = False,
):
    """Per-example value and input-gradient of a batched scalar function.

    ``f(x) -> [B]`` (or ``([B], aux)`` with ``has_aux``) with ``x`` ``[B, ...]``; returns
    ``(f(x) [B], ∇_{x_b} f(x)_b [B, ...])`` (and ``aux``). ``batch_mode="sum"``: ``∇_x Σ_b f(x)_b`` via one
    ``jax.vjp`` with an all-ones cotangent (valid when examples are independent); ``"vmap"``: ``vmap`` of the
    gradient of each example run as a batch of one (``aux`` then comes back stacked over examples).

    Low level (used by :mod:`gradjax.trace` inside its linearizations): static checks only (rank, dtype, shapes).
    """
    V.check_input(x, finite=False)
    V.check_choice(batch_mode, _BATCH_MODES, "batch_mode")
    B = jnp.shape(x)[0]
    if batch_mode == "sum":
        fx, pullback, aux = _vjp(f, x, has_aux)
        if jnp.shape(fx) != (B,):
            raise ValueError(f"f must return one value per example, shape ({B},); got {tuple(jnp.shape(fx))}.")
        g = pullback(jnp.ones_like(fx))
    else:
        def one(xi):
            fi, pullback, ai = _vjp(_single(f, has_aux), xi, has_aux)
            if jnp.shape(fi) != ():
                raise ValueError(f"f must return one value per example; got per-example shape {jnp.shape(fi)}.")
            return fi, pullback(jnp.ones_like(fi)), ai

        fx, g, aux = jax.vmap(one)(x)
    return (fx, g, aux) if has_aux else (fx, g)


# ----------------------------------------------------------------------------------------------------------
# logit-gradients
# ----------------------------------------------------------------------------------------------------------
def _num_classes(logits_fn, x, has_aux) -> int:
    out = jax.eval_shape(logits_fn, x)
    logits, _ = _split_aux(out, has_aux)
    _check_logits(logits, jnp.shape(x)[0])
    return logits.shape[1]


def logits_and_logit_gradient(
    logits_fn: LogitsFn,
    x: jax.Array,
    target: Target = PREDICTED,
    *,
    batch_mode: BatchMode = "sum",
    has_aux: bool = False,
):
    """Logits and the logit-gradient of the selected class, from one forward and one backward pass.

    Computes ``(f(x) [B, K], ∇_{x_b} f_{t_b}(x_b) [B, ...])`` where ``t_b = target[b]`` or, for
    :data:`PREDICTED`, ``t_b = argmax_k f_k(x_b)`` (thesis §2.4.1 "top class"; §5.2 calls ``∇_x f_i`` the
    *logit-gradient*, the score ``∇_x log p_θ(x | y=i)`` of the implicit density model of §5.3).
    With ``has_aux=True`` ``logits_fn`` returns ``(logits, aux)`` and the result is ``(logits, gradient, aux)``.

    ``batch_mode="sum"`` (default): :func:`logits_and_target_gradient` — ``jax.vjp(logits_fn, x)`` pulled back
    with the cotangent ``onehot(t)`` gives ``∇_x Σ_b f_{t_b}(x)_b``, which equals the per-example gradients when
    examples are independent (eval mode). ``batch_mode="vmap"``: the same per example, each run as a batch of one
    (for models that mix examples; ``aux`` comes back stacked over examples).
    """
    x = V.check_input(x)
    V.check_choice(batch_mode, _BATCH_MODES, "batch_mode")
    B = jnp.shape(x)[0]
    target = V.normalize_target(target, B)
    if batch_mode == "sum":
        r = logits_and_target_gradient(logits_fn, x, target, has_aux=has_aux)
        return (r.logits, r.gradient, r.aux) if has_aux else (r.logits, r.gradient)

    V.normalize_target(target, B, _num_classes(logits_fn, x, has_aux))  # class range, before vmap hides it

    def one(xi, ti):  # a batch of one: xi [1, ...], ti [1] or None
        r = logits_and_target_gradient(logits_fn, xi, PREDICTED if ti is None else ti, has_aux=has_aux)
        return r.logits, r.gradient, r.aux

    if isinstance(target, str):
        logits, g, aux = jax.vmap(lambda xi: one(xi[None], None))(x)
    else:
        logits, g, aux = jax.vmap(lambda xi, ti: one(xi[None], ti[None]))(x, jnp.asarray(target))
    logits, g = logits[:, 0], g[:, 0]
    return (logits, g, aux) if has_aux else (logits, g)


def logit_gradient(
    logits_fn: LogitsFn,
    x: jax.Array,
    target: Target = PREDICTED,
    *,
    batch_mode: BatchMode = "sum",
    has_aux: bool = False,
):
    """Logit-gradient ``∇_{x_b} f_{t_b}(x_b)`` per example, shape of ``x`` (thesis §5.2, §2.4.1); with
    ``has_aux=True`` (``logits_fn`` returns ``(logits, aux)``) the pair ``(gradient, aux)``.

    ``target``: int array ``[B]`` or :data:`PREDICTED` (arg-max class). See
    :func:`logits_and_logit_gradient` for the ``batch_mode`` options (sum trick vs ``vmap``).
    """
    out = logits_and_logit_gradient(logits_fn, x, target, batch_mode=batch_mode, has_aux=has_aux)
    return out[1:] if has_aux else out[1]


# ----------------------------------------------------------------------------------------------------------
# loss- and probability-gradients
# ----------------------------------------------------------------------------------------------------------
def _per_example(fn_of_logits: Callable, logits_fn: LogitsFn, x, target, batch_mode, temperature, has_aux):
    """Value ``[B]`` and input-gradient of ``fn_of_logits(logits/T, t)``, with the target resolved from the
    logits at the clean ``x`` (so PREDICTED is a fixed class, not a function of the perturbation)."""
    x = V.check_input(x)
    V.check_choice(batch_mode, _BATCH_MODES, "batch_mode")
    _check_temperature(temperature)
    B = jnp.shape(x)[0]
    target = V.normalize_target(target, B, _num_classes(logits_fn, x, has_aux), name="labels")
    t = None if isinstance(target, str) else jnp.asarray(target).astype(jnp.int32)

    def value(z, ti):  # z [b, ...], ti [b] or None
        logits, aux = _split_aux(logits_fn(z), has_aux)
        ti = resolve_target(logits, PREDICTED if ti is None else ti)
        v = fn_of_logits(logits / temperature, ti)
        return (v, aux) if has_aux else v

    if batch_mode == "sum":
        return value_and_input_gradient(lambda z: value(z, t), x, has_aux=has_aux)

    def one(xi, ti):
        def f1(z):
            out = value(z[None], None if ti is None else ti[None])
            return (out[0][0], out[1]) if has_aux else out[0]
        fi, pullback, ai = _vjp(f1, xi, has_aux)
        return fi, pullback(jnp.ones_like(fi)), ai

    fx, g, aux = jax.vmap(lambda xi: one(xi, None))(x) if t is None else jax.vmap(one)(x, t)
    return (fx, g, aux) if has_aux else (fx, g)


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
    has_aux: bool = False,
):
    """Per-example cross-entropy and its input-gradient (the *loss-gradient* of thesis §5.2).

    ``ℓ_b(x) = -log softmax(f(x_b)/T)_{y_b} = -f_{y_b}(x_b)/T + logsumexp_k f_k(x_b)/T``;
    returns ``(ℓ [B], ∇_{x_b} ℓ_b [B, ...])`` (and ``aux`` with ``has_aux=True``). ``labels``: int array ``[B]``
    or :data:`PREDICTED`. Softmax shift invariance (thesis §5.2, Observation): adding the same ``g(x)`` to every
    logit leaves both outputs unchanged.
    """
    return _per_example(_cross_entropy, logits_fn, x, labels, batch_mode, temperature, has_aux)


def loss_gradient(
    logits_fn: LogitsFn,
    x: jax.Array,
    labels: Target,
    *,
    temperature: float = 1.0,
    batch_mode: BatchMode = "sum",
    has_aux: bool = False,
):
    """Loss-gradient ``∇_{x_b} [-log softmax(f(x_b)/T)_{y_b}]`` per example, shape of ``x`` (thesis §5.2); with
    ``has_aux=True`` the pair ``(gradient, aux)``."""
    out = loss_and_loss_gradient(logits_fn, x, labels, temperature=temperature, batch_mode=batch_mode,
                                 has_aux=has_aux)
    return out[1:] if has_aux else out[1]


def probabilities_and_probability_gradient(
    logits_fn: LogitsFn,
    x: jax.Array,
    target: Target = PREDICTED,
    *,
    temperature: float = 1.0,
    batch_mode: BatchMode = "sum",
    has_aux: bool = False,
):
    """Softmax probability of the target class and its input-gradient.

    ``p_b = softmax(f(x_b)/T)_{t_b}`` (the ``S_s^i`` of thesis Prop. 2 / eq. 2.3); returns
    ``(p [B], ∇_{x_b} p_b [B, ...])`` (and ``aux`` with ``has_aux=True``).
    """
    return _per_example(_probability, logits_fn, x, target, batch_mode, temperature, has_aux)


def probability_gradient(
    logits_fn: LogitsFn,
    x: jax.Array,
    target: Target = PREDICTED,
    *,
    temperature: float = 1.0,
    batch_mode: BatchMode = "sum",
    has_aux: bool = False,
):
    """Probability-gradient ``∇_{x_b} softmax(f(x_b)/T)_{t_b}`` per example, shape of ``x``; with ``has_aux=True``
    the pair ``(gradient, aux)``."""
    out = probabilities_and_probability_gradient(logits_fn, x, target, temperature=temperature,
                                                 batch_mode=batch_mode, has_aux=has_aux)
    return out[1:] if has_aux else out[1]


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
    V.check_choice(mode, _JACOBIAN_MODES, "mode")
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
    x = V.check_input(x)
    V.check_choice(batch_mode, _BATCH_MODES, "batch_mode")
    if batch_mode == "sum":
        return logits_and_jacobian(logits_fn, x)[1]
    _num_classes(logits_fn, x, False)
    with _precision.policy():
        return jax.vmap(jax.jacrev(_single(logits_fn)))(x)
