"""The chapter-2 experiment scripts (Tables 2.1-2.5) run end to end at the smoke scale through the one training
engine and write results.json, results.md and a PNG."""
import json
import os

import numpy as np
import pytest

from experiments import distill_fewshot, lwf_transfer, noise_robustness

pytestmark = pytest.mark.usefixtures("fast_compilation")


def _outputs(out, png):
    for f in ("results.json", "results.md", png):
        assert os.path.exists(os.path.join(out, f)), f
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def test_distill_fewshot_smoke(tmp_path):
    out = str(tmp_path / "t21")
    res = distill_fewshot.main(["--scale", "smoke", "--seeds", "2", "--methods", "CE,CE + {A+J}", "--out", out])
    saved = _outputs(out, "table2_1.png")
    assert set(saved["results"]) == {"CE", "CE + {A+J}"}
    for m, per_n in res["results"].items():
        assert set(per_n) == {1, 2}
        for v in per_n.values():
            assert len(v["runs"]) == 2 and all(0.0 <= a <= 1.0 for a in v["runs"])
    assert "thesis" in open(os.path.join(out, "results.md")).read().lower()


def test_noise_robustness_smoke(tmp_path):
    out = str(tmp_path / "t22")
    res = noise_robustness.main(["--scale", "smoke", "--configs", "lambda=0,lambda=1,dropout", "--out", out])
    _outputs(out, "table2_2.png")
    assert set(res["results"]) == {"lambda=0", "lambda=1", "dropout"}
    for per_sigma in res["results"].values():
        assert set(per_sigma) == {str(s) for s in noise_robustness.SIGMAS}
    with pytest.raises(ValueError, match="unknown configs"):
        noise_robustness.main(["--scale", "smoke", "--configs", "lambda=3", "--out", out])


def test_noise_robustness_dropout_placements():
    """``dropout`` drops only the last conv block's output (before the classifier); ``dropout-pools`` drops after
    every max-pool; the lambda/l2 models have none. Module paths (hence parameters) are the same for all."""
    import jax
    import jax.numpy as jnp

    cfgs = noise_robustness.configs()
    models = {n: noise_robustness.build_model("vgg4", 3, 1 / 16, p, r) for n, (_, p, r) in cfgs.items()}
    assert models["dropout"].dropout_block == 2 and models["dropout"].dropout_block_rate == 0.25
    assert models["dropout"].dropout == 0.0 and models["dropout-pools"].dropout == 0.25
    assert models["l2"].dropout == 0.0 and models["l2"].dropout_block is None
    x = jnp.ones((2, 8, 8, 1))
    variables = models["l2"].init(jax.random.PRNGKey(0), x)
    for name in ("dropout", "dropout-pools"):
        assert jax.tree.structure(models[name].init(jax.random.PRNGKey(0), x)) == jax.tree.structure(variables)
        a, b = (models[name].apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(k)},
                                   mutable=["batch_stats"])[0] for k in (1, 2))
        assert not np.allclose(a, b), f"{name}: dropout inactive in train mode"
        np.testing.assert_array_equal(models[name].apply(variables, x), models["l2"].apply(variables, x))


def test_lwf_transfer_smoke(tmp_path, monkeypatch):
    out = str(tmp_path / "lwf")
    cache = str(tmp_path / "cache" / "teacher.msgpack")
    runs = []  # every Trainer.run: the teacher, the oracle's pretraining, then one per student and seed
    real_run = lwf_transfer.common.Trainer.run
    monkeypatch.setattr(lwf_transfer.common.Trainer, "run",
                        lambda self, *a, **k: runs.append(k.get("seed")) or real_run(self, *a, **k))
    res = lwf_transfer.main(["--scale", "smoke", "--tables", "2.3", "--out", out, "--teacher-cache", cache,
                             "--methods", "CE pretrained (oracle),CE + {A+att+J}"])
    assert runs == [1000, 2000, 0, 0]
    _outputs(out, "table2_3.png")
    r = res["results"]["table2_3"]
    assert set(r) == {"CE pretrained (oracle)", "CE + {A+att+J}"}
    assert all(0.0 <= v["5"]["mean"] <= 1.0 for v in r.values())
    # disjoint tasks: teacher on source digits 0-4 of one dataset, student on digits 5-9 of another
    assert set(res["source_classes"]).isdisjoint(res["target_classes"])
    assert res["source"] != res["target"]
    # --teacher-cache: a second run loads the teacher and the oracle's pretrained student instead of training them,
    # and reproduces the oracle's accuracy (a budget sweep shares one teacher)
    assert os.path.exists(cache) and os.path.exists(str(tmp_path / "cache" / "teacher.oracle.msgpack"))
    runs.clear()
    again = lwf_transfer.main(["--scale", "smoke", "--tables", "2.3", "--out", out + "2", "--teacher-cache", cache,
                               "--methods", "CE pretrained (oracle)"])
    assert runs == [0]
    assert again["results"]["teacher_accuracy"] == res["results"]["teacher_accuracy"]
    assert again["results"]["table2_3"]["CE pretrained (oracle)"] == r["CE pretrained (oracle)"]
