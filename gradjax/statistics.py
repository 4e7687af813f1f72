"""Spread over runs: the one convention for every "mean ± std" that gradjax and its experiments report.

Every "± std" over runs (training seeds, PRNG keys) is the **sample** standard deviation (``ddof=1``: the root of
the unbiased variance, an estimate of the spread of a new run), and 0 for a single run. The population std
(``ddof=0``) only describes a spread over examples (e.g. per-image statistics), never a spread over runs.
"""
from __future__ import annotations

import numpy as np

__all__ = ["sample_std"]


def sample_std(values, axis: int = 0) -> np.ndarray:
    """Spread over runs along ``axis``: ``sqrt(sum_i (v_i - mean)^2 / (n - 1))`` (``ddof=1``), 0 for a single run
    (``n = 1``). ``values``: array-like with at least one axis; returns the std with ``axis`` removed."""
    v = np.asarray(values, float)
    if v.ndim == 0:
        raise ValueError("sample_std needs at least one axis of runs; got a scalar.")
    return v.std(axis=axis, ddof=1) if v.shape[axis] > 1 else np.zeros_like(v.mean(axis=axis))
