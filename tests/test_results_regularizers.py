"""docs/RESULTS.md's budget sweeps of the two regularizer tables agree with their committed raw results (issue 24,
items 1, 2 and 5).

* Table 2.2 (gradient-norm noise robustness, ``docs/results/ch2_table2_2_sweep.json``) and Table 4.3
  (bias-gradient regularization, ``docs/results/ch4_table4_3_sweep.json``), both written by
  ``experiments.scale_sweep``: each file is self-consistent — >= 3 budgets with increasing ``--steps``, the same
  >= 3 seeds at every budget, every stored paired verdict, mean and t recomputed with
  :func:`gradjax.statistics.paired_comparison` from the per-seed accuracies, every trend recomputed — and the two
  RESULTS tables of its section are exactly ``scale_sweep.markdown`` of the file.

Reads JSON and text only (milliseconds); never trains.
"""
import numpy as np
import pytest

from tests.results_check import (assert_reported, assert_sweep_self_consistent, assert_sweep_tables_in,
                                 results_json, section)

SWEEPS = {  # file -> (script, RESULTS heading, baseline row)
    "ch2_table2_2_sweep": ("noise_robustness", "Table 2.2 — budget sweep with paired statistics (issue 24)",
                           "lambda=0"),
    "ch4_table4_3_sweep": ("bias_regularization", "Table 4.3 — budget sweep with paired statistics (issue 24)",
                           "none"),
}


def _steps(args):
    assert args[0] == "--steps", f"a budget here is '--steps N'; got {args}"
    return int(args[1])


@pytest.fixture(scope="module", params=sorted(SWEEPS))
def sweep(request):
    return request.param, results_json(request.param)


def test_sweep_file_is_self_consistent(sweep):
    name, s = sweep
    assert_sweep_self_consistent(s, SWEEPS[name][0])
    steps = [_steps(b["args"]) for b in s["budgets"].values()]
    assert steps == sorted(set(steps)), f"budgets must increase in steps: {steps}"
    for b in s["budgets"].values():  # the stored differences are the per-seed accuracy differences in points
        for claim in s["claims"]:
            a_row, b_row = claim.split(">")
            for col, stored in b["paired"][claim].items():
                a, c = (np.asarray(b["accuracy"][r][col]["runs"]) * 100 for r in (a_row, b_row))
                assert np.allclose(stored["differences"], a - c)


def test_results_tables_are_generated_from_the_sweep_file(sweep):
    name, s = sweep
    _, heading, baseline = SWEEPS[name]
    text = section(heading)
    assert_sweep_tables_in(text, s)
    assert f"docs/results/{name}.json" in text
    for b in s["budgets"].values():  # the wall time of every budget is stated
        assert_reported(text, b["wall_s"], 0, what="a budget's wall time (s)")
        assert str(_steps(b["args"])) in text
        for col, cell in b["accuracy"][baseline].items():  # the baseline's accuracy (also in the generated table)
            assert_reported(text, 100 * cell["mean"], 1, what=f"{baseline} at {col}")
