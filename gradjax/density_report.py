"""Aggregating the chapter-5 density evaluations over PRNG keys and training seeds (thesis ch. 5, §5.5–5.6).

The measurements themselves live in :mod:`gradjax.density` (density ratios, GAN-test), :mod:`gradjax.sampling`
(ascent, Langevin, denoising) and :mod:`gradjax.discriminative` (pixel perturbation); this module turns their
per-key outputs into the entries that are reported, and the per-seed entries into mean ± std over training seeds:

* :func:`ratio_entry` — Fig. 5.1: mean / median density ratio and mean log-ratio per noise level, averaged over
  keys, and the slope of the mean log-ratio against ``s²`` (``½ tr ∇²f_y`` for a quadratic ``f_y``);
* :func:`denoise_errors` / :func:`mean_std_entry` — Fig. 5.8: MSE of the noisy and the denoised images to the
  clean ones and the gain in ``f_y`` along the ascent;
* :func:`gan_sampler_entry` — Table 5.1: GAN-test accuracy per judge over keys, the judges' class histograms,
  ``f_y`` of the final samples and their statistics;
* :func:`summarize_seeds` — every part of a per-seed result dict as mean ± std over the training seeds that have it.

Spread over runs (keys, seeds) is the **sample** standard deviation (``ddof=1``), 0 for a single run. Everything
here is plain NumPy on host values; nothing is jitted and nothing draws random numbers.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

import jax.numpy as jnp

from gradjax import density as D
from gradjax import sampling as S
from gradjax.statistics import sample_std

__all__ = ["mean_and_std", "ratio_entry", "denoise_errors", "mean_std_entry", "mean_statistics",
           "sample_report", "gan_sampler_entry", "summarize_seeds"]


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample std)`` of ``values`` over runs (:func:`sample_std`; 0 for one run)."""
    v = np.asarray(values, float)
    if v.size == 0:
        raise ValueError("mean_and_std needs at least one value.")
    return float(v.mean()), float(sample_std(v))


def ratio_entry(per_key_log_ratios: Sequence, noise_stds: Sequence[float]) -> dict:
    """The density-ratio entry of one model (thesis Fig. 5.1, §5.5) from its log-ratios under each key.

    ``per_key_log_ratios``: one ``[S, N, B]`` array of ``f_y(x + η) − f_y(x)`` per key (``S`` noise levels
    ``noise_stds``, ``N`` draws, ``B`` examples; :func:`gradjax.density.density_ratios`). Each key is summarized by
    :func:`gradjax.density.ratio_summary`; the entry holds the key-mean of ``mean_ratio`` (with its sample std over
    keys, ``mean_ratio_std``), ``median_ratio`` and ``mean_log_ratio``, and ``log_ratio_slope``, the slope of the
    key-mean ``mean_log_ratio`` against ``s²`` (:func:`gradjax.density.log_ratio_slope`)."""
    if len(per_key_log_ratios) == 0:
        raise ValueError("ratio_entry needs the log-ratios of at least one key.")
    per_key = [D.ratio_summary(lr) for lr in per_key_log_ratios]
    if any(len(p["mean_ratio"]) != len(noise_stds) for p in per_key):
        raise ValueError(f"the log-ratios have {[len(p['mean_ratio']) for p in per_key]} noise levels; "
                         f"noise_stds has {len(noise_stds)}.")
    mr = np.stack([p["mean_ratio"] for p in per_key])
    ml = np.stack([p["mean_log_ratio"] for p in per_key])
    md = np.stack([p["median_ratio"] for p in per_key])
    return {"noise_stds": list(noise_stds), "mean_ratio": mr.mean(0).tolist(),
            "mean_ratio_std": sample_std(mr, 0).tolist(), "median_ratio": md.mean(0).tolist(),
            "mean_log_ratio": ml.mean(0).tolist(), "log_ratio_slope": D.log_ratio_slope(noise_stds, ml.mean(0))}


def denoise_errors(clean, start, samples, log_density) -> dict:
    """One denoising run's errors (thesis Fig. 5.8, §5.6): ``mse_noisy`` (start = clean + noise vs clean),
    ``mse_denoised`` (final samples vs clean) and ``f_gain``, the mean of ``f_y`` at the last step minus at the
    first (``log_density``: ``[T, B]``, e.g. :attr:`gradjax.sampling.SampleResult.log_density`)."""
    clean, start, samples = (np.asarray(a) for a in (clean, start, samples))
    ld = np.asarray(log_density)
    if not clean.shape == start.shape == samples.shape:
        raise ValueError(f"clean, start and samples must have one shape; got {clean.shape}, {start.shape}, "
                         f"{samples.shape}.")
    if ld.ndim < 1 or ld.shape[0] < 1:
        raise ValueError(f"log_density must be [T, ...] with T >= 1; got shape {ld.shape}.")
    return {"mse_noisy": float(np.mean((start - clean) ** 2)), "mse_denoised": float(np.mean((samples - clean) ** 2)),
            "f_gain": float(np.mean(ld[-1] - ld[0]))}


def mean_std_entry(rows: Sequence[Mapping[str, float]]) -> dict:
    """``{name: (mean, sample std)}`` over runs of a list of per-run dicts with the same keys (e.g. one
    :func:`denoise_errors` per PRNG key)."""
    if len(rows) == 0:
        raise ValueError("mean_std_entry needs at least one row.")
    if any(set(r) != set(rows[0]) for r in rows):
        raise ValueError("every row must have the same keys.")
    return {k: mean_and_std([r[k] for r in rows]) for k in rows[0]}


def mean_statistics(images, reference) -> dict:
    """The batch means of :func:`gradjax.sampling.sample_statistics` (pixel mean, saturated fractions, distance to
    the nearest ``reference`` image) of ``images`` ``[B, ...]``, as floats: the "samples' statistics" reported next
    to the GAN-test (§5.5), for samples and for real test images alike."""
    return {k: float(np.mean(a)) for k, a in S.sample_statistics(jnp.asarray(images),
                                                                 jnp.asarray(reference))._asdict().items()}


def sample_report(samples, labels, log_density_fn, reference=None) -> dict | None:
    """What is reported of one key's GAN-test samples besides the judges' verdicts (§5.5): ``f_y``, the mean
    log-density ``log_density_fn(samples, labels)`` (``[B]``, e.g. :func:`gradjax.density.log_density`) of the
    samples under their own class, and with ``reference`` their ``statistics`` (:func:`mean_statistics`). ``None``
    when any sample is non-finite (a diverged ascent has no meaningful ``f_y``)."""
    samples = np.asarray(samples)
    if np.shape(labels) != samples.shape[:1]:
        raise ValueError(f"samples [B, ...] and labels [B] must agree; got {samples.shape} and {np.shape(labels)}.")
    if not np.all(np.isfinite(samples)):
        return None
    out = {"f_y": float(np.mean(np.asarray(log_density_fn(jnp.asarray(samples), jnp.asarray(labels)))))}
    if reference is not None:
        out["statistics"] = mean_statistics(samples, reference)
    return out


def gan_sampler_entry(accuracies: Mapping[str, Sequence[float]], histograms: Mapping[str, Sequence],
                      final_log_density: Sequence[float], statistics: Sequence[Mapping[str, float]]) -> dict:
    """One model's GAN-test entry for one sampler (thesis Table 5.1, §5.5), over PRNG keys.

    ``accuracies[judge]`` / ``histograms[judge]``: per key, the judge's GAN-test accuracy and its class histogram
    (:func:`gradjax.density.gan_test_report`). ``final_log_density``: per key whose samples are all finite, the mean
    ``f_y`` of the samples (NaN in the entry when none). ``statistics``: per such key, the samples' mean statistics
    (:func:`gradjax.sampling.sample_statistics`); ``statistics`` is in the entry only when non-empty. Per judge the
    entry has ``mean`` / ``std`` (sample std over keys), ``per_key`` and the summed ``judge_class_histogram``."""
    if set(accuracies) != set(histograms):
        raise ValueError(f"accuracies and histograms must name the same judges; got {sorted(accuracies)} and "
                         f"{sorted(histograms)}.")
    for j in accuracies:
        if len(accuracies[j]) == 0 or len(accuracies[j]) != len(histograms[j]):
            raise ValueError(f"judge {j!r}: need one histogram per key and at least one key; got "
                             f"{len(accuracies[j])} accuracies and {len(histograms[j])} histograms.")
    entry = {j: dict(zip(("mean", "std"), mean_and_std(accuracies[j])), per_key=list(accuracies[j]),
                     judge_class_histogram=np.sum(histograms[j], 0).tolist()) for j in accuracies}
    entry["f_y"] = float(np.mean(final_log_density)) if len(final_log_density) else float("nan")
    if statistics:
        entry["statistics"] = {k: float(np.mean([r[k] for r in statistics])) for k in statistics[0]}
    return entry


def summarize_seeds(per_seed: Mapping, objectives: Sequence[str]) -> dict:
    """Mean ± std over training seeds of per-seed evaluation results (each seed's value already averaged over its
    keys), per objective in ``objectives``. Each part (``gan_test``, ``gan_test_langevin``, ``gan_samplers``,
    ``density_ratios``, ``pixel_own``, ``pixel_baseline``, ``denoise``) is summarized over the seeds that have it,
    counted in ``n_seeds[part]``, so per-seed results of separate runs can be merged; ``(mean, std)`` pairs use the
    sample std (:func:`mean_and_std`). Tables 5.1 (GAN-test), Fig. 5.1 (ratios), 5.3 (pixel perturbation), 5.8
    (denoising)."""
    out = {}
    for o in objectives:
        d, n = {}, {}
        have = lambda part: [s for s, r in per_seed.items() if o in r.get(part, {})]  # noqa: E731
        if seeds := have("gan_test"):
            n["gan_test"] = len(seeds)
            d["gan_test"] = mean_and_std([per_seed[s]["gan_test"][o]["mean"] for s in seeds])
            d["gan_test_key_std"] = float(np.mean([per_seed[s]["gan_test"][o]["std"] for s in seeds]))
        if seeds := have("gan_test_langevin"):
            n["gan_test_langevin"] = len(seeds)
            d["gan_test_langevin"] = mean_and_std([per_seed[s]["gan_test_langevin"][o]["mean"] for s in seeds])
        names = sorted({m for r in per_seed.values() for m in r.get("gan_samplers", {})})
        for name in names:
            seeds = [s for s, r in per_seed.items() if o in r.get("gan_samplers", {}).get(name, {})]
            if not seeds:
                continue
            e = [per_seed[s]["gan_samplers"][name][o] for s in seeds]
            judges = [j for j in e[0] if isinstance(e[0][j], dict) and "per_key" in e[0][j]]
            g = {j: mean_and_std([x[j]["mean"] for x in e]) for j in judges}
            g["n_seeds"] = len(seeds)
            g["f_y"] = float(np.mean([x["f_y"] for x in e]))
            if all("statistics" in x for x in e):
                g["statistics"] = {k: float(np.mean([x["statistics"][k] for x in e])) for k in e[0]["statistics"]}
            d.setdefault("gan_samplers", {})[name] = g
        if seeds := have("density_ratios"):
            n["density_ratios"] = len(seeds)
            r = [per_seed[s]["density_ratios"][o] for s in seeds]
            d["log_ratio_slope"] = mean_and_std([x["log_ratio_slope"] for x in r])
            for k in ("median_ratio", "mean_ratio"):
                d[k] = np.mean([x[k] for x in r], 0).tolist()
                d[k + "_std"] = sample_std([x[k] for x in r], 0).tolist()
        for part in ("pixel_own", "pixel_baseline"):
            if seeds := have(part):
                n[part] = len(seeds)
                d[part] = np.mean([per_seed[s][part][o] for s in seeds], 0).tolist()
                d[part + "_std"] = sample_std([per_seed[s][part][o] for s in seeds], 0).tolist()
        if seeds := have("denoise"):
            n["denoise"] = len(seeds)
            d["denoise"] = {k: mean_and_std([per_seed[s]["denoise"][o][k][0] for s in seeds])
                            for k in ("mse_noisy", "mse_denoised", "f_gain")}
        d["n_seeds"] = n
        out[o] = d
    return out
