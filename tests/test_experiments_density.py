"""Smoke tests of the ch. 5 experiments (density models, fooling) and of the divergence guard under score-matching.

The ResNet-18 / VGG-11 compile takes minutes on a loaded 2-core CPU, so these tests swap in an MLP (``--model
mlp``) on 8×8 digits; the experiment code path (terms → combinator → engine → checkpoints) is the same."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
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


# ------------------------------------------------------------------ the authors' training recipe (issue 25)
@pytest.fixture(scope="module")
def bn_setup():
    """A tiny VGG-4 with BatchNorm (width 1/16, 8x8), a batch far from the init running statistics."""
    from gradjax.models import create_model
    model = create_model("vgg4", 10, width=1 / 16, activation="softplus", beta=10.0)
    x = jax.random.uniform(jax.random.PRNGKey(0), (6, 8, 8, 1)) * 2.0 + 0.5
    y = jnp.arange(6) % 10
    v = model.init(jax.random.PRNGKey(1), x, train=False)
    return model, v["params"], {"batch_stats": v["batch_stats"]}, x, y


def test_train_mode_bn_regularizer_uses_batch_moments_and_updates_running_stats_once(bn_setup):
    """``--bn-policy train``: the gradient-norm pass normalizes by the batch's own moments, so example 0's input
    gradient depends on the other examples (not under the frozen policy, where moments are constants); the
    running statistics are those of one clean train-mode pass (documented: the clean pass only)."""
    from gradjax import model as gm
    from gradjax.losses import terms as LT
    from gradjax.train import StepContext
    model, params, state, x, y = bn_setup
    ctx = StepContext(rng=jax.random.PRNGKey(0), step=jnp.int32(0), frozen=None)
    terms = DM.make_terms("gradient_norm", dict(lam=1e-3))

    def reg(policy, xx):
        loss, aux = LT.make_loss_fn(model.apply, terms, policy=policy)(params, state, {"image": xx, "label": y}, ctx)
        return float(aux["metrics"]["term/gradient_norm"]), aux["model_state"]

    # reference: per-example ||d f_y / dx||^2 through a train-mode pass on the whole batch (the authors' autograd)
    def fy_sum(xx):
        lg = gm.apply_train(model.apply, params, state, xx)[0]
        return jnp.sum(lg[jnp.arange(len(y)), y])
    g = jax.grad(fy_sum)(x)
    want = float(jnp.mean(jnp.sum(g ** 2, axis=(1, 2, 3))))
    got_train, st_train = reg("train", x)
    got_frozen, st_frozen = reg("frozen", x)
    assert got_train == pytest.approx(want, rel=1e-4)
    assert abs(got_train - got_frozen) > 1e-3 * abs(got_frozen)  # the policies really differ
    clean_state = gm.apply_train(model.apply, params, state, x)[1]
    for st in (st_train, st_frozen):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), st, clean_state)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(clean_state), jax.tree.leaves(state)))  # updated

    # batch coupling: changing examples 1..5 changes example 0's train-mode gradient, not its frozen-moment one
    x2 = x.at[1:].set(x[1:] * 0.3)
    def grad0(policy, xx):
        out = gm.apply_train(model.apply, params, state, xx)
        fn = gm.extra_pass_fn(model.apply, params, state, out[2], policy)
        return jax.grad(lambda z: jnp.sum(fn(z)[0][jnp.arange(len(y)), y]))(xx)[0]
    assert not np.allclose(grad0("train", x), grad0("train", x2), rtol=1e-3, atol=1e-6)


def test_authors_training_options_are_recorded_and_train(tiny, tmp_path):
    sc, tr, te = tiny
    assert DM.authors_padding(32) == 4 and DM.authors_padding(16) == 2 and DM.authors_padding(8) == 1
    r = DM.DensityRunner(sc, tr, te, preset="thesis", bn_policy="train", augment_pad=1).run(
        "gradient_norm", 0, str(tmp_path / "a"))
    assert r["diverged"] is None and np.isfinite(r["test_cross_entropy"])
    _, _, cfg = DM.load_trained(os.path.join(str(tmp_path / "a"), "gradient_norm", "seed0"))
    assert cfg.augment_pad == 1 and cfg.bn_policy == "train"
    with pytest.raises(ValueError, match="augment_pad"):
        DM.DensityRunner(sc, tr, te, preset="thesis", augment_pad=-1)


def test_chapter5_scripts_default_to_real_mnist_digits():
    from experiments import density_evaluation as DE, fooling
    args = DM.parse_args([])
    assert args.scale == "small" and DM.SCALES[args.scale].dataset == "mnist_digits"
    assert fooling.SCALES[fooling.parse_args([]).scale].dataset == "mnist_digits"
    assert DE.parse_args([]).scale == "small"
