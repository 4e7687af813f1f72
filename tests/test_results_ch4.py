"""docs/RESULTS.md's chapter-4 budget sweeps agree with the raw results committed under docs/results/ (issue 24,
items 1, 2, 5).

* Table 4.1's sweep (``docs/results/ch4_table4_1_sweep.json``, written by ``experiments.scale_sweep``): >= 3 budgets,
  >= 3 paired seeds, every stored paired comparison and trend recomputed from the per-seed accuracies, and the
  RESULTS tables are exactly the ones generated from it (``scale_sweep.markdown``).
* Fig. 4.1's sweep (``docs/results/ch4_fig4_1_sweep.json``, written by ``experiments.gradient_angle sweep``): the
  same checks for the per-seed final angles and accuracies (``gradient_angle.sweep_markdown``); panel (a)'s runs are
  Table 4.1's, so their accuracies must equal the Table 4.1 file's.
Reads JSON and text only (milliseconds); never trains.
"""
import numpy as np
import pytest

from experiments import gradient_angle as GA
from experiments import scale_sweep
from gradjax.statistics import paired_comparison
from tests.results_check import (assert_reported, assert_sweep_self_consistent, assert_sweep_tables_in,
                                 results_json, section)

T41 = "ch4_table4_1_sweep"
T41_HEADING = "Table 4.1 — budget sweep with paired statistics"
F41 = "ch4_fig4_1_sweep"
F41_HEADING = "Fig. 4.1 — budget sweep with paired statistics"


@pytest.fixture(scope="module")
def t41():
    return results_json(T41)


@pytest.fixture(scope="module")
def f41():
    return results_json(F41)


def _same_pc(pc, stored):
    assert pc.verdict == stored["verdict"] and pc.n == stored["n"] and pc.wins == stored["wins"]
    assert pc.mean == pytest.approx(stored["mean"], abs=1e-9) and pc.std == pytest.approx(stored["std"], abs=1e-9)
    assert pc.t == pytest.approx(stored["t"], rel=1e-9) or (np.isinf(pc.t) and np.isinf(stored["t"]))


def test_table4_1_sweep_is_self_consistent(t41):
    assert_sweep_self_consistent(t41, "distill_fullgrad")
    steps = [b["student_steps"] for b in t41["budgets"].values()]
    assert all(len(s) == 1 for s in steps) and [s[0] for s in steps] == sorted({s[0] for s in steps})


def test_table4_1_results_are_generated_from_the_sweep_file(t41):
    text = section(T41_HEADING)
    assert_sweep_tables_in(text, t41)
    teacher = {b["teacher_accuracy"] for b in t41["budgets"].values()}
    assert len(teacher) == 1, "every budget distils from the same (cached) teacher"
    assert_reported(text, 100 * teacher.pop(), 2, what="the teacher's accuracy")
    for name, b in t41["budgets"].items():  # plain CE, the baseline, is stated at every budget
        for col, cell in b["accuracy"]["CE"].items():
            assert_reported(text, 100 * cell["mean"], 1, what=f"CE at {name}, n = {col}")


def test_fig4_1_sweep_is_self_consistent(f41, t41):
    assert len(f41["budgets"]) >= 3, "a scale axis needs >= 3 budgets"
    steps = [b["student_steps"] for b in f41["budgets"].values()]
    assert steps == sorted(set(steps))
    for name, b in f41["budgets"].items():
        for claim in f41["claims"]:
            if claim not in b["paired"]:
                continue
            panel, rest = claim.split(" ", 1)
            quantity, pair = rest.split(": ")
            a_row, b_row = pair.split(">")
            va = np.asarray(b[panel]["rows"][a_row][quantity]["runs"])
            vb = (np.full(len(va), float(b_row)) if b_row not in b[panel]["rows"]
                  else np.asarray(b[panel]["rows"][b_row][quantity]["runs"]))
            assert len(va) == len(vb) >= 3, f"{name} {claim}: needs >= 3 paired seeds"
            _same_pc(paired_comparison(va, vb), b["paired"][claim])
        for panel in ("a", "b"):
            for row in b.get(panel, {"rows": {}})["rows"].values():
                for cell in row.values():
                    assert cell["mean"] == pytest.approx(np.mean(cell["runs"]), abs=1e-9)
                    assert cell["std"] == pytest.approx(np.std(cell["runs"], ddof=1), abs=1e-9)
                    assert len(cell["runs"]) >= 3
    for claim, t in f41["trend"].items():
        again = scale_sweep.trend(f41["budgets"][t["from"]]["paired"][claim], f41["budgets"][t["to"]]["paired"][claim])
        assert again["direction"] == t["direction"] and again["mean"] == pytest.approx(t["mean"])
    # panel (a) is Table 4.1's runs (distill_fullgrad --angle): the same per-seed accuracies at the same budget
    t41_by_steps = {b["student_steps"][0]: b for b in t41["budgets"].values()}
    for b in f41["budgets"].values():
        if "a" not in b:
            continue
        col = str(b["a"]["n_per_class"])
        for m, row in b["a"]["rows"].items():
            ref = np.asarray(t41_by_steps[b["student_steps"]]["accuracy"][m][col]["runs"]) * 100
            np.testing.assert_allclose(row["accuracy"]["runs"], ref, atol=1e-9)


def test_fig4_1_results_are_generated_from_the_sweep_file(f41):
    text = section(F41_HEADING)
    for line in GA.sweep_markdown(f41).splitlines():
        assert line in text, f"RESULTS lacks the generated line: {line}"


def test_sweep_summary_pairs_seeds_and_reads_both_sources():
    """sweep_summary on hand-made results: a distill_fullgrad --angle run for panel (a) and a gradient_angle run
    for panel (b); the verdicts follow the constructed per-seed differences, the trend compares last vs first."""
    def df_run(angles, steps):  # distill_fullgrad results.json as loaded from JSON (string n keys)
        cells = lambda vs: {"5": {"mean": float(np.mean(vs)), "std": 0.0, "runs": list(vs)}}
        return {"scale": "small", "n_per_class": [5], "student_steps": [steps], "teacher_accuracy": 0.9,
                "final_angle": {m: cells(v) for m, v in angles.items()},
                "results": {m: cells([0.5, 0.6, 0.7]) for m in angles}}

    def ga_run(acc, ang, steps):
        return {"teacher_accuracy": 0.9, "b": {s: {"n_per_class": 50, "student_steps": steps,
                                                   "runs": [[90.0, x] for x in ang[s]],
                                                   "test_accuracy": {"runs": acc[s]}} for s in acc}}

    small = {"iG": [88.0, 87.0, 89.0], "FG": [80.0, 82.0, 85.0], "iG+Att": [88.0, 87.5, 88.5]}
    big = {"iG": [88.0, 87.0, 89.0], "FG": [70.0, 71.0, 72.0], "iG+Att": [88.1, 87.4, 88.6]}
    acc = {"vgg4": [0.5, 0.6, 0.7], "vgg6": [0.6, 0.7, 0.8], "vgg11": [0.4, 0.5, 0.7]}
    ang = {"vgg4": [88.0, 88.0, 88.0], "vgg6": [87.0, 86.0, 87.5], "vgg11": [89.0, 89.5, 89.2]}
    s = GA.sweep_summary({"x1": {"a": df_run(small, 10), "b": ga_run(acc, ang, 10)},
                          "x2": {"a": df_run(big, 20), "b": None}})
    x1, x2 = s["budgets"]["x1"], s["budgets"]["x2"]
    assert x1["student_steps"] == 10 and x2["student_steps"] == 20 and "b" not in x2
    assert x1["paired"]["a angle: iG>85"]["verdict"] == "a>b"  # 3.0, 2.0, 4.0 above the floor
    assert x1["paired"]["a angle: iG>FG"]["differences"] == pytest.approx([8.0, 5.0, 4.0])
    assert x1["paired"]["a angle: iG>iG+Att"]["verdict"] == "tie"
    assert x1["paired"]["b accuracy: vgg6>vgg4"]["verdict"] == "a>b"  # +10 points at every seed
    assert x1["paired"]["b angle: vgg6>vgg11"]["verdict"] == "a<b"  # VGG-11 worse aligned: against the thesis
    assert x1["a"]["rows"]["FG"]["accuracy"]["runs"] == pytest.approx([50.0, 60.0, 70.0])
    assert s["trend"]["a angle: iG>FG"]["direction"] == "toward thesis"  # 8/5/4 -> 18/16/17
    assert "b accuracy: vgg6>vgg4" not in s["trend"]  # one budget only: no trend
    md = GA.sweep_markdown(s)
    assert "| x1 (10) | 5 | FG | 80.0 / 82.0 / 85.0 | 82.3 ± 2.5 | 60.0 ± 10.0 |" in md
    with pytest.raises(ValueError, match="student steps"):
        GA.sweep_summary({"x1": {"a": df_run(small, 10), "b": ga_run(acc, ang, 20)}})
