"""The one model interface of gradjax.

Every library function that evaluates a network accepts a *model*, which is one of:

* a plain callable ``logits_fn(x [B, ...]) -> logits [B, K]`` (eval mode, a closure over the parameters: any JAX
  function, a Flax Linen ``lambda x: model.apply(variables, x)``, an NNX model through ``nnx.merge``) — enough for
  every method that needs only input-gradients (gradients, integrated gradients, SmoothGrad, trace estimators,
  pixel perturbation, ...);
* a :class:`ModelHandle` ``(apply_fn, variables)`` of a Flax Linen model — needed by methods that look inside the
  network (bias taps for full-gradients and FullGrad, layer capture for Grad-CAM, activation interception for
  guided backprop). A handle is itself a ``logits_fn`` (``handle(x)``), so it is accepted everywhere.

:func:`as_logits_fn` and :func:`require_handle` are the two boundary helpers every module uses.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Union

import flax.linen as nn
import jax

Array = jax.Array

__all__ = ["ModelHandle", "Model", "as_logits_fn", "require_handle"]


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
