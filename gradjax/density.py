"""The implicit class-conditional density model of a classifier (thesis ch. 5, §5.3, Fig. 5.1, Table 5.1).

A classifier's logits define, for each class ``i``, an unnormalized log-density

    log p_θ(x | y = i) = f_i(x) − log Z_i,      Z_i = ∫ exp(f_i(x)) dx,

known only up to the constant ``log Z_i``. What can be measured without ``Z_i``:

* :func:`log_density` — ``f_i(x)`` (the log-density up to ``log Z_i``);
* :func:`density_ratios` — ``p(x + η | i) / p(x | i) = exp(f_i(x + η) − f_i(x))`` for Gaussian ``η ~ N(0, s² I)``
  over a grid of noise standard deviations ``s`` (Fig. 5.1): a model whose density is concentrated on the data has
  ratios well below 1 as soon as ``s > 0``; the thesis finds score-matched and gradient-norm models keep the ratio
  flatter over a wider range. For a quadratic ``f``, ``E_η[f(x + η) − f(x)] = (s² / 2) tr ∇²f(x)``, so the mean
  log-ratio against ``s²`` has slope ``½ tr ∇²f`` (:func:`log_ratio_slope`);
* :func:`gan_test` — the GAN-test of Shmelkov et al. (2018) as used in Table 5.1: the accuracy, on class-``i``
  samples *generated from* a model, of an independently trained classifier (the *judge*, another architecture that
  never saw the generating model's parameters; :func:`check_independent_judge`).

Conventions: ``logits_fn(x) -> [B, K]`` is an eval-mode callable (or a :class:`gradjax.model.ModelHandle`); images
are ``[B, ...]`` with a leading batch axis; labels are int ``[B]``. Everything is pure and jittable; nothing jits
itself; randomness takes an explicit ``key``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradjax import _validation as V
from gradjax import model as gm
from gradjax.gradients import select
from gradjax.losses import score_matching as SM
from gradjax.model import as_logits_fn

Array = jax.Array

__all__ = ["log_density", "DensityRatios", "density_ratios", "log_ratio_slope", "gan_test",
           "check_independent_judge", "THESIS_NOISE_STDS"]

THESIS_NOISE_STDS = tuple(float(s) for s in np.linspace(0.0, 0.5, 11))
"""Default noise grid of Fig. 5.1 (PROTOCOLS "Decisions": noise std 0 … 0.5)."""


def _logits(logits_fn, x: Array) -> Array:
    out = as_logits_fn(logits_fn)(x)
    if jnp.ndim(out) != 2 or out.shape[0] != jnp.shape(x)[0]:
        raise ValueError(f"logits_fn must return [B, K] logits for x of batch {jnp.shape(x)[0]}; got shape "
                         f"{tuple(jnp.shape(out))}.")
    return out


def log_density(logits_fn, x: Array, labels: Optional[Array] = None) -> Array:
    """Class-conditional log-density up to a constant (thesis §5.3): ``log p(x | y=i) + log Z_i = f_i(x)``.

    Returns ``[B]`` (``f_{labels_b}(x_b)``) or, with ``labels=None``, all classes ``[B, K]``.
    """
    x = V.check_input(x)
    logits = _logits(logits_fn, x)
    if labels is None:
        return logits
    labels = jnp.asarray(labels)
    V.check_labels(labels, logits.shape[1], x.shape[0])
    return select(logits, labels.astype(jnp.int32))


class DensityRatios(NamedTuple):
    """Density ratios over a noise grid.

    Attributes:
      noise_stds: ``[S]``.
      log_ratio: ``[S, N, B]`` — ``f_y(x_b + s ε_{n,b}) − f_y(x_b)`` for noise draw ``n`` (the same ``ε`` at every
        ``s``: common random numbers, so the curve over ``s`` is smooth and exactly 0 at ``s = 0``).
    """

    noise_stds: Array
    log_ratio: Array

    @property
    def ratio(self) -> Array:
        """``[S, N, B]`` — ``exp(log_ratio)``."""
        return jnp.exp(self.log_ratio)

    @property
    def mean_ratio(self) -> Array:
        """``[S]`` — the ratio averaged over draws and examples (Fig. 5.1's curve)."""
        return jnp.mean(self.ratio, axis=(1, 2))

    @property
    def mean_log_ratio(self) -> Array:
        """``[S]`` — the log-ratio averaged over draws and examples (robust to a few huge ratios)."""
        return jnp.mean(self.log_ratio, axis=(1, 2))


def density_ratios(logits_fn, x: Array, labels: Array, key: Array, *,
                   noise_stds: Sequence[float] = THESIS_NOISE_STDS, num_draws: int = 1,
                   clip: Optional[tuple[float, float]] = None) -> DensityRatios:
    """``exp(f_i(x + η) − f_i(x))`` with ``η = s ε``, ``ε ~ N(0, I)``, for every ``s`` in ``noise_stds`` (Fig. 5.1).

    Args:
      logits_fn: eval-mode ``x -> [B, K]``.
      x: ``[B, ...]`` data. labels: ``[B]`` the class ``i`` of each example (the label class, PROTOCOLS).
      key: a ``jax.random`` key; ``num_draws`` noise draws per example, shared by all ``s``:
        ``ε = jax.random.normal(key, (num_draws, *x.shape), x.dtype)``.
      clip: optionally clip ``x + η`` to ``(low, high)`` (e.g. ``(0, 1)``: stay in the image domain); default
        none (the thesis adds noise and evaluates).

    Returns a :class:`DensityRatios` (``log_ratio`` ``[S, num_draws, B]``). The grid is evaluated with
    :func:`jax.lax.map` (memory of one ``s`` at a time). Jittable.
    """
    x = V.check_input(x)
    V.check_key(key, "density_ratios")
    num_draws = V.check_count(num_draws, "num_draws")
    labels = jnp.asarray(labels)
    stds = jnp.atleast_1d(jnp.asarray(noise_stds, x.dtype))
    if stds.ndim != 1:
        raise ValueError(f"noise_stds must be a 1-D sequence; got shape {stds.shape}.")
    if V.is_concrete(stds) and (not np.all(np.isfinite(np.asarray(stds))) or np.any(np.asarray(stds) < 0)):
        raise ValueError(f"noise_stds must be finite and >= 0; got {np.asarray(stds).tolist()}.")
    if clip is not None and (len(clip) != 2 or not clip[0] < clip[1]):
        raise ValueError(f"clip must be (low, high) with low < high; got {clip!r}.")
    f0 = log_density(logits_fn, x, labels)  # [B], validates labels
    eps = jax.random.normal(key, (num_draws, *x.shape), x.dtype)

    def at(s):
        z = x[None] + s * eps
        if clip is not None:
            z = jnp.clip(z, clip[0], clip[1])
        fz = jax.vmap(lambda zn: log_density(logits_fn, zn, labels))(z)  # [N, B]
        return fz - f0[None]

    return DensityRatios(stds, lax.map(at, stds))


def chunked_log_ratios(log_ratio_fn: Callable, x, labels, key: Array, *, chunk: int) -> np.ndarray:
    """The density log-ratios ``f_y(x + η) − f_y(x)`` (Fig. 5.1, §5.5) of a whole evaluation set, ``chunk``
    examples at a time: ``log_ratio_fn(x [b, ...], labels [b], key) -> [S, N, b]`` (e.g. the jitted
    ``density_ratios(...).log_ratio``) is called on ``x[a:a + chunk]`` with ``jax.random.fold_in(key, a)``, so each
    chunk's noise depends only on ``key`` and its offset. Returns the host array ``[S, N, B]`` (chunks concatenated
    along the examples), the input of :func:`ratio_summary`."""
    x, labels = np.asarray(x), np.asarray(labels)
    if x.ndim < 2 or labels.shape != (x.shape[0],) or x.shape[0] < 1:
        raise ValueError(f"x [B, ...] (B >= 1) and labels [B] must agree; got {x.shape} and {labels.shape}.")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}.")
    n = x.shape[0]
    return np.concatenate([np.asarray(log_ratio_fn(jnp.asarray(x[a:a + chunk]), jnp.asarray(labels[a:a + chunk]),
                                                   jax.random.fold_in(key, a))) for a in range(0, n, chunk)], axis=2)


def ratio_summary(log_ratio) -> dict:
    """Per noise level, the summaries of a :class:`DensityRatios` ``log_ratio`` ``[S, N, B]`` (or several of them
    concatenated along the examples) that Fig. 5.1 plots: ``mean_ratio`` ``[S]`` (mean of ``exp(log_ratio)`` over
    draws and examples), ``median_ratio`` ``[S]`` and ``mean_log_ratio`` ``[S]`` (the input of
    :func:`log_ratio_slope`), as numpy arrays. Host-side."""
    lr = np.asarray(log_ratio, np.float64)
    if lr.ndim != 3:
        raise ValueError(f"log_ratio must be [S, N, B]; got shape {lr.shape}.")
    r = np.exp(lr)
    return {"mean_ratio": r.mean(axis=(1, 2)), "median_ratio": np.median(r, axis=(1, 2)),
            "mean_log_ratio": lr.mean(axis=(1, 2))}


def log_ratio_slope(noise_stds, mean_log_ratio) -> float:
    """Least-squares slope ``a`` of ``mean_log_ratio ≈ a s²`` through the origin: ``a = Σ s² m / Σ s⁴``.

    For a quadratic log-density ``E[f(x + sε) − f(x)] = (s²/2) tr ∇²f``, so ``a`` estimates ``½ tr ∇²f`` averaged
    over the data; a flatter density near the data (the thesis's claim for score-matching) has ``|a|`` smaller.
    Host-side (NumPy) helper for reporting."""
    s = np.asarray(noise_stds, np.float64)
    m = np.asarray(mean_log_ratio, np.float64)
    if s.shape != m.shape or s.ndim != 1:
        raise ValueError(f"noise_stds and mean_log_ratio must be 1-D of equal length; got {s.shape} and {m.shape}.")
    d = float(np.sum(s ** 4))
    if d == 0.0:
        raise ValueError("noise_stds must contain a nonzero value to fit a slope.")
    return float(np.sum(s ** 2 * m) / d)


def gan_test(judge_logits_fn, samples: Array, labels: Array) -> Array:
    """GAN-test accuracy (Shmelkov et al. 2018; thesis Table 5.1): the fraction of class-conditional samples that an
    independently trained classifier — the judge — assigns to the class they were generated for,

        GAN-test = (1/B) Σ_b 1[argmax_k judge_k(x̃_b) = y_b].

    ``judge_logits_fn`` must not be (or share parameters with) the model that generated ``samples``; check with
    :func:`check_independent_judge`. Returns a scalar in [0, 1]. Jittable."""
    samples = V.check_input(samples)
    labels = jnp.asarray(labels)
    logits = _logits(judge_logits_fn, samples)
    V.check_labels(labels, logits.shape[1], samples.shape[0])
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def gradient_trace_stats(logits_fn, x: Array, labels: Array, key: Array, *, num_probes: int = 8) -> dict:
    """Batch mean and median of the per-example ``‖∇_x f_y(x)‖²`` and of Hutchinson's estimate of
    ``tr ∇²_x f_y(x)`` (thesis §5.3–5.4: the two quantities the score-matching objective, eq. 5.4, trades off; the
    trace with ``num_probes`` Rademacher probes drawn from ``key``, :func:`gradjax.trace.hutchinson_trace`).

    ``logits_fn``: eval-mode ``x [B, ...] -> [B, K]`` (examples independent); ``labels`` ``[B]``. Returns
    ``{"grad_sq_norm_mean", "grad_sq_norm_median", "trace_mean", "trace_median"}`` (scalars). Jittable."""
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1; got {num_probes}.")
    t = SM.density_terms(SM.label_logit_fn(as_logits_fn(logits_fn), labels), V.check_input(x), key,
                         estimator="hutchinson", num_probes=num_probes)
    return {"grad_sq_norm_mean": jnp.mean(t.grad_sq_norm), "grad_sq_norm_median": jnp.median(t.grad_sq_norm),
            "trace_mean": jnp.mean(t.trace), "trace_median": jnp.median(t.trace)}


def bn_policy_traces(apply_fn: Callable, params: Any, model_state: Any, x: Array, labels: Array, key: Array, *,
                     num_probes: int = 32, sigma: float = 0.01, chunk: Optional[int] = 8) -> dict:
    """Per-example estimates of ``tr ∇²_x f_y`` (thesis §5.3.2) through a train-mode BatchNorm network under the
    two BatchNorm policies of an extra pass (:func:`gradjax.model.extra_pass_fn`), with the same probes and the
    antithetic Taylor form (no first-order noise), as ``{"frozen": [B], "train": [B]}``:

    * ``"frozen"``: every noisy pass normalized with the clean batch's moments — the per-example trace;
    * ``"train"``: every noisy batch normalized with its own moments (the authors' code) — in its batch mean the
      trace of the whole batch's summed label logit, cross-example terms included.

    Compare the two with :func:`trace_gap`. ``apply_fn``: a Linen ``model.apply``; ``params`` / ``model_state``
    (``{"batch_stats": ...}``) of a :class:`gradjax.train.TrainState`. For a network without BatchNorm the two are
    equal. Jittable (``apply_fn``, ``num_probes``, ``sigma``, ``chunk`` static)."""
    if num_probes < 1 or not sigma > 0:
        raise ValueError(f"num_probes must be >= 1 and sigma > 0; got {num_probes}, {sigma}.")
    _, _, moments = gm.apply_train(apply_fn, params, model_state, V.check_input(x))
    out = {}
    for policy in ("frozen", "train"):
        fn = gm.extra_pass_fn(apply_fn, params, model_state, moments, policy)
        f = SM.label_logit_fn(lambda z, fn=fn: fn(z)[0], labels)
        out[policy] = SM.density_terms(f, x, key, need_grad=False, sigma=sigma, num_probes=num_probes,
                                       form="antithetic", chunk=chunk).trace
    return out


def trace_gap(reference, other) -> dict:
    """How far per-example trace estimates ``other`` ``[B]`` are from ``reference`` ``[B]`` (e.g. the authors'
    train-mode BatchNorm estimate against the per-example frozen-moments one): both means, the gap of the means and
    the mean per-example ``|difference|``, each relative to the mean ``|reference|`` (floored at 1e-12)."""
    ref, oth = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    if ref.shape != oth.shape or ref.ndim != 1:
        raise ValueError(f"reference and other must be [B] of one shape; got {ref.shape} and {oth.shape}.")
    scale = max(float(np.mean(np.abs(ref))), 1e-12)
    return {"reference_mean": float(ref.mean()), "other_mean": float(oth.mean()),
            "rel_gap_of_means": float(abs(oth.mean() - ref.mean()) / scale),
            "rel_per_example_diff": float(np.mean(np.abs(oth - ref)) / scale)}


def judge_noise_robustness(judge_logits_fn, x, labels, noise, noise_stds: Sequence[float]) -> dict:
    """How a GAN-test judge copes with noisy real images (samples from a density model are noisy images at best):
    for every ``s`` in ``noise_stds``, its accuracy on ``clip(x + s · noise, 0, 1)`` and the fraction of those images
    it puts in its most frequent class (1/K for a balanced set; 1 for a judge that collapses to one class).

    ``x`` ``[B, H, W, C]`` in [0, 1], ``labels`` ``[B]``, ``noise`` of ``x``'s shape (one fixed standard-normal
    draw, the same for every ``s``). Returns ``{f"{s:g}": {"accuracy", "top_class_fraction"}}``. Host-side."""
    x, labels, noise = np.asarray(x), np.asarray(labels), np.asarray(noise, np.float32)
    if noise.shape != x.shape or labels.shape != x.shape[:1]:
        raise ValueError(f"x {x.shape}, noise {noise.shape} and labels {labels.shape} must agree.")
    out = {}
    for s in noise_stds:
        pred = np.argmax(np.asarray(judge_logits_fn(jnp.asarray(np.clip(x + s * noise, 0, 1)))), -1)
        out[f"{s:g}"] = {"accuracy": float(np.mean(pred == labels)),
                         "top_class_fraction": float(np.max(np.bincount(pred)) / len(pred))}
    return out


class GanTestReport(NamedTuple):
    """The result of :func:`gan_test_report`.

    Attributes:
      accuracy: the GAN-test accuracy (NaN when a sample is non-finite).
      histogram: ``[K]`` — how many samples the judge puts in each class.
      non_finite: the number of non-finite samples.
    """

    accuracy: float
    histogram: np.ndarray
    non_finite: int


def gan_test_report(judge_logits_fn, samples, labels, num_classes: int) -> GanTestReport:
    """:func:`gan_test` of ``samples`` ``[B, H, W, C]`` with the histogram of the judge's classes on them (a judge
    that puts every sample in one class scores 1/K on a balanced set: the histogram tells it apart from a good
    generator), on the host. Samples from an ascent that diverged (any non-finite value) are not judged: the
    accuracy is NaN, the histogram zeros, with a ``RuntimeWarning``. Not jittable (host-side check)."""
    samples = np.asarray(samples)
    labels = np.asarray(labels)
    if samples.ndim < 2 or labels.shape != (samples.shape[0],):
        raise ValueError(f"samples [B, ...] and labels [B] must agree; got {samples.shape} and {labels.shape}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}.")
    bad = int(np.sum(~np.all(np.isfinite(samples.reshape(len(samples), -1)), axis=1)))
    if bad:
        import warnings

        warnings.warn(f"{bad}/{len(samples)} samples are non-finite (the ascent diverged); GAN-test = NaN",
                      RuntimeWarning, stacklevel=2)
        return GanTestReport(float("nan"), np.zeros(num_classes, np.int64), bad)
    logits = np.asarray(_logits(judge_logits_fn, jnp.asarray(samples)))
    pred = np.argmax(logits, axis=-1)
    acc = float(gan_test(judge_logits_fn, jnp.asarray(samples), jnp.asarray(labels)))
    return GanTestReport(acc, np.bincount(pred, minlength=num_classes), 0)


def class_conditional_samples(sample_fn: Callable, key: Array, *, num_classes: int, per_class: int,
                              batch: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The samples a GAN-test judges (thesis §5.5, Table 5.1): ``per_class`` samples of every class from the model's
    implicit density, class-ordered (labels ``0 … 0, 1 … 1, …``), drawn in batches of at most ``batch``.

    ``sample_fn(labels [b], key) -> samples [b, ...]`` draws one sample per label (e.g. the final state of
    :func:`gradjax.sampling.sample_from_noise`, jitted by the caller). ``key`` is split into one key per batch, in
    order. Returns host arrays ``(samples [K · per_class, ...], labels [K · per_class] int32)``."""
    if num_classes < 1 or per_class < 1 or batch < 1:
        raise ValueError(f"num_classes, per_class and batch must be >= 1; got {num_classes}, {per_class}, {batch}.")
    labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    bounds = [(i, min(len(labels), i + batch)) for i in range(0, len(labels), batch)]
    keys = jax.random.split(key, len(bounds))
    samples = [np.asarray(sample_fn(jnp.asarray(labels[a:b]), k)) for k, (a, b) in zip(keys, bounds)]
    return np.concatenate(samples), labels


def _leaves(tree: Any) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(tree) if hasattr(a, "shape")]


def check_independent_judge(judge_params: Any, generator_params: Any) -> None:
    """Raise ``ValueError`` unless the judge is independent of the generating model: the two parameter trees must
    have different structures (another architecture, as the GAN-test requires) and share no parameter array
    (no non-constant leaf of one equals a leaf of the other; constant arrays such as zero-initialized biases carry
    no information and are skipped). Host-side; call it before :func:`gan_test`."""
    if jax.tree.structure(judge_params) == jax.tree.structure(generator_params):
        shapes_j = [a.shape for a in _leaves(judge_params)]
        shapes_g = [a.shape for a in _leaves(generator_params)]
        if shapes_j == shapes_g:
            raise ValueError("the GAN-test judge has the generator's architecture (same parameter tree and shapes); "
                             "use an independently trained classifier of another architecture.")
    gen = {}
    for a in _leaves(generator_params):
        gen.setdefault(a.shape, []).append(a)
    for a in _leaves(judge_params):
        if np.ptp(a) > 0 and any(np.array_equal(a, b) for b in gen.get(a.shape, [])):
            raise ValueError(f"the GAN-test judge shares a parameter array of shape {a.shape} with the generator; "
                             "it must never see the generating model's parameters.")
