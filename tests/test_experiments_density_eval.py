"""Smoke test of experiments/density_evaluation.py: two tiny density models (MLP, 8x8 digits, trained by
experiments.density_models), an independently trained VGG-4 judge, every evaluation part and the estimator-study /
sweep path (one row each), writing results, tables and PNGs."""
import json
import os

import numpy as np
import pytest

from experiments import density_evaluation as DE
from experiments import density_models as DM

pytestmark = pytest.mark.usefixtures("fast_compilation")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("models"))
    DM.main(["--scale", "smoke", "--model", "mlp", "--image-size", "8", "--objectives", "baseline", "gradient_norm",
             "--no-policy-gap", "--out", d])
    return d


def test_density_evaluation_smoke(models, tmp_path):
    out = str(tmp_path / "eval")
    res = DE.main(["--scale", "smoke", "--models", models, "--objectives", "baseline", "gradient_norm",
                   "--keys", "0", "1", "--sweep", "--lams", "1e-3", "--mus", "1e-4", "--out", out])
    s = res["summary"]
    assert set(s) == {"baseline", "gradient_norm"}
    for o, d in s.items():
        assert 0.0 <= d["gan_test"][0] <= 1.0 and np.isfinite(d["log_ratio_slope"][0])
        assert d["median_ratio"][0] == 1.0 and d["mean_ratio"][0] == 1.0  # zero noise: ratio exactly 1
        assert len(d["pixel_own"]) == 9 and all(0.0 <= v <= 1.0 for v in d["pixel_own"] + d["pixel_baseline"])
        assert d["denoise"]["mse_noisy"][0] > 0
    # Fig. 5.3b evaluates on the baseline: the baseline row equals its own-gradient curve
    np.testing.assert_allclose(s["baseline"]["pixel_own"], s["baseline"]["pixel_baseline"])
    assert len(res["per_seed"][0]["gan_test"]["baseline"]["per_key"]) == 2
    assert res["judge"]["model"] == "vgg4"
    row = res["sweep"]["rows"][0]
    assert (row["lam"], row["mu"]) == (1e-3, 1e-4) and 0.0 <= row["gan_test"]["mean"] <= 1.0
    for png in ("ratios.png", "samples_ascent.png", "samples_langevin.png", "pixel_own.png", "pixel_baseline.png",
                "gradients.png", "denoise.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000, png
    with open(os.path.join(out, "results.json")) as fh:
        assert json.load(fh)["keys"] == [0, 1]
    assert "GAN-test" in open(os.path.join(out, "results.md")).read()


def test_judge_of_the_generators_architecture_is_refused(models, tmp_path):
    with pytest.raises(ValueError, match="judge-model"):
        DE.main(["--scale", "smoke", "--models", models, "--objectives", "baseline", "--judge-model", "mlp",
                 "--out", str(tmp_path / "e")])
