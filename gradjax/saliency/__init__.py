"""Saliency maps: gradient, grad x input, integrated gradients, SmoothGrad / SmoothGrad² / VarGrad, guided
backprop, Grad-CAM and FullGrad (thesis ch. 3, eq. 3.2), with one call shape for all of them.

**The call shape.** Every method in :data:`SALIENCY_METHODS` is called as

    ``method(model, x, target=PREDICTED, *, key=None, **options) -> saliency``

* ``model`` — either a plain callable ``logits_fn(x [B, ...]) -> logits [B, K]`` (eval mode, closing over the
  parameters; enough for the gradient-only methods; an NNX model through ``nnx.split``/``nnx.merge`` works) or a
  :class:`gradjax.model.ModelHandle` ``(apply_fn, variables)`` of a Flax Linen model (needed by the methods that
  look inside the network: Grad-CAM, guided backprop and the FullGrad family, :data:`INTERNAL_METHODS`; also
  accepted by every other method, as ``handle(x)`` are its logits).
* ``x`` — ``[B, H, W, C]`` float images (NHWC).
* ``target`` — int array ``[B]`` (or a Python/0-d int, broadcast to the batch) of classes to explain, or
  :data:`PREDICTED` (the arg-max class of each example at ``x``). For path and noise methods the target is
  resolved once at the clean input ``x``, so every sample explains the same class.
* ``key`` — a ``jax.random`` key; required by the stochastic methods (:data:`STOCHASTIC_METHODS`), ignored by
  the others. No hidden randomness.
* returns ``[B, H, W]``: one spatial map per example. The gradient-type methods (``gradient``,
  ``grad_x_input``, ``integrated_gradients``, ``smoothgrad``, ``smoothgrad_sq``, ``vargrad``,
  ``guided_backprop``) reduce the channel axis with ``reduce=`` (see :func:`reduce_channels`: ``"abs_sum"``
  (default), ``"sum"`` (signed), ``"abs_max"`` (Simonyan et al. 2013), ``"sq_sum"``); ``reduce=None`` returns the
  raw attribution of shape ``x.shape`` (and then accepts any ``[B, ...]`` input, e.g. vectors for an MLP).

**One gradient primitive, one loop.** Every method is one :func:`gradjax.gradients.logits_and_target_gradient`
(one ``jax.vjp`` pulled back with the one-hot cotangent of the target: the *sum trick*, ``grad_x sum_b
f_{t_b}(x)_b``, exact per example in eval mode) of a suitable logits function, or a weighted sum of them:
path/noise methods evaluate their ``steps``/``samples`` ``chunk`` points at a time (one model call on ``chunk * B``
inputs) with a running sum (:func:`gradjax._chunking.chunked_sum`), so memory does not grow with the number of
steps/samples.

**Jit.** The methods are pure functions and never jit themselves; the caller jits, once, closing over the method
and its options (Python values: static) and passing arrays (and the handle, a pytree whose ``variables`` are
traced and ``apply_fn`` static) as arguments::

    smooth = jax.jit(lambda h, x, t, k: smoothgrad(h, x, t, key=k, samples=32))
    maps = smooth(ModelHandle(model.apply, variables), images, labels, jax.random.key(0))

or create an explicit compiled method once and reuse it for every batch (:func:`jit_method`; it owns its
compiled programs, :meth:`JitMethod.clear` drops them)::

    smooth = jit_method("smoothgrad", samples=32)
    maps = smooth(handle, images, labels, key=jax.random.key(0))

Called eagerly (no ``jit``), a method runs operation by operation — each operation compiled once per shape by JAX
(chunk loops are Python loops then), so a repeated eager call compiles nothing new — and checks values (NaN input,
target range), which ``jit`` skips (static checks — rank, dtype, batch size — run in both).

Modules: :mod:`~gradjax.saliency.postprocess` (channel reductions, upsampling, ``psi``),
:mod:`~gradjax.saliency.gradient_family`, :mod:`~gradjax.saliency.noise_family`,
:mod:`~gradjax.saliency.internal_layers` (guided backprop, Grad-CAM), :mod:`~gradjax.saliency.fullgrad_family`,
:mod:`~gradjax.saliency.registry`. Every public name is re-exported here.
"""
from gradjax.gradients import PREDICTED
from gradjax.model import ModelHandle
from gradjax.saliency.fullgrad_family import (FullGradMaps, fullgrad, fullgrad_maps, fullgrad_noabs, fullgrad_simple,
                                              smooth_fullgrad, tap_gradients)
from gradjax.saliency.gradient_family import (gradient_x_input, input_gradient, integrated_gradients,
                                              integrated_gradients_with_delta, random_saliency)
from gradjax.saliency.internal_layers import gradcam, gradcam_layers, guided_backprop
from gradjax.saliency.noise_family import noise_gradient_moments, smoothgrad, smoothgrad_squared, vargrad
from gradjax.saliency.postprocess import POSTPROCESS, REDUCTIONS, bilinear_upsample, postprocess_map, reduce_channels
from gradjax.saliency.registry import (INTERNAL_METHODS, SALIENCY_METHODS, STOCHASTIC_METHODS, JitMethod,
                                       compute_saliency, get_method, jit_method)

__all__ = [
    "PREDICTED", "ModelHandle", "SALIENCY_METHODS", "STOCHASTIC_METHODS", "INTERNAL_METHODS", "REDUCTIONS",
    "POSTPROCESS", "get_method", "compute_saliency", "JitMethod", "jit_method",
    "reduce_channels", "bilinear_upsample", "postprocess_map",
    "random_saliency", "input_gradient", "gradient_x_input", "integrated_gradients",
    "integrated_gradients_with_delta", "smoothgrad", "smoothgrad_squared", "vargrad", "noise_gradient_moments",
    "guided_backprop", "gradcam", "gradcam_layers", "FullGradMaps", "fullgrad_maps", "fullgrad",
    "fullgrad_noabs", "fullgrad_simple", "smooth_fullgrad", "tap_gradients",
]
