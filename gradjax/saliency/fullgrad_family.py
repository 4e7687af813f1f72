"""FullGrad family (thesis ch. 3, eq. 3.2): FullGrad with its per-layer maps, FullGrad without abs (§3.6 / §3.10.1),
simple FullGrad and smooth FullGrad (the reference code idiap/fullgrad-saliency).

Every map is an aggregation of one :func:`gradjax.fullgrad.tap_gradients` (one forward and one backward pass giving
``grad_x f`` and ``grad_{z_l} f`` at every bias tap) or its decomposition :func:`gradjax.fullgrad.decompose`
(``f^b_l = grad_{z_l} f ⊙ b_l``). Needs a :class:`gradjax.model.ModelHandle` of a model with bias taps.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from gradjax import _validation as V
from gradjax import fullgrad as _fg
from gradjax._chunking import chunked_sum
from gradjax.gradients import PREDICTED, Target, resolve_target
from gradjax.model import require_handle
from gradjax.saliency.noise_family import noise_scale, noisy_inputs
from gradjax.saliency.postprocess import postprocess_map

Array = jax.Array

__all__ = ["FullGradMaps", "fullgrad_maps", "fullgrad", "fullgrad_noabs", "fullgrad_simple", "smooth_fullgrad",
           "tap_gradients", "SMOOTH_AVERAGES"]

tap_gradients = _fg.tap_gradients

SMOOTH_AVERAGES = ("raw", "saliency")
"""What :func:`smooth_fullgrad` averages over the noise."""


class FullGradMaps(NamedTuple):
    """FullGrad saliency with its parts (thesis eq. 3.2).

    Attributes:
      saliency: ``[B, H, W]`` — ``input_map + sum_l layer_maps[l]``.
      input_map: ``[B, H, W]`` — ``sum_c psi(grad_x f ⊙ x)_c``.
      layer_maps: ``{path: [B, H, W]}`` — ``sum_c psi(f^b_l)_c`` for each spatial (convolutional) bias site.
      decomposition: the raw :class:`gradjax.fullgrad.FullGradients` (pre-``psi``; includes the non-spatial Dense
        terms, which eq. 3.2 leaves out of the map).
    """

    saliency: Array
    input_map: Array
    layer_maps: dict
    decomposition: Any


def _aggregate(input_term: Array, layer_terms: Mapping[str, Array], size, postprocess, rescale, align_corners):
    """``psi(input_term) + sum_l psi(layer_terms[l])`` over the spatial terms (eq. 3.2): ``(total, input, layers)``."""
    kw = dict(postprocess=postprocess, rescale=rescale, align_corners=align_corners)
    input_map = postprocess_map(input_term, size, **kw)
    layer_maps = {k: postprocess_map(v, size, **kw) for k, v in layer_terms.items() if v.ndim == 4}
    total = input_map
    for m in layer_maps.values():
        total = total + m
    return total, input_map, layer_maps


def _prepare(model, x, method: str):
    return require_handle(model, method), V.check_input(x, images=True)


def _decompose(handle, x, target, merge):
    return _fg.decompose(_fg.tap_gradients(handle, x, target), x, merge=merge,
                         params=handle.variables.get("params", {}))


def fullgrad_maps(model, x: Array, target: Target = PREDICTED, *, key=None, postprocess: str = "abs_rescale",
                  rescale: str = "layer", merge: str = "none", align_corners: bool = True) -> FullGradMaps:
    """FullGrad (thesis §3.4.2, eq. 3.2) with its per-layer maps:

        ``S_f(x) = psi(grad_x f(x) ⊙ x) + sum_{l in L} sum_{c in c_l} psi(f^b(x)_{l,c})``

    with ``f^b_l = grad_{z_l} f ⊙ b_l`` from :func:`gradjax.fullgrad.full_gradients` (one forward and one
    backward pass) and ``psi = bilinearUpsample o rescale o abs`` (``postprocess="abs_rescale"``). The channels of
    each term are summed (the input term too). Only spatial (convolutional) bias sites have maps; Dense biases are
    left out, as in the thesis. ``merge`` groups bias sites into layers (``"none"``: every conv / BatchNorm /
    activation site is a layer, as in the reference code; ``"conv_bn"``, ``"block"``: see
    :func:`gradjax.fullgrad.full_gradients`). For ``postprocess="none"`` the pre-``psi`` terms sum (before
    upsampling) to ``f(x)`` minus the Dense terms (completeness, eq. 3.3). Needs a :class:`ModelHandle`.
    """
    handle, x = _prepare(model, x, "fullgrad")
    V.check_choice(merge, _fg.MERGE_MODES, "merge")
    dec = _decompose(handle, x, target, merge)
    total, input_map, layer_maps = _aggregate(dec.input_gradient * x, dec.bias_gradients, x.shape[1:3],
                                              postprocess, rescale, align_corners)
    return FullGradMaps(total, input_map, layer_maps, dec)


def fullgrad(model, x: Array, target: Target = PREDICTED, *, key=None, postprocess: str = "abs_rescale",
             rescale: str = "layer", merge: str = "none", align_corners: bool = True) -> Array:
    """FullGrad saliency ``[B, H, W]`` (thesis eq. 3.2); see :func:`fullgrad_maps` for the options and parts."""
    return fullgrad_maps(model, x, target, postprocess=postprocess, rescale=rescale, merge=merge,
                         align_corners=align_corners).saliency


def fullgrad_noabs(model, x: Array, target: Target = PREDICTED, *, key=None, merge: str = "none",
                   align_corners: bool = True) -> Array:
    """FullGrad without absolute value: ``psi_m = bilinearUpsample`` (thesis §3.6 and §3.10.1, "FullGrad (no
    abs)" of Tables 3.1/3.2): signed, un-rescaled maps summed over channels and layers. ``[B, H, W]``.
    (Min-max rescaling without abs is ``fullgrad(..., postprocess="rescale")``.)"""
    return fullgrad(model, x, target, postprocess="none", merge=merge, align_corners=align_corners)


def fullgrad_simple(model, x: Array, target: Target = PREDICTED, *, key=None, postprocess: str = "abs_rescale",
                    rescale: str = "layer", align_corners: bool = True) -> Array:
    """Simple FullGrad (the ``SimpleFullGrad`` of the reference code idiap/fullgrad-saliency; not in the thesis):
    FullGrad's aggregation with each bias-gradient ``grad_{z_l} f ⊙ b_l`` replaced by the plain feature
    gradient ``grad_{z_l} f`` at every spatial bias site (conv / BatchNorm outputs, i.e. before the ReLU; also
    softplus activations' outputs):

        ``S(x) = psi(grad_x f ⊙ x) + sum_l sum_c psi(grad_{z_l} f)_c``

    It needs no bias values and satisfies no completeness property. ``[B, H, W]``.
    """
    handle, x = _prepare(model, x, "fullgrad_simple")
    taps = _fg.tap_gradients(handle, x, target)
    return _aggregate(taps.input_gradient * x, taps.tap_gradients, x.shape[1:3], postprocess, rescale,
                      align_corners)[0]


def smooth_fullgrad(model, x: Array, target: Target = PREDICTED, *, key=None, samples: int = 16,
                    noise_level: float = 0.15, chunk: int = 4, average: str = "raw",
                    postprocess: str = "abs_rescale", rescale: str = "layer", merge: str = "none",
                    align_corners: bool = True) -> Array:
    """Smooth FullGrad: FullGrad averaged over noisy inputs ``x + n``, ``n ~ N(0, sigma_b^2)``,
    ``sigma_b = noise_level * (max(x_b) - min(x_b))`` per example, ``samples`` draws (key required).

    ``average="raw"`` (default, as the reference ``SmoothFullGrad``): average the pre-``psi`` terms
    ``grad_x f ⊙ (x + n)`` and every ``f^b_l`` over the noise, then post-process and aggregate (eq. 3.2).
    ``average="saliency"``: average the final FullGrad maps. The target is resolved once at the clean ``x``.
    Samples are processed ``chunk`` at a time with a running sum (:func:`gradjax._chunking.chunked_sum`).
    ``[B, H, W]``.
    """
    handle, x = _prepare(model, x, "smooth_fullgrad")
    V.check_choice(average, SMOOTH_AVERAGES, "average")
    V.check_choice(merge, _fg.MERGE_MODES, "merge")
    samples = V.check_count(samples, "samples")
    chunk = V.check_count(chunk, "chunk")
    keys = jax.random.split(V.check_key(key, "smooth_fullgrad"), samples)
    t = resolve_target(handle.logits(x), target)
    sigma = noise_scale(x, noise_level)
    B, size = x.shape[0], x.shape[1:3]
    kw = dict(postprocess=postprocess, rescale=rescale, align_corners=align_corners)

    def terms(kc):  # c keys -> per-sample terms with a leading axis c
        c = kc.shape[0]
        xn = noisy_inputs(kc, x, sigma)
        dec = _decompose(handle, xn, jnp.tile(t, c), merge)
        inp = dec.input_gradient * xn
        layers = {k: v for k, v in dec.bias_gradients.items() if v.ndim == 4}
        if average == "saliency":
            return _aggregate(inp, layers, size, **kw)[0].reshape((c, B) + tuple(size))
        split = lambda a: a.reshape((c, B) + a.shape[1:])  # noqa: E731
        return split(inp), {k: split(v) for k, v in layers.items()}

    out = chunked_sum(terms, keys, jnp.full((samples,), 1.0 / samples, x.dtype), chunk=chunk)
    if average == "saliency":
        return out
    return _aggregate(out[0], out[1], size, **kw)[0]
