"""gradjax.viz.training_curves: a PNG from the JSON-lines metric records of gradjax.train.fit."""
import json

import pytest

from gradjax import viz


def _records():
    recs = []
    for step in (20, 40, 60):
        recs.append({"step": step, "epoch": step // 40, "loss": 2.0 / step, "accuracy": step / 100, "elapsed_s": 0.1})
        if step % 20 == 0:
            recs.append({"step": step, "epoch": step // 40, "eval_accuracy": step / 120, "eval_cross_entropy": 1.5 / step,
                         "eval_count": 128})
    return recs


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_training_curves_from_records_and_jsonl(tmp_path):
    recs = _records()
    out = viz.training_curves(recs, str(tmp_path / "a" / "curve.png"), title="t")
    assert out == str(tmp_path / "a" / "curve.png")
    w_two, _ = _png_size(out)
    log = tmp_path / "metrics.jsonl"
    resumed = dict(recs[-2], loss=9.0)  # a resumed run re-logs step 60 with a new value: the last one counts
    log.write_text("".join(json.dumps(r) + "\n" for r in recs + [resumed]) + "\n")
    assert viz.read_metrics(str(log))[-1] == resumed
    series = viz._training_series(str(log))
    assert set(series) == {"loss / cross-entropy", "accuracy"}
    assert set(series["loss / cross-entropy"]) == {"train loss", "eval cross_entropy"}
    steps, values = series["loss / cross-entropy"]["train loss"]
    assert steps == [20, 40, 60] and values == [0.1, 0.05, 9.0]
    assert series["accuracy"]["eval accuracy"] == ([20, 40, 60], [20 / 120, 40 / 120, 60 / 120])
    _png_size(viz.training_curves(str(log), str(tmp_path / "b.png")))
    assert set(viz._training_series(recs, metrics=["accuracy"])) == {"accuracy"}
    w_one, _ = _png_size(viz.training_curves(recs, str(tmp_path / "c.png"), metrics=["accuracy"]))
    assert w_one < 0.7 * w_two, "one panel is narrower than two"


def test_training_curves_rejects_empty(tmp_path):
    with pytest.raises(ValueError, match="no metric values"):
        viz.training_curves([], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="no metric values"):
        viz.training_curves([{"step": 1, "epoch": 0, "elapsed_s": 1.0}], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="step"):
        viz.training_curves([{"loss": 1.0}], str(tmp_path / "x.png"))
