"""The one model interface of gradjax.

Every library function that evaluates a network accepts a *model*, which is one of:

* a plain callable ``logits_fn(x [B, ...]) -> logits [B, K]`` (eval mode, a closure over the parameters: any JAX
  function, a Flax Linen ``lambda x: model.apply(variables, x)``, an NNX model through ``nnx.merge``) — enough for
  every method that needs only input-gradients (gradients, integrated gradients, SmoothGrad, trace estimators,
  pixel perturbation, ...);
* a :class:`ModelHandle` ``(apply_fn, variables)`` of a Flax Linen model — needed by methods that look inside the
  network (bias taps for full-gradients and FullGrad, layer capture for Grad-CAM, activation interception for
  guided backprop). A handle is itself a ``logits_fn`` (``handle(x)``), so it is accepted everywhere.

:func:`as_logits_fn` and :func:`require_handle` are the two boundary helpers every module uses;
:func:`module_calls` lists a handle's layers (layer capture for Grad-CAM and the sanity check).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Union

import flax
import flax.linen as nn
import jax

Array = jax.Array

__all__ = ["ModelHandle", "Model", "as_logits_fn", "require_handle", "module_path", "module_calls", "BN_POLICIES", "MOMENTS", "apply_train",
           "apply_frozen", "apply_eval", "extra_pass_fn"]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class ModelHandle:
    """A Linen model bound to its variables: ``ModelHandle(model.apply, variables)``.

    Attributes:
      apply_fn: ``model.apply`` (any callable ``apply_fn(variables, x, **apply_kwargs, [mutable=...])``
        following the Linen ``apply`` convention). Static under ``jit`` (pytree auxiliary data).
      variables: ``{'params': ..., 'batch_stats': ...}``; the ``'perturbations'``/``'biases'`` collections that
        ``model.init`` returns are dropped (they are rebuilt per batch when needed). The pytree leaves.
      apply_kwargs: extra keyword arguments of ``apply_fn`` as a tuple of ``(name, value)`` pairs (hashable);
        default ``(("train", False),)`` — eval mode, so that examples are independent.

    ``handle(x)`` / ``handle.logits(x)`` is the plain ``logits_fn`` the gradient-only methods need. A handle is a
    pytree (``variables`` are its leaves, ``apply_fn`` is static), so it can be passed through ``jax.jit``.
    """

    apply_fn: Callable
    variables: Any
    apply_kwargs: tuple = (("train", False),)

    def __post_init__(self):
        if not callable(self.apply_fn):
            raise ValueError(f"ModelHandle.apply_fn must be callable (e.g. model.apply); got {type(self.apply_fn)}.")
        if isinstance(self.apply_kwargs, Mapping):
            object.__setattr__(self, "apply_kwargs", tuple(sorted(self.apply_kwargs.items())))
        if isinstance(self.variables, Mapping):
            object.__setattr__(self, "variables",
                               {k: v for k, v in self.variables.items() if k not in ("perturbations", "biases")})

    def tree_flatten(self):
        return (self.variables,), (self.apply_fn, self.apply_kwargs)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        object.__setattr__(obj, "apply_fn", aux[0])
        object.__setattr__(obj, "variables", children[0])
        object.__setattr__(obj, "apply_kwargs", aux[1])
        return obj

    @property
    def kwargs(self) -> dict:
        """``apply_kwargs`` as a dict."""
        return dict(self.apply_kwargs)

    def logits(self, x: Array, *, interceptor: Optional[Callable] = None) -> Array:
        """``apply_fn(variables, x, **apply_kwargs) -> logits [B, K]``, optionally under a Linen method
        interceptor (:func:`flax.linen.intercept_methods`)."""
        if interceptor is None:
            return self.apply_fn(self.variables, x, **self.kwargs)
        with nn.intercept_methods(interceptor):
            return self.apply_fn(self.variables, x, **self.kwargs)

    def replace(self, **changes) -> "ModelHandle":
        """A copy with some fields replaced, e.g. ``handle.replace(variables=new)``."""
        return dataclasses.replace(self, **changes)

    __call__ = logits


Model = Union[Callable[[Array], Array], ModelHandle]
"""What library functions accept: a ``logits_fn`` or a :class:`ModelHandle`."""


def as_logits_fn(model: Model) -> Callable[[Array], Array]:
    """The eval-mode ``x -> logits`` function of ``model`` (a handle's :meth:`ModelHandle.logits`, or the callable)."""
    if isinstance(model, ModelHandle):
        return model.logits
    if callable(model):
        return model
    raise ValueError(f"model must be a logits callable or a gradjax.model.ModelHandle; got {type(model).__name__}.")


def require_handle(model: Model, method: str) -> ModelHandle:
    """``model`` itself if it is a :class:`ModelHandle`, else a ``ValueError`` naming ``method`` and the fix."""
    if not isinstance(model, ModelHandle):
        raise ValueError(
            f"{method} needs the model's internals: pass gradjax.model.ModelHandle(model.apply, variables) "
            f"instead of a logits callable (got {type(model).__name__}).")
    return model


def module_path(module: nn.Module) -> str:
    """A Linen module's path inside its model, joined with ``"/"`` (e.g. ``"block3/conv"``; ``""`` for the root)."""
    return "/".join(str(p) for p in module.path)


def module_calls(model: Model, x) -> list[tuple[str, tuple]]:
    """Layer capture: every submodule call of the handle's forward pass at ``x``'s shape, in the order the calls
    return, as ``[(path, output shape), ...]`` (paths as :func:`module_path`; the root call is left out; a module
    called twice appears twice). Nothing is computed (:func:`jax.eval_shape`). Used by Grad-CAM's layer choice and
    the sanity check's layer order."""
    handle = require_handle(model, "module_calls")
    seen: list = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and hasattr(out, "shape"):
            seen.append((module_path(context.module), tuple(out.shape)))
        return out

    jax.eval_shape(lambda v, z: handle.replace(variables=v).logits(z, interceptor=record), handle.variables,
                   jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x)))
    return [(p, s) for p, s in seen if p]


# ------------------------------------------------------------------------ Forward modes and the BatchNorm policy
# A Linen model following gradjax's convention (``apply_fn(variables, x, train=bool)``, BatchNorm =
# ``gradjax.models.TappedBatchNorm``) can be evaluated three ways. ``model_state`` is the dict of the model's
# non-param collections, e.g. ``{"batch_stats": {...}}``, or ``{}`` for a model without state.
#
# * train:  BatchNorm normalizes with the batch's own moments and updates the running statistics; examples are
#           coupled, so ``grad_x sum_i f_i(x)`` is *not* the per-example gradient (the "sum trick" mixes examples);
# * frozen: BatchNorm normalizes with ``stop_gradient`` of moments recorded by a train-mode pass; every layer is a
#           fixed map per example, so ``grad_x sum_i f_i(x)`` gives exact per-example gradients, and the logits
#           equal those of the train-mode pass that recorded the moments;
# * eval:   BatchNorm uses the running statistics.
#
# An *extra pass* (a noisy or double-backprop pass of a regularizer, next to the clean train-mode pass of the
# objective) chooses one of them with a policy, :data:`BN_POLICIES`.

from gradjax.models.layers import MOMENTS  # noqa: E402  the collection of recorded batch moments (by module path)

BN_POLICIES = ("frozen", "train", "eval")
"""BatchNorm policies of an extra pass (:func:`extra_pass_fn`): ``"frozen"`` (default; the clean pass's batch
moments under ``stop_gradient``: exact per-example gradients), ``"train"`` (its own batch moments and a running-
statistics update: the thesis authors' ch. 5 code), ``"eval"`` (running statistics)."""

PyTree = Any


def _variables(params: PyTree, model_state: Mapping) -> dict:
    if not isinstance(model_state, Mapping):
        raise ValueError(f"model_state must be a dict of the model's non-param collections (e.g. "
                         f"{{'batch_stats': ...}}, or {{}}); got {type(model_state).__name__}.")
    return {"params": params, **model_state}


def apply_train(apply_fn: Callable, params: PyTree, model_state: Mapping, x: Array) -> tuple[Array, dict, PyTree]:
    """Train-mode forward pass: ``(logits [B, K], new_model_state, moments)``.

    Every BatchNorm normalizes with the moments of this batch ``mean = 1/N sum x``, ``var = 1/N sum x^2 - mean^2``
    over all axes but the channel axis (global over devices under ``pmap``/sharding) and updates its running
    averages, which come back in ``new_model_state`` (same keys as ``model_state``). ``moments`` is the pytree
    ``{module path: {"mean": [C], "var": [C]}}`` of those batch moments, for :func:`apply_frozen`; ``{}`` for a
    model without BatchNorm.
    """
    variables = _variables(params, model_state)
    logits, mutated = apply_fn(variables, x, train=True, mutable=list(model_state) + [MOMENTS])
    new_state = {k: mutated.get(k, v) for k, v in model_state.items()}
    return logits, new_state, mutated.get(MOMENTS, {})


def apply_frozen(apply_fn: Callable, params: PyTree, model_state: Mapping, moments: PyTree, x: Array) -> Array:
    """Frozen-moments forward pass: ``logits [B, K]``, every BatchNorm computing
    ``y = gamma (x - sg(mean)) / sqrt(sg(var) + eps) + beta`` with ``(mean, var)`` from ``moments``
    (:func:`apply_train`'s third output) and ``sg = stop_gradient``; running statistics are neither used nor
    updated. Examples are independent: ``grad_x sum_i f(x)_{i, y_i}`` is the stack of per-example gradients and
    equals ``vmap`` over single examples. On the batch that recorded ``moments`` the logits equal the train-mode
    logits."""
    variables = _variables(params, model_state)
    if moments:
        variables[MOMENTS] = moments
    try:
        return apply_fn(variables, x, train=True)
    except flax.errors.ModifyScopeVariableError as e:
        raise ValueError(
            "apply_frozen: a BatchNorm found no recorded moments (it tried to update its running statistics). Pass "
            "the `moments` returned by apply_train for the same model (one {'mean', 'var'} per BatchNorm, keyed by "
            f"module path); got moments with top-level keys {sorted(moments) if moments else []}.") from e


def apply_eval(apply_fn: Callable, params: PyTree, model_state: Mapping, x: Array) -> Array:
    """Eval-mode forward pass with the running statistics: ``logits [B, K]`` (examples independent)."""
    return apply_fn(_variables(params, model_state), x, train=False)


def extra_pass_fn(apply_fn: Callable, params: PyTree, model_state: Mapping, moments: PyTree,
                  policy: str = "frozen") -> Callable[[Array], tuple[Array, dict]]:
    """The logits function ``fn(x) -> (logits, model_state_after)`` of an extra pass under a BatchNorm policy.

    * ``"frozen"``: :func:`apply_frozen` with ``moments``; ``model_state_after = model_state``. Exact
      per-example input-gradients (use this for gradient-norm, Jacobian-matching and score-matching terms).
    * ``"train"``: :func:`apply_train` on ``x`` itself (its own batch moments; ``moments`` is ignored) and the
      running statistics updated once more — the behaviour of the thesis authors' ch. 5 code. Per-example
      gradients through this pass mix examples. Pass the clean pass's new model state as ``model_state`` to chain
      the two updates.
    * ``"eval"``: :func:`apply_eval`; ``model_state_after = model_state``.

    Use with ``jax.vjp(fn, x, has_aux=True)`` or ``jax.grad(lambda x: g(fn(x)[0]))``.
    """
    if policy not in BN_POLICIES:
        raise ValueError(f"unknown BatchNorm policy {policy!r}; choose one of {BN_POLICIES}.")
    if policy == "frozen":
        return lambda x: (apply_frozen(apply_fn, params, model_state, moments, x), model_state)
    if policy == "train":
        return lambda x: apply_train(apply_fn, params, model_state, x)[:2]
    return lambda x: (apply_eval(apply_fn, params, model_state, x), model_state)
