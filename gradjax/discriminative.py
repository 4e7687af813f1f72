"""Discriminative pixel perturbation (thesis §5.5.2, Fig. 5.3): do a model's input-gradients rank pixels by how
much the *classifier* needs them?

For each image ``x`` with label ``y``, rank pixels by a relevance map computed from the input-gradient
``g = ∇_x f_y(x)`` of a *gradient model*, replace the ``k`` least relevant pixels (``k = round(fraction · H W)``,
all channels of a pixel together) by a fill value, and measure the accuracy of an *evaluation model* on the result:

    acc(k) = (1/B) Σ_b 1[argmax evaluation_model(x̃_b^{(k)}) = y_b].

Higher is better: the gradients pointed at pixels the classifier can do without. Fig. 5.3a uses each model's own
gradients on itself; Fig. 5.3b evaluates every model's gradients on the *baseline* model (one fixed judge of
relevance), separating "better gradients" from "a classifier more robust to missing pixels".

Settings (``THESIS`` default; ``AUTHORS`` = the authors' code):

* relevance ``"abs_sum"`` — ``Σ_c |g_c|`` per pixel (thesis / PROTOCOLS) — or ``"channel_std"`` — the standard
  deviation over channels of the *signed* gradient (authors; constant 0 on one-channel images, so it ranks nothing
  there: ties fall back to position order);
* fill ``"mean"`` — the image's own per-channel mean (thesis) — or ``0.5`` (authors);
* fractions 0.1 … 0.9 (thesis) or ``logspace(-2, 0, 25)`` (authors).

The authors' code also removes ``k − 1`` pixels instead of ``k``; this module removes exactly ``k`` (the count of
:func:`gradjax.metrics.removal_mask`) and offers no switch for the off-by-one.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from gradjax import _validation as V
from gradjax import metrics as M
from gradjax.gradients import logit_gradient

Array = jax.Array

__all__ = ["RELEVANCE", "THESIS", "AUTHORS", "relevance_map", "label_gradient_relevance", "DiscriminativeCurve",
           "discriminative_pixel_perturbation"]

RELEVANCE = ("abs_sum", "channel_std")

THESIS = dict(relevance="abs_sum", fill="mean", fractions=tuple(round(0.1 * k, 1) for k in range(1, 10)))
"""Thesis §5.5.2 / PROTOCOLS defaults."""

AUTHORS = dict(relevance="channel_std", fill=0.5, fractions=tuple(float(v) for v in np.logspace(-2, 0, 25)))
"""The authors' code (without its off-by-one)."""


def relevance_map(gradient: Array, relevance: str = "abs_sum") -> Array:
    """Per-pixel relevance ``[B, H, W]`` of an input-gradient ``[B, H, W, C]``: ``Σ_c |g_c|`` (``"abs_sum"``) or
    ``std_c(g_c)`` (``"channel_std"``, the authors')."""
    V.check_images(gradient, "gradient")
    V.check_choice(relevance, RELEVANCE, "relevance")
    if relevance == "abs_sum":
        return jnp.sum(jnp.abs(gradient), axis=-1)
    return jnp.std(gradient, axis=-1)


def label_gradient_relevance(logits_fn, x: Array, labels: Array, *, relevance: str = "abs_sum") -> Array:
    """Relevance map ``[B, H, W]`` of the label-logit input-gradient ``∇_x f_y(x)`` of ``logits_fn`` (eval mode)."""
    x = V.check_input(x, images=True)
    labels = jnp.asarray(labels)
    V.check_labels(labels, None, x.shape[0])
    return relevance_map(logit_gradient(logits_fn, x, labels.astype(jnp.int32)), relevance)


class DiscriminativeCurve(NamedTuple):
    """A discriminative pixel-perturbation curve.

    Attributes:
      fractions: ``[F]`` removal fractions.
      accuracy: ``[F]`` accuracy after each removal.
      correct: ``[F, B]`` 0/1 correctness per example.
    """

    fractions: Array
    accuracy: Array
    correct: Array


def discriminative_pixel_perturbation(evaluation_fn, x: Array, labels: Array, *, gradient_fn=None,
                                      fractions: Sequence[float] = THESIS["fractions"],
                                      relevance: str = "abs_sum",
                                      fill: Union[str, float, Array] = "mean") -> DiscriminativeCurve:
    """Accuracy of ``evaluation_fn`` after removing the least relevant pixels, ranked by the input-gradients of
    ``gradient_fn`` (default: ``evaluation_fn`` itself — Fig. 5.3a; the baseline as ``evaluation_fn`` and another
    model as ``gradient_fn`` — Fig. 5.3b). See the module docstring for the settings. Jittable."""
    x = V.check_input(x, images=True)
    labels = jnp.asarray(labels)
    rel = label_gradient_relevance(gradient_fn if gradient_fn is not None else evaluation_fn, x, labels,
                                   relevance=relevance)
    curve = M.pixel_perturbation(evaluation_fn, x, rel, fractions, most_salient=False, fill=fill, output="accuracy",
                                 labels=labels)
    return DiscriminativeCurve(curve.fractions, curve.mean, curve.values)
