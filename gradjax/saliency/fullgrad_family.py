"""FullGrad family (thesis ch. 3, eq. 3.2): FullGrad with its per-layer maps, FullGrad without abs (§3.6 / §3.10.1),
simple FullGrad and smooth FullGrad (the reference code idiap/fullgrad-saliency).

Every map is an aggregation of one :func:`gradjax.fullgrad.tap_gradients` (one forward and one backward pass giving
``grad_x f`` and ``grad_{z_l} f`` at every bias tap) or its decomposition :func:`gradjax.fullgrad.decompose`
(``f^b_l = grad_{z_l} f ⊙ b_l``). Needs a :class:`gradjax.model.ModelHandle` of a model with bias taps.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from gradjax import _validation as V
from gradjax import fullgrad as _fg
from gradjax._chunking import chunked_sum
from gradjax.gradients import PREDICTED, Target, resolve_target
from gradjax.model import require_handle
from gradjax.saliency.noise_family import NOISE_RANGES, noise_scale, noisy_inputs
from gradjax.saliency.postprocess import RESCALE_EPS, postprocess_map

Array = jax.Array

__all__ = ["FullGradMaps", "fullgrad_maps", "fullgrad", "fullgrad_noabs", "fullgrad_simple", "smooth_fullgrad",
           "tap_gradients", "SMOOTH_AVERAGES", "INPUT_SUMS"]

tap_gradients = _fg.tap_gradients

SMOOTH_AVERAGES = ("raw", "saliency")
"""What :func:`smooth_fullgrad` averages over the noise."""

INPUT_SUMS = ("after", "before")
"""Where the input term ``grad_x f ⊙ x`` ``[B, H, W, C]`` is summed over its channels, relative to ``psi``:
``"after"`` — ``sum_c psi(.)_c`` with abs and rescaling over all channels jointly, like every layer map (the reference
``FullGrad``; eq. 3.2); ``"before"`` — ``psi(sum_c (.)_c)``, the signed channel sum is taken first (the reference
``SmoothFullGrad``). They agree for 1-channel inputs."""


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


def _aggregate(input_term: Array, layer_terms: Mapping[str, Array], size, postprocess, rescale, align_corners,
               eps=RESCALE_EPS, input_sum="after"):
    """``psi(input_term) + sum_l psi(layer_terms[l])`` over the spatial terms (eq. 3.2): ``(total, input, layers)``."""
    V.check_choice(input_sum, INPUT_SUMS, "input_sum")
    kw = dict(postprocess=postprocess, rescale=rescale, align_corners=align_corners, eps=eps)
    if input_sum == "before":
        input_term = jnp.sum(input_term, axis=-1, keepdims=True)
    input_map = postprocess_map(input_term, size, **kw)
    layer_maps = {k: postprocess_map(v, size, **kw) for k, v in layer_terms.items() if v.ndim == 4}
    total = input_map
    for m in layer_maps.values():
        total = total + m
    return total, input_map, layer_maps


DEFAULT_MERGE = "none"
"""Default ``merge`` of the FullGrad maps: every conv / BatchNorm / activation bias site is a layer, the authors'
decomposition (idiap/fullgrad-saliency's ``getBiases`` lists conv and BN biases separately); ``"conv_bn"`` is the
documented alternative (see :func:`fullgrad_maps`)."""


def _prepare(model, x, method: str):
    return require_handle(model, method), V.check_input(x, images=True)


def _decompose(handle, x, target, merge):
    return _fg.decompose(_fg.tap_gradients(handle, x, target), x, merge=merge,
                         params=handle.variables.get("params", {}))


def fullgrad_maps(model, x: Array, target: Target = PREDICTED, *, key=None, postprocess: str = "abs_rescale",
                  rescale: str = "layer", merge: str = DEFAULT_MERGE, align_corners: bool = True,
                  eps: float = RESCALE_EPS, input_sum: str = "after") -> FullGradMaps:
    """FullGrad (thesis §3.4.2, eq. 3.2) with its per-layer maps:

        ``S_f(x) = psi(grad_x f(x) ⊙ x) + sum_{l in L} sum_{c in c_l} psi(f^b(x)_{l,c})``

    with ``f^b_l = grad_{z_l} f ⊙ b_l`` from :func:`gradjax.fullgrad.full_gradients` (one forward and one
    backward pass) and ``psi = bilinearUpsample o rescale o abs`` (``postprocess="abs_rescale"``). The channels of
    each term are summed (the input term too). Only spatial (convolutional) bias sites have maps; Dense biases are
    left out, as in the thesis. For ``postprocess="none"`` the pre-``psi`` terms sum (before upsampling) to
    ``f(x)`` minus the Dense terms (completeness, eq. 3.3). Needs a :class:`ModelHandle`.

    The defaults are the reference code's ``FullGrad.saliency`` (idiap/fullgrad-saliency): per example and layer,
    ``|m|`` is rescaled over all its channels jointly as ``(m - min) / (max - min + eps)`` with ``eps=1e-6``,
    upsampled bilinearly (``align_corners=True``) and summed over channels; the input term ``grad_x f ⊙ x`` is
    post-processed the same way (``input_sum="after"``; ``"before"`` sums its channels first, as the reference
    ``SmoothFullGrad``, see :data:`INPUT_SUMS`).

    Model randomization (measured, docs/RESULTS.md "The FullGrad randomization study"): on a zero- or
    reflect-padded CNN the bias terms of the intermediate layers carry a weight-independent centre prior (border
    positions reach the output through fewer paths), so the maps of a fully re-initialized VGG-9 stay rank-correlated
    ~0.8 with the trained model's on centred digits; with circular padding they decorrelate (~0.04). No
    post-processing change (dropping or down-weighting coarse layer maps) removes it; compare with the maps of a
    randomized copy of the model, and inspect ``input_map`` / ``layer_maps`` separately.

    Args:
      postprocess: ``psi``, see :data:`gradjax.saliency.postprocess.POSTPROCESS` (§3.6 variants).
      rescale: ``"layer"`` (default, the reference code) or ``"channel"`` (every channel rescaled separately).
      merge: grouping of the bias sites into layers (:func:`gradjax.fullgrad.full_gradients`). ``"none"``
        (default, since 2026-12; ``"conv_bn"`` before) makes every conv / BatchNorm / activation site a layer, as
        the reference code does for a VGG-BN (``getBiases`` lists conv and BN biases separately): the published
        FullGrad. ``"conv_bn"`` counts a convolution and its BatchNorm as one layer (the groups the model's taps
        declare, :class:`gradjax.models.layers.TapInfo`): their maps are summed before ``psi``, which is exactly
        ``grad_{z_bn} f ⊙ b_fused``, the bias-gradient of the conv+BN folded into one convolution (the
        inference-time network), so the map does not depend on how a constant is split between a conv bias that
        BatchNorm makes redundant and BatchNorm's mean and bias (a reparametrization that leaves the function
        unchanged). ``"block"`` sums per top-level module. On a network with non-zero conv biases before
        BatchNorm (any PyTorch-ported BN network) ``"none"`` and ``"conv_bn"`` differ by up to ~0.5 of the map's
        maximum; on gradjax's VGG (conv biases initialized at zero, with zero gradient through BatchNorm, so ~0
        after training) ``"none"`` adds one near-zero map per conv; with ``eps=1e-6`` each has weight
        ``~max|f^b_conv| / 1e-6`` (~1e-3 for conv biases ~1e-9), so the two nearly agree; with ``eps=0`` (or
        larger gradients) ``"none"`` stretches those round-off maps to full weight.
      eps: rescaling epsilon (:func:`gradjax.saliency.postprocess.rescale`); ``0`` = exact [0, 1] stretch (gradjax
        before 2026-11-23).
      input_sum: see :data:`INPUT_SUMS`.
    """
    handle, x = _prepare(model, x, "fullgrad")
    V.check_choice(merge, _fg.MERGE_MODES, "merge")
    dec = _decompose(handle, x, target, merge)
    total, input_map, layer_maps = _aggregate(dec.input_gradient * x, dec.bias_gradients, x.shape[1:3],
                                              postprocess, rescale, align_corners, eps, input_sum)
    return FullGradMaps(total, input_map, layer_maps, dec)


def fullgrad(model, x: Array, target: Target = PREDICTED, *, key=None, postprocess: str = "abs_rescale",
             rescale: str = "layer", merge: str = DEFAULT_MERGE, align_corners: bool = True,
             eps: float = RESCALE_EPS, input_sum: str = "after") -> Array:
    """FullGrad saliency ``[B, H, W]`` (thesis eq. 3.2); see :func:`fullgrad_maps` for the options and parts."""
    return fullgrad_maps(model, x, target, postprocess=postprocess, rescale=rescale, merge=merge,
                         align_corners=align_corners, eps=eps, input_sum=input_sum).saliency


def fullgrad_noabs(model, x: Array, target: Target = PREDICTED, *, key=None, merge: str = DEFAULT_MERGE,
                   align_corners: bool = True) -> Array:
    """FullGrad without absolute value: ``psi_m = bilinearUpsample`` (thesis §3.6 and §3.10.1, "FullGrad (no
    abs)" of Tables 3.1/3.2): signed, un-rescaled maps summed over channels and layers. ``[B, H, W]``.
    (Min-max rescaling without abs is ``fullgrad(..., postprocess="rescale")``.) Linear in the maps, so ``merge``
    does not change it."""
    return fullgrad(model, x, target, postprocess="none", merge=merge, align_corners=align_corners)


def fullgrad_simple(model, x: Array, target: Target = PREDICTED, *, key=None, postprocess: str = "abs_rescale",
                    rescale: str = "layer", align_corners: bool = True, eps: float = RESCALE_EPS,
                    input_sum: str = "after") -> Array:
    """Simple FullGrad (the ``SimpleFullGrad`` of the reference code idiap/fullgrad-saliency; not in the thesis):
    FullGrad's aggregation with each bias-gradient ``grad_{z_l} f ⊙ b_l`` replaced by the plain feature
    gradient ``grad_{z_l} f`` at every spatial bias site (conv / BatchNorm outputs, i.e. before the ReLU; also
    softplus activations' outputs):

        ``S(x) = psi(grad_x f ⊙ x) + sum_l sum_c psi(grad_{z_l} f)_c``

    It needs no bias values and satisfies no completeness property. ``[B, H, W]``. ``eps``/``input_sum``: as
    :func:`fullgrad_maps`.
    """
    handle, x = _prepare(model, x, "fullgrad_simple")
    taps = _fg.tap_gradients(handle, x, target)
    return _aggregate(taps.input_gradient * x, taps.tap_gradients, x.shape[1:3], postprocess, rescale,
                      align_corners, eps, input_sum)[0]


def smooth_fullgrad(model, x: Array, target: Target = PREDICTED, *, key=None, samples: int = 16,
                    noise_level: float = 0.15, chunk: Optional[int] = None, memory_budget: Optional[int] = None,
                    average: str = "raw", postprocess: str = "abs_rescale", rescale: str = "layer",
                    merge: str = DEFAULT_MERGE, align_corners: bool = True, eps: float = RESCALE_EPS,
                    input_sum: str = "before", noise_range: str = "batch") -> Array:
    """Smooth FullGrad (the reference code's ``SmoothFullGrad``, idiap/fullgrad-saliency; not in the thesis):
    FullGrad averaged over noisy inputs ``x + n``, ``n ~ N(0, sigma^2)``, ``samples`` draws (key required).

    Defaults follow the reference code:

      * ``noise_range="batch"``: ``sigma = noise_level * (max(x) - min(x))`` over the whole batch (the reference
        code's ``image.max() - image.min()``), so an example's noise depends on its batch; ``"example"`` uses each
        example's own range ``sigma_b = noise_level * (max(x_b) - min(x_b))`` (SmoothGrad's convention, batch-
        independent; gradjax's only rule before 2026-11-23).
      * ``input_sum="before"``: the input term ``grad_x f ⊙ (x + n)`` is summed over channels *before* abs and
        rescaling (the reference code's ``grd.sum(1)``); ``"after"`` post-processes it like a layer map and sums
        its channels afterwards, as :func:`fullgrad` (gradjax before 2026-11-23). Same for 1-channel inputs.
      * ``eps=1e-6``: the rescaling epsilon, as :func:`fullgrad_maps`.

    ``average="raw"`` (default, as the reference): average the pre-``psi`` terms ``grad_x f ⊙ (x + n)`` and every
    ``f^b_l`` over the noise, then post-process and aggregate (eq. 3.2). (The reference *sums* the terms over the
    draws; with ``eps`` that equals averaging with ``eps / samples``, a difference far below float tolerance.)
    ``average="saliency"``: average the final FullGrad maps. The target is resolved once at the clean ``x`` (the
    reference, given no target, re-takes the arg-max at every noisy input). Samples are processed ``chunk`` at a
    time with a running sum (:func:`gradjax._chunking.chunked_sum`; the library's one chunk policy: ``chunk=None``
    sizes the chunk from ``memory_budget``, default :data:`gradjax._chunking.DEFAULT_MEMORY_BUDGET`). With ``noise_level=0`` it is
    ``fullgrad(..., input_sum=input_sum)``. ``[B, H, W]``.
    """
    handle, x = _prepare(model, x, "smooth_fullgrad")
    V.check_choice(average, SMOOTH_AVERAGES, "average")
    V.check_choice(merge, _fg.MERGE_MODES, "merge")
    V.check_choice(input_sum, INPUT_SUMS, "input_sum")
    V.check_choice(noise_range, NOISE_RANGES, "noise_range")
    samples = V.check_count(samples, "samples")
    chunk = None if chunk is None else V.check_count(chunk, "chunk")
    keys = jax.random.split(V.check_key(key, "smooth_fullgrad"), samples)
    t = resolve_target(handle.logits(x), target)
    sigma = noise_scale(x, noise_level, noise_range)
    B, size = x.shape[0], x.shape[1:3]
    kw = dict(postprocess=postprocess, rescale=rescale, align_corners=align_corners, eps=eps, input_sum=input_sum)

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

    out = chunked_sum(terms, keys, jnp.full((samples,), 1.0 / samples, x.dtype), chunk=chunk,
                      memory_budget=memory_budget)
    if average == "saliency":
        return out
    return _aggregate(out[0], out[1], size, **kw)[0]
