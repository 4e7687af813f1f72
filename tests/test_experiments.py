"""The experiment scripts run end to end at the smoke scale and write their outputs."""
import json
import os

from experiments import fullgrad_digits, roar_sanity


def test_fullgrad_digits_smoke(tmp_path):
    out = str(tmp_path / "fg")
    res = fullgrad_digits.main(["--scale", "smoke", "--out", out, "--no-progress", "--num-images", "8"])
    for f in ("results.json", "results.md", "gallery.png", "pixel_perturbation.png", "metrics.jsonl"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    saved = json.load(open(os.path.join(out, "results.json")))
    assert set(saved["table_3_1"]) == set(fullgrad_digits.TABLE_METHODS)
    assert 0.0 <= res["test_accuracy"] <= 1.0
    for name, rows in saved["table_3_2"].items():
        assert all(v[0] >= 0 for v in rows.values()), name  # absolute fractional changes
    assert os.listdir(os.path.join(out, "checkpoints")), "the classifier checkpoint is kept for reuse"


def test_roar_sanity_smoke(tmp_path):
    out = str(tmp_path / "roar")
    res = roar_sanity.main(["--scale", "smoke", "--out", out, "--no-progress", "--fractions", "0", "0.5"])
    for f in ("results.json", "results.md", "roar.png", "sanity_check.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    assert set(res["roar"]) == set(roar_sanity.ROAR_METHODS) | {"random"}
    at_zero = {round(c["mean"][0], 6) for c in res["roar"].values()}
    assert len(at_zero) == 1, "the 0 % point is the same unmodified retraining for every method"
    for name, c in res["roar"].items():
        assert all(0.0 <= a <= 1.0 for a in c["mean"]), name
    stages = res["sanity_stages"]
    assert stages[0] == "original" and len(stages) > 2
    for name, corr in res["sanity_spearman_mean"].items():
        assert abs(corr[0] - 1.0) < 1e-6, name  # the unrandomized model's maps equal themselves
    assert set(res["sanity_centre_prior_rho"]) == set(res["sanity_spearman_mean"])
