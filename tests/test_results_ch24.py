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

from experiments import scale_sweep
from gradjax.statistics import paired_comparison
from tests.results_check import assert_reported, results_json, section

SWEEP = "ch2_table2_1_sweep"
SWEEP_HEADING = "Table 2.1 — budget sweep with paired statistics"


@pytest.fixture(scope="module")
def sweep():
    return results_json(SWEEP)


def test_sweep_file_is_self_consistent(sweep):
    assert sweep["script"] == "distill_fewshot"
    assert len(sweep["budgets"]) >= 3, "a scale axis needs >= 3 budgets"
    steps = [b["student_steps"] for b in sweep["budgets"].values()]
    assert all(len(s) == 1 for s in steps) and [s[0] for s in steps] == sorted(s[0] for s in steps)
    for name, b in sweep["budgets"].items():
        for claim in sweep["claims"]:
            a_row, b_row = claim.split(">")
            for col, stored in b["paired"][claim].items():
                a = np.asarray(b["accuracy"][a_row][col]["runs"]) * 100
                c = np.asarray(b["accuracy"][b_row][col]["runs"]) * 100
                assert len(a) == len(c) >= 3, f"{name} {claim} n={col}: needs >= 3 paired seeds"
                pc = paired_comparison(a, c)
                assert pc.verdict == stored["verdict"] and pc.mean == pytest.approx(stored["mean"], abs=1e-9)
                assert pc.t == pytest.approx(stored["t"], rel=1e-9) or (np.isinf(pc.t) and np.isinf(stored["t"]))
        for row in b["accuracy"].values():
            for cell in row.values():
                assert cell["mean"] == pytest.approx(np.mean(cell["runs"]), abs=1e-12)
                assert cell["std"] == pytest.approx(np.std(cell["runs"], ddof=1), abs=1e-12)  # sample std
    first, last = list(sweep["budgets"])[0], list(sweep["budgets"])[-1]
    assert (sweep["trend"]["from"], sweep["trend"]["to"]) == (first, last)
    for claim, cols in sweep["trend"]["claims"].items():
        for col, t in cols.items():
            again = scale_sweep.trend(sweep["budgets"][first]["paired"][claim][col],
                                      sweep["budgets"][last]["paired"][claim][col])
            assert again["direction"] == t["direction"] and again["mean"] == pytest.approx(t["mean"])


def test_results_tables_are_generated_from_the_sweep_file(sweep):
    text = section(SWEEP_HEADING)
    for line in scale_sweep.markdown(sweep).splitlines():
        assert line in text, f"RESULTS lacks the generated line: {line}"
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
