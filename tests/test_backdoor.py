"""Backdoor statistics, MAD anomaly index, localization / IoU, trigger poisoning, and Neural Cleanse on a tiny
hand-made trojaned model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax import backdoor as bd
from gradjax import data
from gradjax.neural_cleanse import apply_trigger, neural_cleanse

from tests.test_input_agnostic import K, SHAPE, TROJAN, trojaned_logits

pytestmark = pytest.mark.usefixtures("fast_compilation")


def test_mad_flags_a_handmade_outlier():
    values = jnp.array([1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 0.98, 1.0, 0.2, 1.03])
    a, flagged = bd.flag_anomalies(values, side="low")
    assert np.flatnonzero(np.asarray(flagged)).tolist() == [8]
    assert float(a[8]) > 2
    d = bd.detect(values)
    assert bool(d.detected) and int(d.suspect) == 8
    # the same outlier on the high side is not flagged as "low", but is as "high"
    _, f_high = bd.flag_anomalies(-values, side="low")
    assert not np.any(np.asarray(f_high))
    assert np.flatnonzero(np.asarray(bd.flag_anomalies(-values, side="high")[1])).tolist() == [8]


@pytest.mark.parametrize("values", [jnp.full((10,), 3.0), jnp.linspace(0.0, 1.0, 10), jnp.arange(43.0)])
def test_mad_flags_nothing_in_uniform_values(values):
    for side in bd.SIDES:
        _, flagged = bd.flag_anomalies(values, side=side)
        assert not np.any(np.asarray(flagged)), side
    assert not bool(bd.detect(values).detected)


def test_mad_index_value():
    v = jnp.array([0.0, 1.0, 2.0, 3.0, 10.0])  # median 2, |dev| = 2 1 0 1 8, MAD 1
    np.testing.assert_allclose(np.asarray(bd.mad_anomaly_index(v)), np.array([2, 1, 0, 1, 8]) / 1.4826, rtol=1e-6)


def test_radius_for_success_interpolates_in_log_radius():
    radii = jnp.array([8.0, 4.0, 2.0, 1.0])
    assert float(bd.radius_for_success(radii, jnp.array([1.0, 1.0, 1.0, 0.95]), 0.9)) == pytest.approx(1.0)
    assert float(bd.radius_for_success(radii, jnp.array([0.5, 0.4, 0.1, 0.0]), 0.9)) == pytest.approx(16.0)
    # 0.9 halfway between 1.0 (r=4) and 0.8 (r=2) in log r: sqrt(8)
    r = bd.radius_for_success(radii, jnp.array([1.0, 1.0, 0.8, 0.1]), 0.9)
    assert float(r) == pytest.approx(np.sqrt(8.0), rel=1e-5)
    batched = bd.radius_for_success(jnp.stack([radii, radii]), jnp.array([[1.0, 1.0, 0.8, 0.1], [1, 1, 1, 1.0]]))
    np.testing.assert_allclose(np.asarray(batched), [np.sqrt(8.0), 1.0], rtol=1e-5)
    assert int(bd.critical_index(jnp.array([1.0, 1.0, 0.8, 0.1]))) == 1
    assert float(bd.success_area(radii, jnp.ones(4))) == pytest.approx(1.0)


def test_compactness_concentration_and_localization_iou():
    heat = jnp.zeros((16, 16)).at[12:15, 12:15].set(1.0)
    assert float(bd.window_compactness(heat, 3)) == pytest.approx(1.0)
    assert float(bd.window_compactness(jnp.ones((16, 16)), 3)) == pytest.approx(9 / 256)
    assert float(bd.energy_concentration(heat, 9 / 256)) == pytest.approx(1.0)
    planted = data.trigger_mask((16, 16), (3, 3), (12, 12))
    assert float(bd.iou(bd.localize(heat + 0.01), planted)) == pytest.approx(1.0)
    shifted = jnp.zeros((16, 16)).at[13:16, 13:16].set(1.0)
    assert float(bd.iou(bd.localize(shifted), planted)) == pytest.approx(4 / 14)
    assert float(bd.iou(bd.localize(heat, area=9), planted)) == pytest.approx(1.0)
    assert float(bd.iou(jnp.zeros((4, 4), bool), jnp.zeros((4, 4), bool))) == 0.0


def test_trigger_helpers_and_blended_poisoning():
    t = data.make_trigger(3, "checkerboard", low=-1.0, high=2.0)
    assert t.shape == (3, 3, 1) and t[0, 0, 0] == 2.0 and t[0, 1, 0] == -1.0
    assert np.all(data.make_trigger(2, "white", channels=3, high=[1, 2, 3]) == np.array([1, 2, 3]))
    mask = data.trigger_mask((8, 8), (3, 3))
    assert mask.sum() == 9 and mask[-3:, -3:].all()
    imgs = np.zeros((4, 8, 8, 1), np.float32)
    blended = data.stamp_trigger(imgs, np.ones((3, 3, 1), np.float32), (-1, -1), alpha=0.25)
    np.testing.assert_allclose(blended[:, -3:, -3:], 0.25)
    assert blended[:, :5].sum() == 0
    rand = data.stamp_trigger(imgs, np.ones((2, 2, 1), np.float32), "random", rng=np.random.default_rng(0))
    assert np.all(rand.reshape(4, -1).sum(1) == 4)
    with pytest.raises(ValueError, match="alpha"):
        data.stamp_trigger(imgs, np.ones((2, 2, 1)), alpha=0.0)
    with pytest.raises(ValueError, match="does not fit"):
        data.trigger_mask((8, 8), (3, 3), (7, 7))


def test_apply_trigger():
    x = jnp.ones((2,) + SHAPE)
    m = jnp.zeros(SHAPE[:2]).at[0, 0].set(1.0)
    p = jnp.full(SHAPE, 5.0)
    y = apply_trigger(x, m, p)
    assert float(y[0, 0, 0, 0]) == 5.0 and float(y[0, 1, 1, 0]) == 1.0


def _nc_images():
    return jax.random.uniform(jax.random.PRNGKey(3), (64,) + SHAPE) * 0.6


@pytest.fixture(scope="module")
def nc_result():
    images = _nc_images()
    run = jax.jit(lambda k: neural_cleanse(trojaned_logits, images, "all", key=k, steps=150, batch_size=16,
                                           learning_rate=0.2, patience=5))
    return run(jax.random.PRNGKey(0))


def test_neural_cleanse_finds_the_planted_backdoor(nc_result):
    r = nc_result
    assert r.mask.shape == (K,) + SHAPE[:2] and r.pattern.shape == (K,) + SHAPE
    assert bool(r.reached[TROJAN]) and float(r.success[TROJAN]) >= 0.5  # best-on-a-batch mask, scored on all
    assert int(jnp.argmin(r.l1)) == TROJAN
    d = bd.detect(r.l1)
    assert int(d.suspect) == TROJAN  # (with K = 4 classes the MAD threshold of 2 is not meaningful)
    # the minimal mask uses part of the patch (the toy trigger fires on the patch mean): all of it inside the patch
    hot, planted = np.asarray(bd.localize(r.mask[TROJAN])), data.trigger_mask(SHAPE[:2], (2, 2))
    assert hot.any() and not np.any(hot & ~planted)
    assert float(jnp.min(r.pattern)) >= 0.0 and float(jnp.max(r.pattern)) <= 1.0
    # success: the fraction of all the images the triggered model assigns to the class, by hand
    images = _nc_images()
    for c in range(K):
        hand = np.mean(np.asarray(jnp.argmax(trojaned_logits(apply_trigger(images, r.mask[c], r.pattern[c])), -1)) == c)
        assert float(r.success[c]) == pytest.approx(hand)


def test_neural_cleanse_success_does_not_depend_on_chunk():
    from gradjax.neural_cleanse import _success_rate

    images = _nc_images()
    m = jnp.zeros(SHAPE[:2]).at[-2:, -2:].set(0.3)
    p = jnp.ones(SHAPE)
    hand = np.mean(np.asarray(jnp.argmax(trojaned_logits(apply_trigger(images, m, p)), -1)) == TROJAN)
    assert 0.1 < hand < 1.0  # a partial trigger: some images flip, some do not
    for chunk, budget in ((None, None), (7, None), (None, 1)):  # one call; 9 chunks + a rest of 1; chunks of 1
        assert float(_success_rate(trojaned_logits, images, m, p, TROJAN, chunk, budget)) == pytest.approx(hand)


def test_neural_cleanse_validation():
    images = jnp.zeros((4,) + SHAPE)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        neural_cleanse(trojaned_logits, images, 9, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="rank 4"):
        neural_cleanse(trojaned_logits, images[0], 0, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="steps"):
        neural_cleanse(trojaned_logits, images, 0, key=jax.random.PRNGKey(0), steps=0)
    with pytest.raises(ValueError, match="chunk"):
        neural_cleanse(trojaned_logits, images, 0, key=jax.random.PRNGKey(0), chunk=0)


def test_input_agnostic_statistics_detect_the_planted_backdoor():
    from tests.test_input_agnostic import _run

    r = _run("all", radius=2.0)
    st = bd.class_statistics(r, window=2)
    assert st.radius.shape == (K,) and st.heatmap.shape == (K,) + SHAPE[:2]
    assert int(jnp.argmin(st.radius)) == TROJAN
    assert float(bd.iou(bd.localize(st.heatmap[TROJAN], area=4), data.trigger_mask(SHAPE[:2], (2, 2)))) >= 0.5


def test_backdoor_experiment_smoke(tmp_path):
    import json
    import os

    from experiments import backdoor_discovery

    out = str(tmp_path / "bd")
    res = backdoor_discovery.main(["--scale", "smoke", "--out", out, "--no-progress"])
    for f in ("results.json", "results.md", "triggers.png", "class_maps.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    saved = json.load(open(os.path.join(out, "results.json")))
    assert [m["kind"] for m in saved["models"]] == ["trojaned", "clean"]
    for m in ("input_agnostic", "neural_cleanse"):
        assert 0.0 <= res["models"][0][m]["iou"] <= 1.0
        assert len(res["models"][1][m]["anomaly_index"]) == 10
