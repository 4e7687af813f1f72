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

from experiments import scale_sweep
from gradjax.statistics import paired_comparison
from tests.results_check import assert_reported, results_json, section

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
    script, _, _ = SWEEPS[name]
    assert s["script"] == script
    assert len(s["budgets"]) >= 3, "a scale axis needs >= 3 budgets"
    steps = [_steps(b["args"]) for b in s["budgets"].values()]
    assert steps == sorted(set(steps)), f"budgets must increase in steps: {steps}"
    n_seeds = set()
    for bname, b in s["budgets"].items():
        for claim in s["claims"]:
            a_row, b_row = claim.split(">")
            assert set(b["paired"][claim]) == set(b["accuracy"][a_row])
            for col, stored in b["paired"][claim].items():
                a = np.asarray(b["accuracy"][a_row][col]["runs"]) * 100
                c = np.asarray(b["accuracy"][b_row][col]["runs"]) * 100
                assert len(a) == len(c) >= 3, f"{bname} {claim} {col}: needs >= 3 paired seeds"
                n_seeds.add(len(a))
                pc = paired_comparison(a, c)
                assert pc.verdict == stored["verdict"], f"{bname} {claim} {col}"
                assert pc.mean == pytest.approx(stored["mean"], abs=1e-9)
                assert pc.std == pytest.approx(stored["std"], abs=1e-9)
                assert pc.t == pytest.approx(stored["t"], rel=1e-9) or (np.isinf(pc.t) and np.isinf(stored["t"]))
                assert np.allclose(stored["differences"], a - c)
        for row in b["accuracy"].values():
            for cell in row.values():
                assert cell["mean"] == pytest.approx(np.mean(cell["runs"]), abs=1e-12)
                assert cell["std"] == pytest.approx(np.std(cell["runs"], ddof=1), abs=1e-12)  # sample std
    assert len(n_seeds) == 1, f"the same seeds at every budget; got seed counts {n_seeds}"
    names = list(s["budgets"])
    assert (s["trend"]["from"], s["trend"]["to"]) == (names[0], names[-1])
    for claim, cols in s["trend"]["claims"].items():
        for col, t in cols.items():
            again = scale_sweep.trend(s["budgets"][names[0]]["paired"][claim][col],
                                      s["budgets"][names[-1]]["paired"][claim][col])
            assert again["direction"] == t["direction"] and again["mean"] == pytest.approx(t["mean"])
            assert again["verdict"] == t["verdict"]
    for claim, cols in s["gap_by_budget"].items():
        for col, by_budget in cols.items():
            for bname, gap in by_budget.items():
                assert gap == pytest.approx(round(s["budgets"][bname]["paired"][claim][col]["mean"], 2))


def test_results_tables_are_generated_from_the_sweep_file(sweep):
    name, s = sweep
    _, heading, baseline = SWEEPS[name]
    text = section(heading)
    for line in scale_sweep.markdown(s).splitlines():
        assert line in text, f"RESULTS lacks the generated line: {line}"
    assert f"docs/results/{name}.json" in text
    for b in s["budgets"].values():  # the wall time of every budget is stated
        assert_reported(text, b["wall_s"], 0, what="a budget's wall time (s)")
        assert str(_steps(b["args"])) in text
        for col, cell in b["accuracy"][baseline].items():  # the baseline's accuracy (also in the generated table)
            assert_reported(text, 100 * cell["mean"], 1, what=f"{baseline} at {col}")
