"""docs/RESULTS.md's chapter-3 numbers (issue 25) agree with the raw results committed under docs/results/ch3_*.json
(no computation: the files are the runs' own results.json, cut to numbers)."""
import pytest

from gradjax.statistics import paired_comparison
from tests.results_check import assert_reported, results_json, section

MAIN_HEADING = "The main job on real MNIST digits"
ROAD_HEADING = "ROAD (leak-free ROAR)"


def test_main_job_tables_match_the_raw_run():
    raw = results_json("ch3_main_job")
    text = section(MAIN_HEADING)
    assert raw["dataset"] == "mnist_digits" and raw["scale"] == "small"
    assert_reported(text, 100 * raw["test_accuracy"], 1, what="test accuracy (%)")
    assert_reported(text, raw["total_seconds"] / 60, 1, what="wall minutes")
    for method, rows in raw["table_3_2"].items():
        for fraction, (mean, std) in rows.items():
            assert_reported(text, mean, 3, what=f"Table 3.2 {method} RF {fraction} mean")
            assert_reported(text, std, 3, what=f"Table 3.2 {method} RF {fraction} std")
    for method, (mean, std) in raw["table_3_1"].items():
        assert_reported(text, mean, 2, what=f"Table 3.1 {method} mean")
        assert_reported(text, std, 2, what=f"Table 3.1 {method} std")


def test_road_tables_and_verdicts_match_the_raw_run():
    raw = results_json("ch3_road")
    text = section(ROAD_HEADING)
    assert len(raw["seeds"]) >= 3
    for order, methods in raw["road"].items():
        for method, st in methods.items():
            for i, f in enumerate(raw["fractions"]):
                if f > 0:
                    assert_reported(text, st["mean"][i], 3, what=f"ROAD {order} {method} at {f}")
    for order, methods in raw["paired_vs_fullgrad"].items():
        for method, p in methods.items():
            fg = raw["road"][order]["fullgrad"]["score_per_seed"]
            other = raw["road"][order][method]["score_per_seed"]
            # the verdict in the file is paired_comparison's of the per-seed scores (positive = FullGrad better)
            want = paired_comparison(other, fg) if order == "morf" else paired_comparison(fg, other)
            assert p["verdict"] == want.verdict and p["mean"] == pytest.approx(want.mean, abs=1e-12)
            assert_reported(text, p["mean"], 3, what=f"paired {order} {method} mean difference")
            row = [line for line in text.splitlines()
                   if line.startswith(f"| {order.upper()} | {method} |")]
            assert len(row) == 1 and row[0].rstrip(" |").endswith(p["verdict"]), (order, method, row)


BUDGET_HEADING = "Table 3.1 over training budgets"


def test_table_3_1_budget_axis_matches_the_raw_runs():
    import numpy as np

    raw = results_json("ch3_table3_1_budgets")
    text = section(BUDGET_HEADING)
    assert len(raw["budgets"]) >= 3
    for b in raw["budgets"]:
        assert len(b["seeds"]) >= 3
        assert_reported(text, 100 * float(np.mean(b["test_accuracy"])), 1, what=f"accuracy at {b['epochs']} epochs")
        noabs = b["table_3_1"]["fullgrad_noabs"]
        for method, per_seed in b["table_3_1"].items():
            v = np.asarray(per_seed, float)
            assert_reported(text, v.mean(), 2, what=f"Table 3.1 {method} at {b['epochs']} epochs")
            assert_reported(text, v.std(ddof=1), 2, what=f"Table 3.1 {method} std at {b['epochs']} epochs")
            if method != "fullgrad_noabs":
                want = paired_comparison(noabs, per_seed)  # a>b: FullGrad (no abs) flips better (thesis claim)
                p = b["paired_noabs"][method]
                assert p["verdict"] == want.verdict and p["mean"] == pytest.approx(want.mean, abs=1e-9)
                row = [line for line in text.splitlines() if line.startswith(f"| {b['epochs']} | {method} |")]
                assert len(row) == 1 and row[0].rstrip(" |").endswith(p["verdict"]), (b["epochs"], method, row)


# ----------------------------------------------------------------- Table 3.2 and ROAD over budgets (issue 25)

@pytest.mark.parametrize("name,kind,heading", [
    ("ch3_table3_1_width", "table3_1", "Table 3.1 over classifier width"),
    ("ch3_table3_2_budgets", "table3_2", "Table 3.2 over training budgets"),
    ("ch3_road_budgets", "road", "ROAD over training budgets")])
def test_budget_axes_are_self_consistent_and_generate_the_results_tables(name, kind, heading):
    """>= 3 budgets, >= 3 paired seeds; every stored verdict and trend recomputed from the per-seed values; the
    RESULTS tables are exactly ``experiments.budget_axis.markdown`` of the committed file."""
    from experiments import budget_axis

    raw = results_json(name)
    axis = raw.get("axis", "epochs")
    assert raw["kind"] == kind and len(raw["budgets"]) >= 3 and len(raw["seeds"]) >= 3
    assert raw[axis] == sorted(raw[axis]) and len(set(raw[axis])) == len(raw[axis])
    for b in raw["budgets"]:
        for claim, cols in b["paired"].items():
            for col, p in cols.items():
                if kind == "table3_1":  # FullGrad (no abs) minus the method: a>b = no abs flips better
                    want = paired_comparison(b["table_3_1"]["fullgrad_noabs"], b["table_3_1"][col])
                elif kind == "table3_2":
                    a, c = claim.split("<")
                    want = paired_comparison(b["table_3_2"][c][col], b["table_3_2"][a][col])  # b - a: thesis order
                else:
                    fg, other = b["score_per_seed"][claim]["fullgrad"], b["score_per_seed"][claim][col]
                    want = paired_comparison(other, fg) if claim == "morf" else paired_comparison(fg, other)
                assert len(want.differences) >= 3
                assert p["verdict"] == want.verdict and p["mean"] == pytest.approx(want.mean, abs=1e-9), (claim, col)
    first, last = raw["budgets"][0]["paired"], raw["budgets"][-1]["paired"]
    for claim, cols in raw["trend"]["claims"].items():
        for col, t in cols.items():
            want = paired_comparison(last[claim][col]["differences"], first[claim][col]["differences"])
            assert t["verdict"] == want.verdict and t["direction"] == budget_axis.DIRECTION[want.verdict]
    text = section(heading)
    for table in budget_axis.markdown(raw).split("\n\n"):
        assert table in text, f"{heading}: a table differs from budget_axis.markdown({name}.json)"
