"""Calibrated backdoor decision (issue 26): reference anomaly index, thresholds with a stated false-alarm rate, ROC
with the right-target requirement, and a smoke run of experiments/backdoor_calibrated.py."""
import numpy as np
import pytest

from gradjax import backdoor as bd


def test_roc_of_a_separable_statistic_has_auc_one():
    r = bd.roc([3.0, 4.0, 5.0, 6.0], [True] * 4, [0.0, 1.0, 2.0])
    assert r.auc == pytest.approx(1.0)
    assert (r.false_alarm[0], r.detection[0]) == (0.0, 0.0)
    assert (r.false_alarm[-1], r.detection[-1]) == (1.0, 1.0)
    assert np.all(np.diff(r.false_alarm) >= 0) and np.all(np.diff(r.detection) >= 0)
    # reversed statistic: every clean model scores above every trojaned one -> AUC 0
    assert bd.roc([0.0, 1.0], [True, True], [3.0, 4.0]).auc == pytest.approx(0.0)
    # interleaved 1 pair out of order in 2 x 2 -> AUC 3/4 (the Mann-Whitney statistic)
    assert bd.roc([1.0, 3.0], [True, True], [0.0, 2.0]).auc == pytest.approx(0.75)


def test_right_target_is_required():
    scores, clean = [5.0, 6.0, 7.0, 8.0], [0.0, 1.0]
    # the highest-scoring trojan names the wrong class: it never counts, so the ROC tops out at 3/4
    r = bd.roc(scores, [True, True, True, False], clean)
    assert r.detection.max() == pytest.approx(0.75)
    assert r.auc == pytest.approx(0.75)
    det, fa = bd.detection_rates(2.0, scores, [True, True, True, False], clean)
    assert (det, fa) == (0.75, 0.0)
    assert bd.detection_rates(2.0, scores, [False] * 4, clean)[0] == 0.0


@pytest.mark.parametrize("n,fa", [(10, 0.1), (10, 0.0), (20, 0.1), (7, 0.3)])
def test_threshold_on_references_gives_the_stated_false_alarm_rate(n, fa):
    ref = np.random.default_rng(n).normal(size=n)
    thr = bd.false_alarm_threshold(ref, fa)
    assert np.mean(ref > thr) <= fa + 1e-12
    # and it is the smallest such threshold among the scores: the next lower one exceeds the rate
    lower = np.sort(ref)[np.sort(ref) < thr]
    if lower.size:
        assert np.mean(ref > lower[-1]) > fa
    with pytest.raises(ValueError):
        bd.false_alarm_threshold(ref, 1.0)


def test_reference_anomaly_index_values_and_sides():
    ref = np.array([[0.0, 10.0], [1.0, 11.0], [2.0, 12.0], [3.0, 13.0], [4.0, 14.0]])  # medians 2, 12; MAD 1
    v = np.array([-1.0, 12.0])
    np.testing.assert_allclose(bd.reference_anomaly_index(v, ref, side="low"), [3 / 1.4826, 0.0], atol=1e-9)
    np.testing.assert_allclose(bd.reference_anomaly_index(v, ref, side="high"), [-3 / 1.4826, 0.0], atol=1e-9)
    np.testing.assert_allclose(bd.reference_anomaly_index(v, ref, side="both"), [3 / 1.4826, 0.0], atol=1e-9)
    with pytest.raises(ValueError):
        bd.reference_anomaly_index(v, ref[:1])
    with pytest.raises(ValueError):
        bd.reference_anomaly_index(np.zeros(3), ref)
    with pytest.raises(ValueError):
        bd.reference_anomaly_index(v, ref, side="left")


def test_reference_calibration_sees_what_the_within_model_index_misses():
    rng = np.random.default_rng(0)
    # clean references: class 3 is always naturally "easy" (small statistic), the others ~ 5
    ref = 5.0 + 0.1 * rng.normal(size=(12, 10))
    ref[:, 3] = 2.0 + 0.1 * rng.normal(size=12)
    clean = 5.0 + 0.1 * rng.normal(size=10)
    clean[3] = 2.0
    trojan = clean.copy()
    trojan[6] = 4.0          # target 6: much smaller than class 6 ever is in clean models
    # within-model MAD: the naturally easy class 3 is the suspect of both models (a false alarm on the clean one)
    assert bd.model_score(clean, side="low")[1] == 3 and bd.model_score(clean, side="low")[0] > 2
    assert bd.model_score(trojan, side="low")[1] == 3
    # against the references: class 6 of the trojan stands out, the clean model does not
    s_t, sus_t = bd.model_score(trojan, side="low", reference=ref)
    s_c, _ = bd.model_score(clean, side="low", reference=ref)
    assert sus_t == 6 and s_t > 5 > s_c
    thr = bd.false_alarm_threshold(bd.reference_scores(ref, side="low"), 0.1)
    assert s_t > thr


def test_reference_scores_are_leave_one_out():
    ref = np.random.default_rng(1).normal(size=(6, 5))
    loo = bd.reference_scores(ref, side="low")
    for i in range(6):
        s, _ = bd.model_score(ref[i], side="low", reference=np.delete(ref, i, 0))
        assert loo[i] == pytest.approx(s)
    np.testing.assert_allclose(bd.reference_scores(ref, side="low", calibrate_on_references=False),
                               bd.model_score(ref, side="low")[0])
    with pytest.raises(ValueError):
        bd.reference_scores(ref[:2])


@pytest.mark.usefixtures("fast_compilation")
def test_experiment_smoke(tmp_path):
    from experiments import backdoor_calibrated as exp

    # the 8x8 digits option (cheap); the default mnist_digits path is what the RESULTS run exercises
    res = exp.main(["--scale", "smoke", "--dataset", "digits", "--heads", "flatten", "--out", str(tmp_path)])
    assert res["dataset"] == "digits"
    h = res["heads"]["flatten"]
    for meth in ("input_agnostic", "neural_cleanse"):
        r = h["decision"][meth]["reference"]
        assert r["reference_false_alarm"] <= exp.FALSE_ALARM + 1e-12
        assert set(r["kinds"]) == set(exp.KINDS)
        assert all(0 <= v["auc"] <= 1 for v in r["kinds"].values())
    assert h["seconds_per_model"]["input_agnostic"] > 0
    assert (tmp_path / "results.json").exists() and (tmp_path / "class_maps_flatten.png").exists()
