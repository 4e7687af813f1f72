"""Smoke tests of the ch. 5 experiments (density models, fooling) and of the divergence guard under score-matching.

The ResNet-18 / VGG-11 compile takes minutes on a loaded 2-core CPU, so these tests swap in an MLP (``--model
mlp``) on 8×8 digits; the experiment code path (terms → combinator → engine → checkpoints) is the same."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from experiments import density_models as DM

pytestmark = pytest.mark.usefixtures("fast_compilation")


@pytest.fixture(scope="module")
def tiny():
    sc = dataclasses.replace(DM.SCALES["smoke"], model="mlp", image_size=8, epochs=4, max_train=128, max_test=64)
    return sc, *DM.load_raw_splits(sc)


def test_density_main_smoke_writes_results_and_reusable_checkpoints(tmp_path):
    out = str(tmp_path / "dm")
    res = DM.main(["--scale", "smoke", "--model", "mlp", "--image-size", "8", "--out", out])
    assert set(res["summary"]) == set(DM.OBJECTIVES)
    for r in res["runs"]:
        assert r["diverged"] is None and np.isfinite(r["trace_mean"]) and np.isfinite(r["grad_sq_norm_mean"])
    assert res["runs"][1]["implied_regularizer"]["hidden_to_explicit"] == pytest.approx(8.0)  # 4·1e-4/1e-4 / ½
    assert os.path.exists(os.path.join(out, "results.md")) and res["bn_policy_gap"]["rows"]
    model, state, cfg = DM.load_trained(os.path.join(out, "score_matching", "seed0"))
    assert cfg.objective == "score_matching" and cfg.input_range == (0.0, 1.0)
    assert int(state.step) == res["runs"][1]["steps"] > 0
    logits = state.model()(np.zeros((2, *cfg.image_shape), np.float32))
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


def test_score_matching_stable_while_unstable_setting_trips_divergence_guard(tiny, tmp_path):
    sc, tr, te = tiny
    stable = DM.DensityRunner(sc, tr, te, preset="thesis").run("score_matching", 0, str(tmp_path / "stable"))
    assert stable["diverged"] is None and stable["steps"] == sc.epochs * (128 // sc.batch_size)
    assert np.isfinite(stable["trace_mean"]) and np.isfinite(stable["test_cross_entropy"])
    # no stability term and a huge weight: the Hessian trace runs off to -inf and the step goes non-finite
    unstable = DM.DensityRunner(sc, tr, te, preset="thesis", overrides=dict(lam=1e4, mu=0.0))
    r = unstable.run("score_matching", 0, str(tmp_path / "unstable"))
    assert r["diverged"] is not None and "diverged" in r["diverged"]
    _, state, _ = DM.load_trained(os.path.join(str(tmp_path / "unstable"), "score_matching", "seed0"))
    assert int(state.step) == r["steps"] < stable["steps"]
    assert all(bool(np.all(np.isfinite(p))) for p in jax.tree.leaves(state.params))  # the last good state


def test_objective_settings_and_presets():
    assert DM.objective_settings("score_matching", "authors") == dict(lam=1e-5, mu=1e-3, sigma=0.01)
    assert DM.objective_settings("anti_score_matching", "thesis", tau=5.0)["tau"] == 5.0
    assert DM.objective_settings("score_matching", form="antithetic")["form"] == "antithetic"
    with pytest.raises(ValueError, match="objective"):
        DM.objective_settings("nope")
    with pytest.raises(ValueError, match="preset"):
        DM.objective_settings("baseline", "nope")
