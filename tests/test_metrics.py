"""Tests of gradjax.metrics (pixel perturbation, ROAR, digit flipping, randomization sanity check) against hand
computations, and of gradjax.viz (PNG output)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from gradjax import metrics as M
from gradjax import saliency as S
from gradjax import viz
from gradjax.models import create_model


pytestmark = pytest.mark.usefixtures("fast_compilation")


def linear_logits(W):
    """logits = [<W, x>, -<W, x> / 2]: class 0 is the top class for positive inputs."""
    def f(x):
        s = jnp.sum((x * W).reshape(x.shape[0], -1), axis=1)
        return jnp.stack([s, -0.5 * s], axis=1)
    return f


X = jnp.array([[[[1.0], [2.0]], [[3.0], [4.0]]]])  # [1, 2, 2, 1]
SAL = X[..., 0]
F = linear_logits(jnp.ones((1, 2, 2, 1)))  # f_0(X) = 10


# ------------------------------------------------------------------------------------------------------------
# pixel removal and pixel perturbation
# ------------------------------------------------------------------------------------------------------------

def test_removal_mask_and_remove_pixels_by_hand():
    np.testing.assert_array_equal(np.asarray(M.removal_mask(SAL, 0.5, most_salient=False))[0], [[1, 1], [0, 0]])
    np.testing.assert_array_equal(np.asarray(M.removal_mask(SAL, 0.25, most_salient=True))[0], [[0, 0], [0, 1]])
    np.testing.assert_array_equal(np.asarray(M.removal_mask(SAL, 0.0))[0], [[0, 0], [0, 0]])
    # ties: broken by position, row-major
    np.testing.assert_array_equal(np.asarray(M.removal_mask(jnp.zeros((1, 2, 2)), 0.5))[0], [[1, 1], [0, 0]])
    # per-image, per-channel mean fill; all channels of a pixel go together
    x2 = jnp.concatenate([X, 10 * X], axis=-1)
    out = M.remove_pixels(x2, SAL, 0.25, most_salient=True, fill="mean")
    np.testing.assert_allclose(np.asarray(out[0, 1, 1]), [2.5, 25.0])
    np.testing.assert_allclose(np.asarray(out[0, 0]), np.asarray(x2[0, 0]))
    out = M.remove_pixels(x2, SAL, 0.5, most_salient=False, fill=jnp.array([-1.0, -2.0]))
    np.testing.assert_allclose(np.asarray(out[0, 0]), [[-1.0, -2.0], [-1.0, -2.0]])
    # a traced fraction works (jit / vmap over fractions)
    masks = jax.vmap(lambda k: M.removal_mask(SAL, k))(jnp.array([0.25, 0.75]))
    np.testing.assert_array_equal(np.asarray(masks.sum(axis=(1, 2, 3))), [1, 3])


def test_pixel_perturbation_by_hand():
    fr = [0.0, 0.25, 0.5, 1.0]
    # least salient first, black fill (thesis §3.5.1): remove 1 -> 9, 1,2 -> 7, all -> 0
    c = M.pixel_perturbation(F, X, SAL, fr)
    np.testing.assert_allclose(np.asarray(c.values[:, 0]), [0.0, 0.1, 0.3, 1.0], rtol=1e-6)
    cj = jax.jit(lambda x, s: M.pixel_perturbation(F, x, s, fr))(X, SAL)
    np.testing.assert_allclose(np.asarray(cj.values), np.asarray(c.values), rtol=1e-6)
    # most salient first: remove 4 -> 6
    np.testing.assert_allclose(float(M.perturbation_scores(F, X, SAL, 0.25, most_salient=True)[0]), 0.4, rtol=1e-6)
    # mean fill: [2.5, 2.5, 3, 4] -> 12
    np.testing.assert_allclose(float(M.perturbation_scores(F, X, SAL, 0.5, fill="mean")[0]), 0.2, rtol=1e-6)
    # probability variant: softmax([10, -5])_0 vs softmax([7, -3.5])_0
    p0 = jax.nn.softmax(jnp.array([10.0, -5.0]))[0]
    p1 = jax.nn.softmax(jnp.array([7.0, -3.5]))[0]
    got = M.perturbation_scores(F, X, SAL, 0.5, output="probability")[0]
    np.testing.assert_allclose(float(got), float(abs(p1 - p0) / p0), rtol=1e-5)
    # an explicit target class (class 1: -5 -> -3.5)
    np.testing.assert_allclose(float(M.perturbation_scores(F, X, SAL, 0.5, target=jnp.array([1]))[0]), 0.3, rtol=1e-6)


def test_pixel_perturbation_accuracy_variant():
    # example 0: positive image (class 0); example 1: negative image (class 1). Removing everything with a
    # fill of -1 makes both negative -> predicted class 1.
    x = jnp.concatenate([X, -X])
    s = x[..., 0] * 0 + jnp.arange(4.0).reshape(1, 2, 2)
    c = M.pixel_perturbation(F, x, s, [0.0, 1.0], fill=-1.0, output="accuracy", labels=jnp.array([0, 1]))
    np.testing.assert_array_equal(np.asarray(c.values), [[1, 1], [0, 1]])
    np.testing.assert_allclose(np.asarray(c.mean), [1.0, 0.5])
    # labels default to the clean predictions (agreement)
    c2 = M.pixel_perturbation(F, x, s, [1.0], fill=-1.0, output="accuracy")
    np.testing.assert_array_equal(np.asarray(c2.values), [[0, 1]])


def test_random_baseline_removes_the_right_number_of_pixels():
    x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1) + 0.25
    s = M.random_saliency_like(jax.random.key(0, impl="rbg"), x)
    out = M.remove_pixels(x, s, 0.375, fill="zero")
    np.testing.assert_array_equal(np.asarray((out == 0).sum(axis=(1, 2, 3))), [6, 6])


# ------------------------------------------------------------------------------------------------------------
# ROAR
# ------------------------------------------------------------------------------------------------------------

def test_roar_by_hand():
    tr = np.stack([np.asarray(X[0]), 2 * np.asarray(X[0]), -np.asarray(X[0])])  # 3 train images
    te = np.asarray(X)
    s_tr = tr[..., 0].copy()
    s_te = np.asarray(SAL)
    calls = []

    def train_and_evaluate(a, ya, b, yb):
        calls.append((a, ya, b, yb))
        return float(b.sum())

    res = M.roar(train_and_evaluate, tr, np.array([0, 1, 2]), te, np.array([0]), s_tr, s_te, [0.0, 0.5])
    assert res.fractions == (0.0, 0.5) and len(calls) == 2
    np.testing.assert_allclose(calls[0][0], tr)  # k = 0: unmodified
    expected_tr = tr.copy()
    for i, (img, sal) in enumerate(zip(tr, s_tr)):  # the two most salient pixels -> the image's mean
        idx = np.argsort(-sal.ravel(), kind="stable")[:2]
        flat = expected_tr[i].reshape(-1, 1)
        flat[idx] = img.mean()
    np.testing.assert_allclose(calls[1][0], expected_tr)
    np.testing.assert_allclose(calls[1][2][0, ..., 0], [[1, 2], [2.5, 2.5]])
    np.testing.assert_array_equal(calls[1][1], [0, 1, 2])
    assert res.accuracies == (10.0, 8.0)
    # chunking does not change the result (2 + 1 images; 1-image chunks from a 1-byte memory budget)
    for opts in (dict(chunk=2), dict(memory_budget=1)):
        calls.clear()
        M.roar(train_and_evaluate, tr, np.array([0, 1, 2]), te, np.array([0]), s_tr, s_te, [0.5], **opts)
        np.testing.assert_allclose(calls[0][0], expected_tr)

    calls.clear()
    rnd = M.roar_random_baseline(train_and_evaluate, tr, np.array([0, 1, 2]), te, np.array([0]), [0.5],
                                 key=jax.random.key(1, impl="rbg"))
    changed = (calls[0][0] != tr).reshape(3, -1).sum(axis=1)
    np.testing.assert_array_equal(changed, [2, 2, 2])  # no pixel equals its image's mean
    assert len(rnd.accuracies) == 1
    with pytest.raises(ValueError, match="maps for"):
        M.roar(train_and_evaluate, tr, None, te, None, s_tr[:2], s_te, [0.5])


def test_roar_separation_by_hand():
    acc = {"a": [[0.90, 0.50], [0.92, 0.54]],   # means 0.91, 0.52; unbiased vars 2e-4, 8e-4
           "b": [[0.80, 0.50], [0.82, 0.50]],   # means 0.81, 0.50; vars 2e-4, 0
           "c": [[0.90, 0.49], [0.90, 0.51]]}   # means 0.90, 0.50; vars 0, 2e-4
    sep = M.roar_separation(acc)
    pooled = np.sqrt([(2e-4 + 2e-4 + 0) / 3, (8e-4 + 0 + 2e-4) / 3])
    np.testing.assert_allclose(sep.pooled_std, pooled)
    np.testing.assert_allclose(sep.spread, [0.10 / pooled[0], 0.02 / pooled[1]])
    # fraction 0: |a-b| = 0.10, |c-b| = 0.09 exceed 2 * 0.0115; |a-c| = 0.01 does not. fraction 1: none does
    np.testing.assert_array_equal(sep.separated_pairs, [2, 0])
    assert sep.n_pairs == 3
    # a looser threshold separates fewer pairs; 0.09 / 0.0115 = 7.8 pooled stds
    np.testing.assert_array_equal(M.roar_separation(acc, threshold=8.0).separated_pairs, [1, 0])
    # invariant to a common affine change of the accuracies and to the order of the methods
    moved = M.roar_separation({k: 3.0 * np.asarray(v) - 1.0 for k, v in reversed(list(acc.items()))})
    np.testing.assert_allclose(moved.spread, sep.spread)
    np.testing.assert_array_equal(moved.separated_pairs, sep.separated_pairs)
    # no seed noise: every pair with different means is separated, equal means give nan spread
    flat = M.roar_separation({"a": [[0.5], [0.5]], "b": [[0.4], [0.4]], "c": [[0.4], [0.4]]})
    assert np.isinf(flat.spread[0]) and flat.separated_pairs[0] == 2
    assert np.isnan(M.roar_separation({"a": [[0.5], [0.5]], "b": [[0.5], [0.5]]}).spread[0])


def test_roar_separation_rejects_bad_input():
    with pytest.raises(ValueError, match="at least two method"):
        M.roar_separation({"a": [[0.9], [0.8]]})
    with pytest.raises(ValueError, match="at least 2 seeds"):
        M.roar_separation({"a": [[0.9, 0.8]], "b": [[0.7, 0.6]]})
    with pytest.raises(ValueError, match="same \\[seeds, fractions\\] shape"):
        M.roar_separation({"a": [[0.9], [0.8]], "b": [[0.7], [0.6], [0.5]]})
    with pytest.raises(ValueError, match="non-finite"):
        M.roar_separation({"a": [[0.9], [np.nan]], "b": [[0.7], [0.6]]})
    with pytest.raises(ValueError, match="threshold"):
        M.roar_separation({"a": [[0.9], [0.8]], "b": [[0.7], [0.6]]}, threshold=0.0)


# ------------------------------------------------------------------------------------------------------------
# digit flipping
# ------------------------------------------------------------------------------------------------------------

A8 = jnp.array([[3.0, 0.0], [1.0, 0.0]])
B3 = jnp.array([[0.0, 0.0], [0.0, 2.0]])


def ten_class_logits(x):
    f8 = jnp.sum(x[..., 0] * A8, axis=(1, 2))
    f3 = jnp.sum(x[..., 0] * B3, axis=(1, 2))
    z = jnp.zeros_like(f8)
    return jnp.stack([z, z, z, f3, z, z, z, z, f8, z], axis=1)


def test_digit_flip_by_hand():
    x = jnp.ones((1, 2, 2, 1))
    # S_8 - S_3 = [[3, 0], [1, -2]]; erase the top 2 (both positive): f8 4 -> 0, f3 2 -> 2
    r = M.digit_flip(ten_class_logits, x, A8[None], B3[None], budget=0.5)
    np.testing.assert_array_equal(np.asarray(r.mask[0]), [[1, 0], [1, 0]])
    np.testing.assert_allclose(float(r.log_odds_before[0]), 2.0)
    np.testing.assert_allclose(float(r.log_odds_after[0]), -2.0)
    np.testing.assert_allclose(float(r.delta_log_odds[0]), 4.0)
    # the whole budget: only pixels with S_8 - S_3 > 0 are erased ...
    r = M.digit_flip(ten_class_logits, x, A8[None], B3[None], budget=1.0)
    np.testing.assert_allclose(float(r.delta_log_odds[0]), 4.0)
    # ... unless positive_only=False, which also erases the evidence for 3
    r = M.digit_flip(ten_class_logits, x, A8[None], B3[None], budget=1.0, positive_only=False)
    np.testing.assert_allclose(float(r.delta_log_odds[0]), 2.0)
    # through a registered saliency method (signed gradient of the linear model = A8 / B3)
    r2 = M.digit_flip_with_method("gradient", ten_class_logits, x, budget=0.5, reduce="sum")
    np.testing.assert_allclose(float(r2.delta_log_odds[0]), 4.0)
    rj = jax.jit(lambda x_: M.digit_flip(ten_class_logits, x_, A8[None], B3[None], budget=0.5))(x)
    np.testing.assert_allclose(np.asarray(rj.delta_log_odds), [4.0])
    with pytest.raises(ValueError, match="source"):
        M.digit_flip(ten_class_logits, x, A8[None], B3[None], source=10)


# ------------------------------------------------------------------------------------------------------------
# sanity check
# ------------------------------------------------------------------------------------------------------------

def test_rank_correlation_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, (3, 6, 6)).astype(np.float32)
    b = (a + rng.integers(0, 4, (3, 6, 6))).astype(np.float32)
    got = np.asarray(M.rank_correlation(a, b))
    want = [stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(M.rank_correlation(a, a)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(M.rank_correlation(a, -a)), -1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(M.rank_correlation(a, -a, absolute=True)), 1.0, rtol=1e-6)
    assert float(M.rank_correlation(np.zeros((1, 3, 3)), a[:1, :3, :3])[0]) == 0.0
    s = np.asarray(M.ssim(a, a))
    np.testing.assert_allclose(s, 1.0, rtol=1e-5)
    assert np.all(np.asarray(M.ssim(a, rng.standard_normal(a.shape))) < 0.5)


def numpy_variables(model, x, seed):
    """Variables with non-zero biases and BatchNorm statistics, drawn with numpy from the shapes of
    ``model.init`` (nothing compiled): kernels He-normal, vectors N(0, 0.2^2) (+1 for scales), var U(0.5, 1.5)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            v = rng.standard_normal(s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))
        elif "var" in name:
            v = rng.uniform(0.5, 1.5, s.shape)
        else:
            v = ("scale" in name) + 0.2 * rng.standard_normal(s.shape)
        return jnp.asarray(v, s.dtype)

    return {k: jax.tree_util.tree_map_with_path(fill, shapes[k]) for k in ("params", "batch_stats")}


@pytest.fixture(scope="module")
def vgg():
    model = create_model("vgg4", 10, width=0.125)
    # random-sign images: |x| = 1 everywhere, so grad * x carries no image structure of its own (with natural
    # images the input term of FullGrad and grad x input keeps |x| after randomization: Adebayo et al.)
    x = jnp.asarray(np.sign(np.random.default_rng(0).standard_normal((4, 8, 8, 1))), jnp.float32)
    return model, numpy_variables(model, x, 0), x


def test_cascading_randomization_goes_from_the_output_backwards(vgg):
    model, v, x = vgg
    order = M.module_order(S.ModelHandle(model.apply, v), x)
    assert order == ["block0", "block1", "block2", "head"]
    stages = M.cascading_randomization(v["params"], jax.random.key(0, impl="rbg"), layers=order)
    assert [n for n, _ in stages] == ["original", "head", "block2", "block1", "block0"]
    p0 = v["params"]
    for i, (_, p) in enumerate(stages):
        randomized = set(order[len(order) - i:])
        for name in order:
            same = all(np.array_equal(np.asarray(a), np.asarray(b))
                       for a, b in zip(jax.tree.leaves(p[name]), jax.tree.leaves(p0[name])))
            assert same == (name not in randomized), (i, name)
    # the model's own initializers
    fresh = jax.tree.map(jnp.zeros_like, p0)
    st = M.cascading_randomization(p0, None, layers=order, init_fn=lambda k: fresh)
    assert float(jnp.abs(st[1][1]["head"]["kernel"]).max()) == 0.0
    assert bool(jnp.array_equal(st[1][1]["block2"]["conv"]["kernel"], p0["block2"]["conv"]["kernel"]))


def test_sanity_check_fullgrad_and_gradient_decorrelate(vgg):
    model, v, x = vgg
    order = M.module_order(S.ModelHandle(model.apply, v), x)
    t = jnp.array([1, 2, 3, 4])
    results, direct_maps = {}, {}
    for name in ("fullgrad", "gradient"):
        fn = S.SALIENCY_METHODS[name]
        sal = jax.jit(lambda p, x_: fn(S.ModelHandle(model.apply, {**v, "params": p}), x_, t))
        direct_maps[name] = sal(v["params"], x)
        results[name] = M.sanity_check(sal, v["params"], jax.random.key(3, impl="rbg"), x, layers=order,
                                       with_ssim=True)
    for name, r in results.items():
        assert r.stages[0] == "original" and r.spearman.shape == (5, 4) and r.maps.shape == (5, 4, 8, 8)
        # stage 0 is the unmodified model: its maps are those of the original parameters, computed independently
        direct = direct_maps[name]
        np.testing.assert_allclose(np.asarray(r.maps[0]), np.asarray(direct), rtol=1e-4, atol=1e-6)
        # every stage is scored against those maps (spot check of the bookkeeping on the last stage)
        np.testing.assert_allclose(np.asarray(r.spearman[-1]), np.asarray(M.rank_correlation(direct, r.maps[-1])),
                                   rtol=1e-5, atol=1e-6)
        # fully randomized: the maps no longer rank pixels like the original ones
        assert float(jnp.mean(r.spearman[-1])) < 0.35, (name, r.spearman)
        assert float(jnp.mean(r.ssim[-1])) < 0.5, (name, r.ssim)
    # FullGrad decorrelates progressively: randomizing the head alone keeps much more of the map than randomizing all
    fg = results["fullgrad"].spearman
    assert float(jnp.mean(fg[1])) > float(jnp.mean(fg[-1])) + 0.2, fg


# ------------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------------

def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="non-finite"):
        M.pixel_perturbation(F, X, SAL.at[0, 0, 0].set(jnp.nan), [0.5])
    with pytest.raises(ValueError, match="shape"):
        M.pixel_perturbation(F, X, SAL[:, :1], [0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.pixel_perturbation(F, X, SAL, [0.5, 1.5])
    with pytest.raises(ValueError, match="fill"):
        M.remove_pixels(X, SAL, 0.5, fill="median")
    with pytest.raises(ValueError, match="fill"):
        M.remove_pixels(X, SAL, 0.5, fill=jnp.ones(3))
    with pytest.raises(ValueError, match="output"):
        M.pixel_perturbation(F, X, SAL, [0.5], output="loss")
    with pytest.raises(ValueError, match="rank 4"):
        M.remove_pixels(X[0], SAL, 0.5)
    with pytest.raises(ValueError, match="labels"):
        M.perturbation_scores(F, X, SAL, 0.5, output="accuracy", labels=jnp.array([2]))
    with pytest.raises(ValueError, match="same shape"):
        M.rank_correlation(np.zeros((2, 3, 3)), np.zeros((2, 3, 4)))


# ------------------------------------------------------------------------------------------------------------
# viz
# ------------------------------------------------------------------------------------------------------------

def test_viz_writes_pngs(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.random((3, 8, 8, 1))
    maps = {"gradient": rng.random((3, 8, 8)), "fullgrad_noabs": rng.standard_normal((3, 8, 8))}
    paths = [
        viz.saliency_gallery(imgs, maps, str(tmp_path / "g" / "gallery.png"), signed=("fullgrad_noabs",),
                             title="t"),
        viz.saliency_gallery(rng.random((2, 8, 8, 3)), {"m": rng.random((2, 8, 8))}, str(tmp_path / "rgb.png"),
                             overlay=True),
        viz.perturbation_curves({"a": ([0.1, 0.5], [0.2, 0.3], [0.01, 0.02]), "b": ([0.1, 0.5], [0.1, 0.4])},
                                str(tmp_path / "pp.png")),
        viz.roar_curves({"a": ((0.0, 0.5), (0.9, 0.4))}, str(tmp_path / "roar.png")),
        viz.sanity_check_plot(["original", "head", "block0"], {"fullgrad": rng.random((3, 4)), "g": [1, 0.5, 0.1]},
                              str(tmp_path / "sanity.png")),
    ]
    for p in paths:
        assert os.path.getsize(p) > 1000
        with open(p, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="maps"):
        viz.saliency_gallery(imgs, {"bad": rng.random((2, 8, 8))}, str(tmp_path / "bad.png"))
