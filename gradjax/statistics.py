"""Spread over runs: the one convention for every "mean ± std" that gradjax and its experiments report.

Every "± std" over runs (training seeds, PRNG keys) is the **sample** standard deviation (``ddof=1``: the root of
the unbiased variance, an estimate of the spread of a new run), and 0 for a single run. The population std
(``ddof=0``) only describes a spread over examples (e.g. per-image statistics), never a spread over runs.

Every ordering claim "A beats B" is a **paired** comparison (:func:`paired_comparison`): both arms share the seed
(and with it the data subset and initialisation), the per-seed differences ``d_s = a_s - b_s`` are summarised by
their mean, sample std and a two-sided t statistic, and the verdict follows from them, not from overlapping
error bars.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

__all__ = ["sample_std", "paired_comparison", "PairedComparison"]


def sample_std(values, axis: int = 0) -> np.ndarray:
    """Spread over runs along ``axis``: ``sqrt(sum_i (v_i - mean)^2 / (n - 1))`` (``ddof=1``), 0 for a single run
    (``n = 1``). ``values``: array-like with at least one axis; returns the std with ``axis`` removed."""
    v = np.asarray(values, float)
    if v.ndim == 0:
        raise ValueError("sample_std needs at least one axis of runs; got a scalar.")
    return v.std(axis=axis, ddof=1) if v.shape[axis] > 1 else np.zeros_like(v.mean(axis=axis))


@dataclass(frozen=True)
class PairedComparison:
    """Summary of paired differences ``d_s = a_s - b_s`` over ``n`` seeds.

    ``mean``/``std``: mean and sample std of ``d``; ``t``: ``mean / (std / sqrt(n))`` (``inf`` with the sign of the
    mean when every difference is equal and non-zero, 0 when all are 0); ``wins``: seeds with ``d_s > 0`` (ties
    count for neither arm); ``verdict``: ``"a>b"`` when ``t >= t_crit`` (one-sided 95 % Student-t quantile with
    ``n - 1`` degrees of freedom), ``"a<b"`` when ``t <= -t_crit``, else ``"tie"`` (not resolved at this n)."""
    n: int
    mean: float
    std: float
    t: float
    wins: int
    verdict: Literal["a>b", "a<b", "tie"]
    differences: tuple

    def as_dict(self) -> dict:
        """The fields as a JSON-ready dict (``differences`` as a list)."""
        d = asdict(self)
        d["differences"] = list(self.differences)
        return d


# one-sided 95 % quantiles of Student's t with k degrees of freedom (k = 1..30); beyond 30 the normal quantile.
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761, 1.753,
        1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697)


def paired_comparison(a, b) -> PairedComparison:
    """Paired comparison of arm ``a`` against arm ``b`` over the same seeds (``a[s]`` and ``b[s]`` from seed ``s``).

    ``d = a - b``; ``t = mean(d) / (sample_std(d) / sqrt(n))``; the verdict is one-sided at 95 % in the direction of
    the mean (``n >= 2`` required: one seed cannot be paired-tested). Raises ``ValueError`` on unequal lengths, fewer
    than two seeds, or non-finite values."""
    a = np.asarray(a, float).ravel()
    b = np.asarray(b, float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_comparison: arms need one value per seed each; got {a.size} and {b.size}.")
    if a.size < 2:
        raise ValueError(f"paired_comparison: needs >= 2 paired seeds; got {a.size}.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("paired_comparison: non-finite value in an arm.")
    d = a - b
    n = d.size
    mean = float(d.mean())
    std = float(d.std(ddof=1))
    if std == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / (std / math.sqrt(n))
    crit = _T95[n - 2] if n - 1 <= len(_T95) else 1.645
    verdict = "a>b" if t >= crit else ("a<b" if t <= -crit else "tie")
    return PairedComparison(n=n, mean=mean, std=std, t=float(t), wins=int((d > 0).sum()), verdict=verdict,
                            differences=tuple(float(x) for x in d))
