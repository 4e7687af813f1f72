"""docs/RESULTS.md's chapter-2/4 numbers agree with the raw results committed under docs/results/ (issue 24, item 5).

* Table 2.1's budget sweep (``docs/results/ch2_table2_1_sweep.json``, written by ``experiments.scale_sweep``): the
  file is self-consistent (every stored paired comparison recomputed from the per-seed accuracies, >= 3 paired
  seeds, >= 3 budgets), and the RESULTS tables are exactly the ones generated from it (``scale_sweep.markdown``).
* Table 4.3's paired verdict (bias-grad vs none) is recomputed from the per-seed differences RESULTS prints.
Tables without a raw file (their ``runs/`` were deleted) are named in RESULTS; nothing here invents one.
"""
import re

import numpy as np
import pytest

from gradjax.statistics import paired_comparison
from tests.results_check import (assert_reported, assert_sweep_self_consistent, assert_sweep_tables_in,
                                 results_json, section)

SWEEP = "ch2_table2_1_sweep"
SWEEP_HEADING = "Table 2.1 — budget sweep with paired statistics"


@pytest.fixture(scope="module")
def sweep():
    return results_json(SWEEP)


def test_sweep_file_is_self_consistent(sweep):
    assert_sweep_self_consistent(sweep, "distill_fewshot")
    steps = [b["student_steps"] for b in sweep["budgets"].values()]
    assert all(len(s) == 1 for s in steps) and [s[0] for s in steps] == sorted(s[0] for s in steps)


def test_results_tables_are_generated_from_the_sweep_file(sweep):
    text = section(SWEEP_HEADING)
    assert_sweep_tables_in(text, sweep)
    teacher = {b["teacher_accuracy"] for b in sweep["budgets"].values()}
    assert len(teacher) == 1, "every budget distils from the same (cached) teacher"
    assert_reported(text, 100 * teacher.pop(), 2, what="the teacher's accuracy")


def test_table4_3_paired_verdict_follows_from_the_printed_differences():
    text = section("Table 4.3 — bias-gradient regularization")
    m = re.search(r"bias-grad − none is ([+\-−\d./]+) points at n = 50 and ([+\-−\d./]+) at n = 100", text)
    assert m, "the per-seed differences bias-grad − none are no longer printed"
    for diffs, label in ((m.group(1), "n = 50"), (m.group(2), "n = 100")):
        d = [float(v.replace("−", "-")) for v in diffs.split("/")]
        pc = paired_comparison(d, np.zeros(len(d)))
        assert pc.verdict == "a>b" and pc.n == 4
        assert f"mean {pc.mean:+.2f}" in text and f"t = {pc.t:.2f}" in text, label
