"""docs/RESULTS.md's LwF budget sweep (Tables 2.3-2.5, issue 24 items 1, 2, 5) agrees with the raw results committed
under docs/results/, written by ``experiments.scale_sweep --script lwf_transfer``.

For each sweep file: >= 3 budgets of increasing student steps, every stored paired comparison recomputed from the
per-seed accuracies (>= 3 paired seeds), mean/std re-derived from the runs, the trend recomputed, one cached teacher
for every budget, and the RESULTS tables exactly the ones ``scale_sweep.markdown`` generates from the file. Reads
JSON and text only (milliseconds).
"""
import os

import numpy as np
import pytest

from experiments import scale_sweep
from gradjax.statistics import paired_comparison
from tests.results_check import RESULTS_DIR, assert_reported, results_json, section

HEADING = "Tables 2.3–2.5 — budget sweep with paired statistics (issue 24)"
SWEEPS = [name for name in ("ch2_table2_3_sweep", "ch2_table2_4_5_sweep")
          if name == "ch2_table2_3_sweep" or os.path.exists(os.path.join(RESULTS_DIR, name + ".json"))]


@pytest.fixture(scope="module", params=SWEEPS)
def sweep(request):
    return results_json(request.param)


def test_sweep_file_is_self_consistent(sweep):
    assert sweep["script"] == "lwf_transfer"
    assert len(sweep["budgets"]) >= 3, "a scale axis needs >= 3 budgets"
    steps = [b["student_steps"] for b in sweep["budgets"].values()]
    assert all(len(s) == 1 for s in steps) and [s[0] for s in steps] == sorted(s[0] for s in steps)
    assert len({s[0] for s in steps}) == len(steps), "every budget has its own student step count"
    for name, b in sweep["budgets"].items():
        assert set(b["paired"]) == set(sweep["claims"])
        for claim in sweep["claims"]:
            a_row, b_row = claim.split(">")
            for col, stored in b["paired"][claim].items():
                a = np.asarray(b["accuracy"][a_row][col]["runs"]) * 100
                c = np.asarray(b["accuracy"][b_row][col]["runs"]) * 100
                assert len(a) == len(c) >= 3, f"{name} {claim} n={col}: needs >= 3 paired seeds"
                pc = paired_comparison(a, c)
                assert pc.verdict == stored["verdict"] and pc.mean == pytest.approx(stored["mean"], abs=1e-9)
                assert pc.t == pytest.approx(stored["t"], rel=1e-9) or (np.isinf(pc.t) and np.isinf(stored["t"]))
                assert list(pc.differences) == pytest.approx(stored["differences"], abs=1e-9)
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
    for claim, cols in sweep["gap_by_budget"].items():
        for col, gaps in cols.items():
            for b, g in gaps.items():
                assert g == pytest.approx(sweep["budgets"][b]["paired"][claim][col]["mean"], abs=0.005)


def test_results_tables_are_generated_from_the_sweep_file(sweep):
    text = section(HEADING)
    for line in scale_sweep.markdown(sweep).splitlines():
        assert line in text, f"RESULTS lacks the generated line: {line}"
    teacher = {b["teacher_accuracy"] for b in sweep["budgets"].values()}
    assert len(teacher) == 1, "every budget transfers from the same (cached) teacher"
    assert_reported(text, 100 * teacher.pop(), 2, what="the teacher's accuracy")
    for b in sweep["budgets"].values():
        assert_reported(text, b["student_steps"][0], 0, what="a budget's student steps")
