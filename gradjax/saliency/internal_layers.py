"""Internal-layer methods: guided backpropagation (Springenberg et al. 2015) and Grad-CAM (Selvaraju et al. 2017).

Both look inside a Flax Linen network through :func:`flax.linen.intercept_methods` and so need a
:class:`gradjax.model.ModelHandle`; both are one :func:`gradjax.gradients.logits_and_target_gradient` of a modified
logits function (a swapped backward rule; a zero perturbation added to a layer output).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from gradjax import _validation as V
from gradjax.gradients import PREDICTED, Target, logits_and_target_gradient
from gradjax.model import ModelHandle, module_calls, module_path, require_handle
from gradjax.models.layers import Activation
from gradjax.saliency.postprocess import bilinear_upsample, reduce_channels

Array = jax.Array

__all__ = ["guided_backprop", "guided_interceptor", "gradcam", "gradcam_layers"]


# ----------------------------------------------------------------------------------------------------------------
# Guided backprop
# ----------------------------------------------------------------------------------------------------------------

@jax.custom_vjp
def _guided_relu(z):
    return jax.nn.relu(z)


def _guided_relu_fwd(z):
    return jax.nn.relu(z), z


def _guided_relu_bwd(z, g):
    # ReLU's backward rule (z > 0) combined with the deconvnet rule (g > 0): Springenberg et al. 2015.
    return (jnp.where((z > 0) & (g > 0), g, jnp.zeros_like(g)),)


_guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)


@jax.custom_vjp
def _guided_softplus(z, beta):
    return jax.nn.softplus(beta * z) / beta


def _guided_softplus_fwd(z, beta):
    return jax.nn.softplus(beta * z) / beta, (z, beta)


def _guided_softplus_bwd(res, g):
    z, beta = res
    return (jnp.where(g > 0, g * jax.nn.sigmoid(beta * z), jnp.zeros_like(g)), jnp.zeros_like(beta))


_guided_softplus.defvjp(_guided_softplus_fwd, _guided_softplus_bwd)


def guided_interceptor(fired: Optional[list] = None):
    """A Linen method interceptor that swaps every :class:`gradjax.models.layers.Activation` for its guided
    version (same forward pass, guided backward rule); the kind of every swapped activation is appended to
    ``fired`` (at trace time), so the caller can tell whether the model had any."""
    fired = [] if fired is None else fired

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, Activation):
            z = args[0]
            if module.kind == "relu":
                fired.append("relu")
                return _guided_relu(z)
            if module.kind == "softplus":
                fired.append("softplus")
                return _guided_softplus(z, jnp.asarray(module.beta, z.dtype))
        return next_fun(*args, **kwargs)

    return intercept


def guided_backprop(model, x: Array, target: Target = PREDICTED, *, key=None,
                    reduce: Optional[str] = "abs_sum") -> Array:
    """Guided backpropagation (Springenberg et al. 2015): the input-gradient with every ReLU's backward rule
    ``g_in = g_out * [z > 0]`` replaced by ``g_in = g_out * [z > 0] * [g_out > 0]``.

    The forward pass is unchanged. Implemented by intercepting ``__call__`` of every
    :class:`gradjax.models.layers.Activation` with :func:`flax.linen.intercept_methods` and swapping in a ReLU with
    a :func:`jax.custom_vjp` backward rule (the model code is not modified). Softplus activations get the analogous
    rule ``g_in = g_out * sigmoid(beta z) * [g_out > 0]``. Needs a :class:`ModelHandle` of a model whose
    non-linearities are ``Activation`` modules: a model that calls e.g. ``nn.relu`` directly cannot be intercepted
    and raises a ``ValueError`` (instead of silently returning the plain gradient). ``[B, H, W]``.
    """
    handle = require_handle(model, "guided_backprop")
    x = V.check_input(x, images=reduce is not None, min_rank=2)
    fired: list = []
    intercept = guided_interceptor(fired)
    r = logits_and_target_gradient(lambda z: handle.logits(z, interceptor=intercept), x, target)
    if not fired:
        raise ValueError(
            "guided_backprop found no gradjax.models.layers.Activation module to intercept in this model (it applies "
            "its non-linearities another way, e.g. nn.relu called directly), so the result would be the plain "
            "input-gradient. Build the model with Activation layers (all gradjax.models do) or use input_gradient.")
    return reduce_channels(r.gradient, reduce)


# ----------------------------------------------------------------------------------------------------------------
# Grad-CAM
# ----------------------------------------------------------------------------------------------------------------

def gradcam_layers(model: ModelHandle, x: Array) -> list[tuple[str, tuple]]:
    """Modules of ``model`` with their output shapes, in the order their ``__call__`` returns:
    ``[(path, shape), ...]`` (paths joined with ``"/"``, e.g. ``"block3"``, ``"block3/conv"``). Nothing is
    computed (:func:`gradjax.model.module_calls`)."""
    handle = require_handle(model, "gradcam_layers")
    return module_calls(handle, V.check_input(x, min_rank=2, finite=False))


def _resolve_layer(handle: ModelHandle, x: Array, layer) -> tuple[str, tuple]:
    layers = module_calls(handle, x)
    spatial = [(p, s) for p, s in layers if len(s) == 4]
    if layer is None:
        if not spatial:
            raise ValueError("gradcam: the model has no module with a spatial [B, h, w, c] output.")
        return spatial[-1]
    path = layer if isinstance(layer, str) else "/".join(layer)
    hits = [(p, s) for p, s in layers if p == path]
    if not hits:
        names = ", ".join(sorted({p for p, s in spatial}))
        raise ValueError(f"gradcam: no module at path {path!r}; modules with spatial outputs: {names}.")
    if len(hits) > 1:
        raise ValueError(f"gradcam: module {path!r} is called {len(hits)} times; choose a module called once.")
    if len(hits[0][1]) != 4:
        raise ValueError(f"gradcam: module {path!r} outputs shape {hits[0][1]}, not a spatial map [B, h, w, c].")
    return hits[0]


def gradcam(model, x: Array, target: Target = PREDICTED, *, key=None, layer=None, relu: bool = True,
            upsample: bool = True, align_corners: bool = True) -> Array:
    """Grad-CAM (Selvaraju et al. 2017): ``relu(sum_c w_c A_c)`` with ``w_c = mean_{h,w} d f_t / d A_{hwc}``.

    ``A = [B, h, w, c]`` is the output of the module at path ``layer`` (e.g. ``"block3"`` of a VGG,
    ``"stage3_block1"`` of the ResNet; default: the last module, in call order, with a spatial output — the
    last convolutional block). The activation and its gradient come from one forward/backward pass: a Linen
    method interceptor adds a zero array to that module's output and the gradient w.r.t. it is ``d f_t / d A``.
    The map is bilinearly upsampled to the input size (``upsample=False``: ``[B, h, w]``). Needs a
    :class:`ModelHandle`. ``[B, H, W]``, non-negative when ``relu=True``.
    """
    handle = require_handle(model, "gradcam")
    x = V.check_input(x, images=True)
    path, shape = _resolve_layer(handle, x, layer)

    def logits_and_activation(delta):
        captured = []

        def intercept(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and module_path(context.module) == path:
                captured.append(out)
                return out + delta
            return out

        return handle.logits(x, interceptor=intercept), captured[0]

    r = logits_and_target_gradient(logits_and_activation, jnp.zeros(shape, x.dtype), target, has_aux=True)
    weights = jnp.mean(r.gradient, axis=(1, 2))  # [B, c]
    cam = jnp.einsum("bhwc,bc->bhw", r.aux, weights)
    if relu:
        cam = jax.nn.relu(cam)
    if upsample:
        cam = bilinear_upsample(cam, x.shape[1:3], align_corners=align_corners)
    return cam
