"""Backdoor discovery from per-class input-agnostic maps (seed 003) — statistics, MAD anomaly index, localization.

A trojaned classifier with a planted trigger for target class ``t`` maps *any* input carrying the small trigger
patch to ``t``. The input-agnostic perturbation of ``t`` (:func:`gradjax.input_agnostic.input_agnostic`) therefore
(i) reaches a high targeted success on random inputs at a much smaller radius than the other classes and
(ii) concentrates its energy in a compact patch at the trigger. This module turns the per-class results into

* per-class statistics (:func:`class_statistics`): the radius needed for success ``>= level`` (from the
  radius-to-success curve, log-interpolated), the area under the success curve, the energy concentration
  ``sum_{top q} h^2 / sum h^2`` of the heat map ``h`` and its trigger-like compactness
  ``max_window sum_{w x w window} h^2 / sum h^2``;
* the median-absolute-deviation anomaly index over classes (:func:`mad_anomaly_index`),
  ``a_k = |s_k - median(s)| / (1.4826 * median_j |s_j - median(s)|)`` (1.4826 makes the MAD a consistent
  estimator of the standard deviation for normal data), a class being flagged when ``a_k > 2`` on the suspicious
  side (as in Neural Cleanse, Wang et al., IEEE S&P 2019);
* trigger localization by thresholding the heat map (:func:`localize`) scored by intersection-over-union with the
  planted patch (:func:`iou`);
* a **calibrated decision** (issue 26): a per-model score from the per-class statistic — either the within-model
  MAD index above, or the class's deviation from its own distribution over *clean reference models* trained the
  same way (:func:`reference_anomaly_index`, :func:`model_score`) — flagged when it exceeds a threshold chosen on
  reference clean models for a stated false-alarm rate (:func:`false_alarm_threshold`, with the references' own
  scores taken leave-one-out, :func:`reference_scores`), and its ROC over evaluated trojaned / clean models where a
  detection counts only with the right target (:func:`roc`, :func:`detection_rates`).

All functions are pure ``jax.numpy`` (jittable) unless said otherwise; the calibration / ROC functions work on a
handful of per-model numbers and are plain NumPy.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

__all__ = ["ClassStatistics", "Detection", "radius_for_success", "success_area", "critical_index",
           "minimal_successful_map", "energy_concentration", "window_compactness", "class_statistics",
           "mad_anomaly_index", "flag_anomalies", "detect", "localize", "iou", "MAD_CONSISTENCY", "SIDES",
           "reference_anomaly_index", "model_score", "reference_scores", "false_alarm_threshold", "detection_rates",
           "roc", "ROC"]

MAD_CONSISTENCY = 1.4826
SIDES = ("low", "high", "both")


def critical_index(success: Array, level: float = 0.9) -> Array:
    """Index ``k`` of the last curve point (radii in decreasing order) before success first drops below
    ``level`` — the smallest radius on the curve that still reaches ``level``. ``[..., R] -> [...]`` int;
    ``-1`` if even the first (largest) radius falls short."""
    below = success < level
    any_below = jnp.any(below, axis=-1)
    first_below = jnp.argmax(below, axis=-1)
    return jnp.where(any_below, first_below - 1, success.shape[-1] - 1)


def radius_for_success(radii: Array, success: Array, level: float = 0.9, *, censor: float = 2.0) -> Array:
    """Radius needed for a targeted success ``>= level``, from a radius-to-success curve with radii in
    decreasing order (``InputAgnosticResult.radii / .success``, shapes ``[..., R]``).

    Between the last radius that reaches ``level`` (``r_k``) and the next smaller one (``r_{k+1}``) the success is
    interpolated linearly in ``log r``. If the smallest radius still reaches ``level``, that radius is returned (a
    censored value); if the largest radius already falls short, ``censor * radii[0]``."""
    radii, success = jnp.asarray(radii), jnp.asarray(success)
    k = critical_index(success, level)
    r_count = success.shape[-1]
    take = lambda a, i: jnp.take_along_axis(a, jnp.clip(i, 0, r_count - 1)[..., None], axis=-1)[..., 0]
    r_hi, s_hi = take(radii, k), take(success, k)
    r_lo, s_lo = take(radii, k + 1), take(success, k + 1)
    t = jnp.clip((level - s_lo) / jnp.maximum(s_hi - s_lo, 1e-12), 0.0, 1.0)
    interp = jnp.exp(jnp.log(r_lo) + t * (jnp.log(r_hi) - jnp.log(r_lo)))
    out = jnp.where(k == r_count - 1, radii[..., -1], interp)
    return jnp.where(k < 0, censor * radii[..., 0], out)


def success_area(radii: Array, success: Array) -> Array:
    """Mean success over the curve in ``log r`` (trapezoid rule, normalized by the log-radius span): 1 when every
    radius succeeds on every sample. ``[..., R] -> [...]``."""
    x = jnp.log(jnp.asarray(radii))
    s = jnp.asarray(success)
    area = jnp.sum(0.5 * (s[..., 1:] + s[..., :-1]) * jnp.abs(x[..., 1:] - x[..., :-1]), axis=-1)
    return area / jnp.maximum(jnp.abs(x[..., 0] - x[..., -1]), 1e-12)


def minimal_successful_map(curve_maps: Array, success: Array, level: float = 0.9) -> Array:
    """The perturbation at the smallest radius that still reaches ``level`` (the first curve map if none does):
    ``curve_maps [..., R, H, W, C]``, ``success [..., R] -> [..., H, W, C]``."""
    k = jnp.maximum(critical_index(success, level), 0)
    idx = k.reshape(k.shape + (1,) * (curve_maps.ndim - k.ndim))
    return jnp.take_along_axis(curve_maps, idx, axis=k.ndim)[..., 0, :, :, :]


def energy_concentration(heat: Array, fraction: float = 0.05) -> Array:
    """Share of the energy ``sum h^2`` held by the top ``fraction`` of pixels of the heat map ``[..., H, W]``."""
    e = jnp.square(heat).reshape(heat.shape[:-2] + (-1,))
    k = max(1, int(round(fraction * e.shape[-1])))
    top = lax.top_k(e, k)[0]
    return jnp.sum(top, -1) / jnp.maximum(jnp.sum(e, -1), 1e-30)


def _window_energy(heat: Array, window: int) -> Array:
    e = jnp.square(heat)
    lead = e.shape[:-2]
    e = e.reshape((-1,) + e.shape[-2:])[..., None]
    s = lax.reduce_window(e, 0.0, lax.add, (1, window, window, 1), (1, 1, 1, 1), "VALID")[..., 0]
    return s.reshape(lead + s.shape[-2:])


def window_compactness(heat: Array, window: int = 5) -> Array:
    """Trigger-like compactness: ``max over w x w windows of sum_window h^2 / sum h^2`` (1 = all energy inside
    one window). ``[..., H, W] -> [...]``."""
    s = _window_energy(heat, window)
    return jnp.max(s, axis=(-2, -1)) / jnp.maximum(jnp.sum(jnp.square(heat), axis=(-2, -1)), 1e-30)


class ClassStatistics(NamedTuple):
    """Per-class statistics ``[K]`` of input-agnostic maps (see :func:`class_statistics`)."""

    radius: Array            # radius needed for success >= level
    log_radius: Array
    success_area: Array
    concentration: Array     # energy share of the top 5 % pixels of the minimal successful map
    compactness: Array       # energy share of the best w x w window of the minimal successful map
    heatmap: Array           # [K, H, W] heat map (sum_c |rho|) of the minimal successful map


def class_statistics(result, *, level: float = 0.9, window: int = 5, top_fraction: float = 0.05) -> ClassStatistics:
    """Statistics of an all-classes :class:`~gradjax.input_agnostic.InputAgnosticResult` (fields ``[K, ...]``)."""
    r = radius_for_success(result.radii, result.success, level)
    heat = jnp.sum(jnp.abs(minimal_successful_map(result.curve_maps, result.success, level)), axis=-1)
    return ClassStatistics(radius=r, log_radius=jnp.log(r), success_area=success_area(result.radii, result.success),
                           concentration=energy_concentration(heat, top_fraction),
                           compactness=window_compactness(heat, window), heatmap=heat)


def mad_anomaly_index(values: Array) -> Array:
    """``|s_k - median(s)| / (1.4826 * MAD)``, ``MAD = median_j |s_j - median(s)|`` over the last axis.

    A MAD of zero (at least half the values equal) is floored at a tiny multiple of the scale, so equal values get
    index 0 and a value that differs from such a majority gets a very large index."""
    v = jnp.asarray(values, jnp.float32)
    med = jnp.median(v, axis=-1, keepdims=True)
    dev = jnp.abs(v - med)
    mad = jnp.median(dev, axis=-1, keepdims=True)
    floor = 1e-6 * jnp.maximum(jnp.abs(med), 1.0)
    return dev / (MAD_CONSISTENCY * jnp.maximum(mad, floor))


def flag_anomalies(values: Array, *, threshold: float = 2.0, side: str = "low") -> tuple[Array, Array]:
    """``(anomaly_index, flagged)``: flagged where the index exceeds ``threshold`` on the suspicious ``side`` of the
    median (``"low"``: smaller values are suspicious, e.g. a radius or a mask norm; ``"high"``; ``"both"``)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}; got {side!r}.")
    v = jnp.asarray(values, jnp.float32)
    a = mad_anomaly_index(v)
    med = jnp.median(v, axis=-1, keepdims=True)
    ok_side = {"low": v < med, "high": v > med, "both": jnp.ones_like(v, bool)}[side]
    return a, (a > threshold) & ok_side


class Detection(NamedTuple):
    """Outcome of :func:`detect`: anomaly_index ``[K]``, flagged ``[K]`` bool, suspect (class with the largest
    index on the suspicious side), detected (any class flagged)."""

    anomaly_index: Array
    flagged: Array
    suspect: Array
    detected: Array


def detect(values: Array, *, threshold: float = 2.0, side: str = "low") -> Detection:
    """MAD outlier test over per-class statistics ``values [K]`` (e.g. ``ClassStatistics.log_radius`` or Neural
    Cleanse mask norms)."""
    a, flagged = flag_anomalies(values, threshold=threshold, side=side)
    v = jnp.asarray(values, jnp.float32)
    med = jnp.median(v)
    on_side = {"low": v < med, "high": v > med, "both": jnp.ones_like(v, bool)}[side]
    suspect = jnp.argmax(jnp.where(on_side, a, -1.0))
    return Detection(anomaly_index=a, flagged=flagged, suspect=suspect, detected=jnp.any(flagged))


def localize(heat: Array, *, threshold: float = 0.5, area: Optional[int] = None) -> Array:
    """Boolean trigger mask from a heat map ``[..., H, W]``: pixels ``>= threshold * max`` (default), or with
    ``area`` the ``area`` hottest pixels (ties may add a few)."""
    h = jnp.asarray(heat)
    if area is not None:
        flat = h.reshape(h.shape[:-2] + (-1,))
        kth = lax.top_k(flat, int(area))[0][..., -1]
        return h >= kth[..., None, None]
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must lie in (0, 1] (a fraction of the maximum); got {threshold}.")
    return h >= threshold * jnp.max(h, axis=(-2, -1), keepdims=True)


def iou(mask_a: Array, mask_b: Array) -> Array:
    """Intersection over union of two boolean masks ``[..., H, W]`` (0 when both are empty)."""
    a, b = jnp.asarray(mask_a, bool), jnp.asarray(mask_b, bool)
    inter = jnp.sum(a & b, axis=(-2, -1))
    union = jnp.sum(a | b, axis=(-2, -1))
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 0.0)


# ------------------------------------------------------------------------------------ calibrated decision (issue 26)
def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}; got {side!r}.")


def reference_anomaly_index(values, reference, *, side: str = "low") -> np.ndarray:
    """Deviation of each class's statistic from the same class over clean reference models, in robust standard
    deviations, signed towards the suspicious ``side`` (issue 26's per-class calibration).

    The index is::

        z_k = sgn * (s_k - med_k) / (1.4826 * MAD_k),   med_k = median_r S[r, k],   MAD_k = median_r abs(S[r, k] - med_k)

    with ``sgn = -1`` for ``"low"`` (small values suspicious, e.g. a log radius or a mask norm), ``+1`` for
    ``"high"``; ``"both"`` takes ``|.|``. A zero MAD is floored as in :func:`mad_anomaly_index`.
    ``values [..., K]``, ``reference [R, K]`` (``R >= 2`` clean models) ``-> [..., K]``. NumPy."""
    _check_side(side)
    v = np.asarray(values, np.float64)
    ref = np.asarray(reference, np.float64)
    if ref.ndim != 2 or ref.shape[0] < 2:
        raise ValueError(f"reference must be [R, K] with R >= 2 clean models; got shape {ref.shape}.")
    if v.shape[-1] != ref.shape[1]:
        raise ValueError(f"values have {v.shape[-1]} classes, reference {ref.shape[1]}.")
    med = np.median(ref, axis=0)
    mad = np.median(np.abs(ref - med), axis=0)
    scale = MAD_CONSISTENCY * np.maximum(mad, 1e-6 * np.maximum(np.abs(med), 1.0))
    z = (v - med) / scale
    return {"low": -z, "high": z, "both": np.abs(z)}[side]


def model_score(values, *, side: str = "low", reference=None) -> tuple[np.ndarray, np.ndarray]:
    """``(score, suspect)`` of one or more models from their per-class statistic ``values [..., K]``: the largest
    suspicious-side anomaly index over classes and the class that attains it. Without ``reference``: the
    within-model MAD index (:func:`mad_anomaly_index`, classes on the other side of the median count as 0); with
    ``reference [R, K]`` (clean models trained the same way): :func:`reference_anomaly_index`. NumPy."""
    _check_side(side)
    v = np.asarray(values, np.float64)
    if reference is None:
        a = np.asarray(mad_anomaly_index(jnp.asarray(v, jnp.float32)), np.float64)
        med = np.median(v, axis=-1, keepdims=True)
        ok = {"low": v < med, "high": v > med, "both": np.ones(v.shape, bool)}[side]
        a = np.where(ok, a, 0.0)
    else:
        a = reference_anomaly_index(v, reference, side=side)
    return np.max(a, axis=-1), np.argmax(a, axis=-1)


def reference_scores(reference, *, side: str = "low", calibrate_on_references: bool = True) -> np.ndarray:
    """Scores ``[R]`` of the clean reference models themselves, the sample a threshold is chosen on. With
    ``calibrate_on_references`` (for :func:`model_score` with ``reference``) each model is scored against the
    *other* ``R - 1`` references (leave-one-out, so it is not compared with itself, as an unseen clean model would
    not be); otherwise with the within-model MAD index. NumPy."""
    ref = np.asarray(reference, np.float64)
    if ref.ndim != 2 or ref.shape[0] < 3:
        raise ValueError(f"reference must be [R, K] with R >= 3 clean models; got shape {ref.shape}.")
    if not calibrate_on_references:
        return model_score(ref, side=side)[0]
    idx = np.arange(ref.shape[0])
    return np.array([model_score(ref[i], side=side, reference=ref[idx != i])[0] for i in idx])


def false_alarm_threshold(scores, false_alarm: float) -> float:
    """The smallest threshold ``tau`` among the given clean-model ``scores`` such that at most
    ``floor(false_alarm * R)`` of them exceed it (a model is flagged when ``score > tau``): the empirical
    ``1 - false_alarm`` quantile, so on these models the false-alarm rate is ``<= false_alarm`` by construction.
    NumPy."""
    s = np.sort(np.asarray(scores, np.float64).ravel())
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError("scores must be a non-empty array of finite values.")
    if not 0 <= false_alarm < 1:
        raise ValueError(f"false_alarm must lie in [0, 1); got {false_alarm}.")
    allowed = int(np.floor(false_alarm * s.size + 1e-9))
    return float(s[s.size - 1 - allowed])


def detection_rates(threshold: float, trojaned_scores, correct_target, clean_scores) -> tuple[float, float]:
    """``(detection, false_alarm)`` at ``threshold``: the share of trojaned models with ``score > threshold`` *and*
    the right target (``correct_target[i]``: the model's suspect class is the planted target), and the share of
    clean models with ``score > threshold``. NumPy."""
    t = np.asarray(trojaned_scores, np.float64)
    ok = np.asarray(correct_target, bool)
    c = np.asarray(clean_scores, np.float64)
    if t.shape != ok.shape:
        raise ValueError(f"trojaned_scores {t.shape} and correct_target {ok.shape} differ in shape.")
    return float(np.mean((t > threshold) & ok)), float(np.mean(c > threshold))


class ROC(NamedTuple):
    """:func:`roc`'s result: false_alarm ``[P]`` and detection ``[P]`` (non-decreasing, from ``(0, 0)`` to
    ``(1, share of trojans with the right suspect)``), thresholds ``[P]`` (``inf`` first), auc ``float``."""

    false_alarm: np.ndarray
    detection: np.ndarray
    thresholds: np.ndarray
    auc: float


def roc(trojaned_scores, correct_target, clean_scores) -> ROC:
    """ROC of the decision ``score > threshold`` over every threshold: detection (with the right target, as in
    :func:`detection_rates`) against the false-alarm rate on clean models. ``auc`` is the trapezoid area under it
    (1 for a statistic whose every trojaned score, all with the right target, exceeds every clean one; a wrong
    target can never count, so it caps the curve at the share of right suspects). NumPy."""
    t = np.asarray(trojaned_scores, np.float64).ravel()
    c = np.asarray(clean_scores, np.float64).ravel()
    if t.size == 0 or c.size == 0:
        raise ValueError("roc needs at least one trojaned and one clean model.")
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([t, c]))[::-1], [-np.inf]])
    pts = np.array([detection_rates(th, t, np.asarray(correct_target, bool).ravel(), c) for th in thresholds])
    det, fa = pts[:, 0], pts[:, 1]
    auc = float(np.sum(0.5 * (det[1:] + det[:-1]) * np.diff(fa)))
    return ROC(false_alarm=fa, detection=det, thresholds=thresholds, auc=auc)
