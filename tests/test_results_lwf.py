"""docs/RESULTS.md's LwF budget sweep (Tables 2.3-2.5, issue 24 items 1, 2, 5) agrees with the raw results committed
under docs/results/, written by ``experiments.scale_sweep --script lwf_transfer``.

For each sweep file: >= 3 budgets of increasing student steps, every stored paired comparison recomputed from the
per-seed accuracies (>= 3 paired seeds), mean/std re-derived from the runs, the trend recomputed, one cached teacher
for every budget, and the RESULTS tables exactly the ones ``scale_sweep.markdown`` generates from the file. Reads
JSON and text only (milliseconds).
"""
import os

import pytest

from tests.results_check import (RESULTS_DIR, assert_reported, assert_sweep_self_consistent, assert_sweep_tables_in,
                                 results_json, section)

HEADING = "Tables 2.3–2.5 — budget sweep with paired statistics (issue 24)"
SWEEPS = [name for name in ("ch2_table2_3_sweep", "ch2_table2_4_5_sweep")
          if name == "ch2_table2_3_sweep" or os.path.exists(os.path.join(RESULTS_DIR, name + ".json"))]


@pytest.fixture(scope="module", params=SWEEPS)
def sweep(request):
    return results_json(request.param)


def test_sweep_file_is_self_consistent(sweep):
    assert_sweep_self_consistent(sweep, "lwf_transfer")
    steps = [b["student_steps"] for b in sweep["budgets"].values()]
    assert all(len(s) == 1 for s in steps) and [s[0] for s in steps] == sorted(s[0] for s in steps)
    assert len({s[0] for s in steps}) == len(steps), "every budget has its own student step count"


def test_results_tables_are_generated_from_the_sweep_file(sweep):
    text = section(HEADING)
    assert_sweep_tables_in(text, sweep)
    teacher = {b["teacher_accuracy"] for b in sweep["budgets"].values()}
    assert len(teacher) == 1, "every budget transfers from the same (cached) teacher"
    assert_reported(text, 100 * teacher.pop(), 2, what="the teacher's accuracy")
    for b in sweep["budgets"].values():
        assert_reported(text, b["student_steps"][0], 0, what="a budget's student steps")
