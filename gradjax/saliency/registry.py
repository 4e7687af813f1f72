"""The saliency registry: every method under one name and one call shape (see :mod:`gradjax.saliency`)."""
from __future__ import annotations

from typing import Callable, Union

import jax

from gradjax.gradients import PREDICTED, Target
from gradjax.saliency.fullgrad_family import fullgrad, fullgrad_noabs, fullgrad_simple, smooth_fullgrad
from gradjax.saliency.gradient_family import gradient_x_input, input_gradient, integrated_gradients, random_saliency
from gradjax.saliency.internal_layers import gradcam, guided_backprop
from gradjax.saliency.noise_family import smoothgrad, smoothgrad_squared, vargrad

Array = jax.Array

__all__ = ["SALIENCY_METHODS", "STOCHASTIC_METHODS", "INTERNAL_METHODS", "get_method", "compute_saliency",
           "JitMethod", "jit_method"]

SALIENCY_METHODS: dict[str, Callable[..., Array]] = {
    "random": random_saliency,
    "gradient": input_gradient,
    "grad_x_input": gradient_x_input,
    "integrated_gradients": integrated_gradients,
    "smoothgrad": smoothgrad,
    "smoothgrad_sq": smoothgrad_squared,
    "vargrad": vargrad,
    "guided_backprop": guided_backprop,
    "gradcam": gradcam,
    "fullgrad": fullgrad,
    "fullgrad_noabs": fullgrad_noabs,
    "fullgrad_simple": fullgrad_simple,
    "smooth_fullgrad": smooth_fullgrad,
}
"""Every method as ``method(model, x, target=PREDICTED, *, key=None, **options) -> [B, H, W]``."""

STOCHASTIC_METHODS = frozenset({"random", "smoothgrad", "smoothgrad_sq", "vargrad", "smooth_fullgrad"})
"""Methods that need ``key``."""

INTERNAL_METHODS = frozenset({"guided_backprop", "gradcam", "fullgrad", "fullgrad_noabs", "fullgrad_simple",
                              "smooth_fullgrad"})
"""Methods that need a :class:`gradjax.model.ModelHandle` (the others also take a plain logits callable)."""


def get_method(name: str) -> Callable[..., Array]:
    """The saliency function registered under ``name`` (see :data:`SALIENCY_METHODS`)."""
    try:
        return SALIENCY_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown saliency method {name!r}; choose one of {', '.join(SALIENCY_METHODS)}.") from None


def compute_saliency(name: str, model, x: Array, target: Target = PREDICTED, *, key=None, **options) -> Array:
    """``SALIENCY_METHODS[name](model, x, target, key=key, **options)``."""
    return get_method(name)(model, x, target, key=key, **options)


class JitMethod:
    """A saliency method with fixed options, compiled by :func:`jax.jit` — an explicit object the caller creates
    and owns (nothing in gradjax jits or caches behind the caller's back).

    ``JitMethod(method, **options)(model, x, target=PREDICTED, *, key=None) -> [B, H, W]`` computes
    ``method(model, x, target, key=key, **options)`` as one compiled program per input shape. ``model`` must be a
    pytree (a :class:`gradjax.model.ModelHandle`: its ``variables`` are traced, ``apply_fn`` is static); close over
    a plain logits callable yourself (``jax.jit(lambda x: input_gradient(f, x))``). :data:`PREDICTED` and an int
    array ``target`` each get their own compiled function. The compiled programs live in this object's two
    ``jax.jit`` caches (bounded by the shapes you call it with) and go away with it, or with :meth:`clear`.
    Under ``jit`` only static checks run (rank, dtype, batch size), not the value checks of an eager call.
    """

    def __init__(self, method: Union[str, Callable[..., Array]], **options):
        self.method = get_method(method) if isinstance(method, str) else method
        self.options = dict(options)
        fn, opts = self.method, self.options
        self._with_target = jax.jit(lambda model, x, target, key: fn(model, x, target, key=key, **opts))
        self._predicted = jax.jit(lambda model, x, key: fn(model, x, PREDICTED, key=key, **opts))

    def __call__(self, model, x: Array, target: Target = PREDICTED, *, key=None) -> Array:
        if isinstance(target, str):
            if target != PREDICTED:
                raise ValueError(f"target must be an int array [B] or gradjax.saliency.PREDICTED; got {target!r}.")
            return self._predicted(model, x, key)
        return self._with_target(model, x, target, key)

    def clear(self) -> None:
        """Drop the compiled programs."""
        self._with_target.clear_cache()
        self._predicted.clear_cache()

    def __repr__(self) -> str:
        return f"JitMethod({getattr(self.method, '__name__', self.method)!s}, **{self.options})"


def jit_method(method: Union[str, Callable[..., Array]], **options) -> JitMethod:
    """``JitMethod(method, **options)``: e.g. ``sg = jit_method("smoothgrad", samples=32)``, then
    ``sg(handle, x, labels, key=key)`` compiles once per shape and is reused for every batch."""
    return JitMethod(method, **options)
