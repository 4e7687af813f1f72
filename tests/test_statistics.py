"""gradjax.statistics: the sample std and the paired comparison behind every ordering verdict in RESULTS."""
import math

import numpy as np
import pytest
from scipy import stats

from gradjax.statistics import paired_comparison, sample_std


def test_sample_std_is_ddof1_and_zero_for_one_run():
    v = [1.0, 2.0, 4.0]
    assert sample_std(v) == pytest.approx(np.std(v, ddof=1))
    assert sample_std([3.0]) == 0.0


def test_paired_t_matches_scipy_and_verdicts():
    rng = np.random.default_rng(0)
    b = rng.normal(size=5)
    a = b + np.array([0.9, 1.1, 1.0, 0.8, 1.2])
    r = paired_comparison(a, b)
    ref = stats.ttest_rel(a, b)
    assert r.t == pytest.approx(ref.statistic, rel=1e-10)
    assert r.mean == pytest.approx(1.0) and r.wins == 5 and r.verdict == "a>b"
    assert paired_comparison(b, a).verdict == "a<b"
    # a noisy difference with mean ~0 is not resolved at n = 3
    assert paired_comparison([1.0, 0.0, 2.0], [0.5, 0.6, 1.8]).verdict == "tie"
    # the critical value is the one-sided 95 % Student-t quantile
    for n in (2, 3, 10):
        d = np.ones(n); d[0] = 1.5
        r = paired_comparison(d, np.zeros(n))
        crit = stats.t.ppf(0.95, n - 1)
        assert (r.verdict == "a>b") == (r.t >= crit)


def test_paired_constant_difference_and_errors():
    r = paired_comparison([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert math.isinf(r.t) and r.t > 0 and r.verdict == "a>b" and r.std == 0.0
    assert paired_comparison([1.0, 2.0], [1.0, 2.0]).verdict == "tie"
    with pytest.raises(ValueError, match="one value per seed"):
        paired_comparison([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=">= 2"):
        paired_comparison([1.0], [0.0])
    with pytest.raises(ValueError, match="non-finite"):
        paired_comparison([1.0, float("nan")], [0.0, 0.0])
