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
