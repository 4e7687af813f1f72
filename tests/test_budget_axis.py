"""experiments.budget_axis: chapter-3 budget axes collected from per-budget runs (no training: fake run files)."""
import json

import numpy as np
import pytest

from experiments import budget_axis
from gradjax.statistics import paired_comparison

FRACTIONS = ("0.5", "0.7", "0.9")
METHODS = ("integrated_gradients", "fullgrad", "fullgrad_noabs", "gradient", "random")
CLAIMS = ("integrated_gradients<fullgrad", "fullgrad<fullgrad_noabs", "fullgrad_noabs<gradient", "gradient<random")


def _table3_2_run(tmp_path, epochs, gap, seeds=(0, 1, 2)):
    """A fullgrad_digits --seeds results_seeds.json whose adjacent methods differ by ``gap * (1 + seed / 10)``."""
    table = {m: {f: [i * gap * (1 + s / 10) + float(f) for s in seeds] for f in FRACTIONS}
             for i, m in enumerate(METHODS)}
    paired = {}
    for c in CLAIMS:
        a, b = c.split("<")
        paired[c] = {f: paired_comparison(table[b][f], table[a][f]).as_dict() for f in FRACTIONS}
    d = tmp_path / f"pp_e{epochs}"
    d.mkdir()
    (d / "results_seeds.json").write_text(json.dumps(
        {"epochs": epochs, "width": 0.25, "seeds": list(seeds), "test_accuracy": [0.9] * len(seeds),
         "table_3_2": table, "table_3_2_paired": paired}))
    return str(d)


def test_table3_2_axis_keeps_per_seed_values_and_finds_the_trend(tmp_path):
    runs = [_table3_2_run(tmp_path, e, g) for e, g in ((1, 0.1), (4, 0.2), (8, 0.4))]
    out = tmp_path / "axis.json"
    summary = budget_axis.main(["--kind", "table3_2", "--out", str(out)] + runs)
    saved = json.loads(out.read_text())
    assert saved["epochs"] == [1, 4, 8] and saved["seeds"] == [0, 1, 2]
    assert saved["budgets"][2]["table_3_2"]["gradient"]["0.5"] == pytest.approx([1.7, 1.82, 1.94])
    t = saved["trend"]["claims"]["gradient<random"]["0.7"]
    # differences grow 0.1 -> 0.4 (x (1 + s/10)) in the thesis's direction: toward the thesis, resolved
    assert t["differences"] == pytest.approx([0.3, 0.33, 0.36]) and t["direction"] == "toward thesis"
    md = budget_axis.markdown(summary)
    assert "| 8 | 0.9 |" in md and "| gradient<random | 0.7 |" in md and "toward thesis" in md


def test_table3_2_axis_reports_a_shrinking_gap_as_away_from_the_thesis(tmp_path):
    runs = [_table3_2_run(tmp_path, e, g) for e, g in ((1, 0.4), (2, 0.2), (3, 0.1))]
    s = budget_axis.collect(runs, "table3_2")
    assert {t["direction"] for cols in s["trend"]["claims"].values() for t in cols.values()} == {"away from thesis"}


def test_budget_axis_rejects_bad_input(tmp_path):
    a, b = _table3_2_run(tmp_path, 4, 0.1), _table3_2_run(tmp_path, 1, 0.1)
    with pytest.raises(ValueError, match="increasing --epochs"):
        budget_axis.collect([a, b], "table3_2")
    c = _table3_2_run(tmp_path, 8, 0.1, seeds=(0, 1, 3))
    with pytest.raises(ValueError, match="same seeds"):
        budget_axis.collect([b, c], "table3_2")
    with pytest.raises(ValueError, match="no road.json"):
        budget_axis.collect([str(tmp_path), str(tmp_path)], "road")
    with pytest.raises(ValueError, match=">= 2 budgets"):
        budget_axis.collect([a], "table3_2")


def test_road_axis_from_road_json_files(tmp_path):
    def road(epochs, edge):
        scores = {o: {m: [0.5 + (m == "fullgrad") * edge * (1 + s / 10) * (1 if o == "lerf" else -1) + 0.01 * s
                          for s in range(3)]
                      for m in ("gradient", "fullgrad", "random")} for o in ("morf", "lerf")}
        paired = {o: {m: (paired_comparison(scores[o][m], scores[o]["fullgrad"]) if o == "morf"
                          else paired_comparison(scores[o]["fullgrad"], scores[o][m])).as_dict()
                      for m in ("gradient", "random")} for o in scores}
        f = tmp_path / f"road_e{epochs}.json"
        f.write_text(json.dumps({"epochs": epochs, "width": 0.25, "seeds": [0, 1, 2], "n_test": 10,
                                 "fractions": [0.0, 0.5], "clean_accuracy": [0.9] * 3, "paired_vs_fullgrad": paired,
                                 "road": {o: {m: {"mean": [0.9, v[0]], "score_per_seed": v} for m, v in ms.items()}
                                          for o, ms in scores.items()}}))
        return str(f)

    s = budget_axis.collect([road(1, 0.1), road(4, 0.05), road(8, 0.2)], "road")
    # MoRF: method - FullGrad = edge (1 + s/10) > 0 at every seed: FullGrad better (a>b)
    assert s["budgets"][1]["paired"]["morf"]["gradient"]["differences"] == pytest.approx([0.05, 0.055, 0.06])
    assert s["budgets"][1]["paired"]["morf"]["gradient"]["verdict"] == "a>b"
    t = s["trend"]["claims"]["lerf"]["random"]  # the edge doubles from 1 to 8 epochs: toward the thesis
    assert np.allclose(t["differences"], [0.1, 0.11, 0.12]) and t["direction"] == "toward thesis"
    assert s["budgets"][0]["score_per_seed"]["morf"]["fullgrad"] == pytest.approx([0.4, 0.4, 0.4])
    md = budget_axis.markdown(s)
    assert "| 8 | LERF |" in md and "| LERF | random |" in md


def _table3_1_run(tmp_path, width, edge, epochs=4):
    """fullgrad_digits --digit-flip-only --seeds results: no abs flips ``edge * (1 + s/10)`` better than gradient."""
    methods = ("gradient", "fullgrad", "fullgrad_noabs")
    table = {m: [5.0 + s + (m == "fullgrad_noabs") * edge * (1 + s / 10) for s in range(3)] for m in methods}
    paired = {m: paired_comparison(table["fullgrad_noabs"], table[m]).as_dict() for m in methods
              if m != "fullgrad_noabs"}
    d = tmp_path / f"df_w{width}_e{epochs}"
    d.mkdir()
    (d / "results_seeds.json").write_text(json.dumps(
        {"epochs": epochs, "width": width, "seeds": [0, 1, 2], "test_accuracy": [0.98] * 3, "num_eights": [100] * 3,
         "table_3_1": table, "table_3_1_paired_noabs": paired}))
    return str(d)


def test_table3_1_axis_over_width(tmp_path):
    runs = [_table3_1_run(tmp_path, w, e) for w, e in ((0.125, 1.0), (0.25, 2.0), (0.5, 4.0))]
    s = budget_axis.collect(runs, "table3_1", axis="width")
    assert s["axis"] == "width" and s["width"] == [0.125, 0.25, 0.5]
    t = s["trend"]["claims"]["fullgrad_noabs vs"]["gradient"]
    assert t["differences"] == pytest.approx([3.0, 3.3, 3.6]) and t["direction"] == "toward thesis"
    md = budget_axis.markdown(s)
    assert "| width | test accuracy % |" in md and "| 0.5 | 98.0 |" in md and "trend 0.125 → 0.5 |" in md
    with pytest.raises(ValueError, match="increasing --epochs"):  # the default axis: epochs do not increase
        budget_axis.collect(runs, "table3_1")
    with pytest.raises(ValueError, match="must not change"):  # along width, epochs must be fixed
        budget_axis.collect([runs[0], _table3_1_run(tmp_path, 0.5, 1.0, epochs=8)], "table3_1", axis="width")
