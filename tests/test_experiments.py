"""The experiment scripts run end to end at the smoke scale and write their outputs."""
import json
import os

from experiments import fullgrad_digits


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
