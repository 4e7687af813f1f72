"""docs/RESULTS.md section "Input-agnostic saliency and backdoor discovery" agrees with
docs/results/backdoor_calibrated.json (the compact summary of `experiments.backdoor_calibrated`)."""
import pytest

from tests.results_check import assert_reported, results_json, section

HEADING = "Input-agnostic saliency and backdoor discovery"


@pytest.fixture(scope="module")
def data():
    return results_json("backdoor_calibrated"), section(HEADING)


def test_detection_table_matches(data):
    res, text = data
    for head, h in res["heads"].items():
        for meth in ("input_agnostic", "neural_cleanse"):
            for rule in ("reference", "within"):
                r = h["decision"][meth][rule]
                assert_reported(text, r["threshold"], 2, what=f"{head} {meth} {rule} threshold")
                assert_reported(text, r["clean_false_alarm"], 2, what=f"{head} {meth} {rule} false alarm")
                for kind, v in r["kinds"].items():
                    assert_reported(text, v["detection"], 2, what=f"{head} {meth} {rule} {kind} detection")
                    assert_reported(text, v["auc"], 2, what=f"{head} {meth} {rule} {kind} AUC")


def test_localization_timing_and_maps_match(data):
    res, text = data
    for head, h in res["heads"].items():
        for kind, i in h["iou"].items():
            for m in ("ia_iou", "ia_iou_area", "nc_iou", "nc_iou_area"):
                assert_reported(text, i[m], 2, what=f"{head} {kind} {m}")
            assert_reported(text, h["attack_success"][kind], 2, what=f"{head} {kind} attack success")
        for meth in ("input_agnostic", "neural_cleanse"):
            assert_reported(text, h["seconds_per_model"][meth], 2, what=f"{head} {meth} s/model")
        m = h["class_maps"]
        assert_reported(text, m["own_accuracy"], 2, what=f"{head} own accuracy on maps")
        assert_reported(text, m["cross_model_accuracy"], 2, what=f"{head} cross-model accuracy on maps")
        assert_reported(text, m["cosine_same_class"], 3, what=f"{head} cosine same class")
        assert_reported(text, m["cosine_other_class"], 3, what=f"{head} cosine other class")
    for name, c in res["comparisons"].items():
        assert_reported(text, c["mean"], 3, what=f"comparison {name}")


def test_ia_budget_paragraph_matches(data):
    _, text = data
    res = results_json("backdoor_ia_budget3")
    h = res["heads"]["flatten"]
    corner = {rule: h["decision"]["input_agnostic"][rule]["kinds"]["corner"] for rule in ("reference", "within")}
    for rule, v in corner.items():
        assert_reported(text, v["auc"], 2, what=f"budget x3 IA {rule} AUC")
        assert_reported(text, v["best_detection_at_false_alarm"], 2, what=f"budget x3 IA {rule} best detection")
    assert_reported(text, h["iou"]["corner"]["ia_iou"], 2, what="budget x3 IA IoU")
    assert_reported(text, h["iou"]["corner"]["ia_iou_area"], 2, what="budget x3 IA IoU (area)")
    s = h["seconds_per_model"]
    assert_reported(text, s["input_agnostic"], 2, what="budget x3 IA s/model")
    assert_reported(text, s["neural_cleanse"], 2, what="budget x3 NC s/model")
    assert_reported(text, s["input_agnostic"] / s["neural_cleanse"], 2, what="budget x3 IA/NC ratio")
