"""gradjax.density.gan_test_report (moved from experiments/density_evaluation.py): the GAN-test accuracy with the
histogram of the judge's classes, and no verdict on samples from a diverged ascent."""
import numpy as np
import pytest

from gradjax import density as D
from gradjax import statistics as ST


def _judge(x):  # class = the image's mean value rounded (3 classes), so the answer is known by hand
    m = x.reshape(x.shape[0], -1).mean(axis=1)
    return -((m[:, None] - np.arange(3)[None, :]) ** 2)


def test_gan_test_report_counts_by_hand():
    samples = np.stack([np.full((2, 2, 1), v, np.float32) for v in (0.0, 1.1, 2.2, 1.9, 0.2)])
    labels = np.array([0, 1, 2, 1, 0])  # judged 0, 1, 2, 2, 0: four of five right
    r = D.gan_test_report(_judge, samples, labels, 4)
    assert r.accuracy == pytest.approx(0.8) and r.non_finite == 0
    np.testing.assert_array_equal(r.histogram, [2, 1, 2, 0])  # minlength = num_classes


def test_gan_test_report_does_not_judge_non_finite_samples():
    samples = np.zeros((3, 2, 2, 1), np.float32)
    samples[1, 0, 0, 0] = np.nan
    with pytest.warns(RuntimeWarning, match="1/3 samples are non-finite"):
        r = D.gan_test_report(_judge, samples, np.zeros(3, np.int32), 3)
    assert np.isnan(r.accuracy) and r.non_finite == 1 and not r.histogram.any()
    with pytest.raises(ValueError, match="agree"):
        D.gan_test_report(_judge, samples, np.zeros(2, np.int32), 3)


def test_gradient_trace_stats_on_a_quadratic_by_hand():
    """f_k(x) = a_k Σ x²: ∇f_y = 2 a_y x, so ‖∇f_y‖² = 4 a_y² Σ x², and ∇²f_y = 2 a_y I, whose trace Hutchinson's
    Rademacher probes give exactly (2 a_y · D)."""
    import jax
    import jax.numpy as jnp

    a = jnp.array([0.5, -1.0, 2.0])
    logits_fn = lambda x: jnp.sum(x ** 2, axis=(1, 2, 3))[:, None] * a[None, :]  # noqa: E731
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 2, 3, 1))
    y = jnp.array([0, 1, 2, 2, 1])
    stats = jax.jit(lambda x, y, k: D.gradient_trace_stats(logits_fn, x, y, k, num_probes=3))(
        x, y, jax.random.PRNGKey(1))
    g2 = 4 * np.asarray(a)[np.asarray(y)] ** 2 * np.asarray(jnp.sum(x ** 2, axis=(1, 2, 3)))
    tr = 2 * np.asarray(a)[np.asarray(y)] * 6
    assert float(stats["grad_sq_norm_mean"]) == pytest.approx(g2.mean(), rel=1e-5)
    assert float(stats["grad_sq_norm_median"]) == pytest.approx(np.median(g2), rel=1e-5)
    assert float(stats["trace_mean"]) == pytest.approx(tr.mean(), rel=1e-5)
    assert float(stats["trace_median"]) == pytest.approx(np.median(tr), rel=1e-5)
    with pytest.raises(ValueError, match="num_probes"):
        D.gradient_trace_stats(logits_fn, x, y, jax.random.PRNGKey(1), num_probes=0)


def test_trace_gap_by_hand():
    g = D.trace_gap([1.0, -3.0], [2.0, -1.0])  # mean |ref| = 2; means -1 and 0.5; per-example |diff| 1 and 2
    assert g == pytest.approx({"reference_mean": -1.0, "other_mean": 0.5, "rel_gap_of_means": 0.75,
                               "rel_per_example_diff": 0.75})
    with pytest.raises(ValueError, match="one shape"):
        D.trace_gap([1.0], [1.0, 2.0])


def test_ratio_summary_by_hand():
    lr = np.log(np.array([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 2.0], [4.0, 8.0]]]))  # [S=2, N=2, B=2]
    s = D.ratio_summary(lr)
    np.testing.assert_allclose(s["mean_ratio"], [1.0, 3.75])
    np.testing.assert_allclose(s["median_ratio"], [1.0, 3.0])
    np.testing.assert_allclose(s["mean_log_ratio"], [0.0, np.log(8.0) / 2])
    with pytest.raises(ValueError, match="S, N, B"):
        D.ratio_summary(lr[0])


def test_bn_policy_traces_agree_without_batchnorm_and_differ_with_it():
    """Without BatchNorm the two policies are one function (equal estimates); with BatchNorm the authors' train-mode
    pass (each noisy batch normalized with its own moments) estimates something else than the per-example trace."""
    import functools

    import jax
    import jax.numpy as jnp
    from gradjax.models import create_model

    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 1))
    y = jnp.array([0, 1, 2, 1])
    key = jax.random.PRNGKey(3)
    out = {}
    for name in ("mlp", "vgg4"):
        model = create_model(name, 3, activation="softplus", width=1 / 16, hidden=(16,))
        v = model.init(jax.random.PRNGKey(1), x, train=False)
        params, state = v["params"], {k: w for k, w in v.items() if k != "params"}
        fn = jax.jit(functools.partial(D.bn_policy_traces, model.apply, num_probes=4, sigma=0.05, chunk=None))
        out[name] = {k: np.asarray(t) for k, t in fn(params, state, x, y, key).items()}
        assert out[name]["frozen"].shape == (4,) and np.all(np.isfinite(out[name]["frozen"]))
    np.testing.assert_allclose(out["mlp"]["train"], out["mlp"]["frozen"], rtol=1e-6, atol=1e-7)
    gap = D.trace_gap(out["vgg4"]["frozen"], out["vgg4"]["train"])
    assert gap["rel_per_example_diff"] > 1e-3, gap
    with pytest.raises(ValueError, match="num_probes"):
        D.bn_policy_traces(model.apply, params, state, x, y, key, num_probes=0)


def test_judge_noise_robustness_by_hand():
    """A judge that says class 1 when the mean pixel exceeds 0.05: right on black images; noise of +1 everywhere at
    s = 0.1 lifts every mean to 0.1 (all judged 1: wrong, one class); noise of -1 is clipped away (still right)."""
    judge = lambda x: np.stack([np.zeros(len(x)), (np.asarray(x).reshape(len(x), -1).mean(1) > 0.05) * 1.0], -1)
    x, y = np.zeros((4, 2, 2, 1), np.float32), np.zeros(4, np.int64)
    noise = np.ones_like(x)
    noise[:2] = -1.0  # the first two stay black after clipping
    r = D.judge_noise_robustness(judge, x, y, noise, (0.0, 0.1))
    assert r == {"0": {"accuracy": 1.0, "top_class_fraction": 1.0}, "0.1": {"accuracy": 0.5, "top_class_fraction": 0.5}}
    with pytest.raises(ValueError, match="agree"):
        D.judge_noise_robustness(judge, x, y, noise[:2], (0.0,))


# ---------------------------------------------------------------- gradjax.density_report (moved from the script)
def test_sample_std_and_mean_and_std_by_hand():
    from gradjax import density_report as DR

    assert DR.mean_and_std([1.0, 3.0]) == pytest.approx((2.0, np.sqrt(2.0)))  # ddof 1: sqrt(((1-2)² + (3-2)²) / 1)
    assert DR.mean_and_std([5.0]) == (5.0, 0.0)  # one run: no spread
    np.testing.assert_allclose(ST.sample_std([[0.0, 1.0], [2.0, 1.0]], 0), [np.sqrt(2.0), 0.0])
    with pytest.raises(ValueError, match="at least one"):
        DR.mean_and_std([])


def test_ratio_entry_by_hand():
    """Two keys: ratios all 1 (log 0), and ratios 1 at s = 0 / e^{-0.5}·{1, 1} at s = 0.5 after exp. Key means,
    the sample std over keys, and the slope Σ s² m / Σ s⁴ through the origin."""
    from gradjax import density_report as DR

    k0 = np.zeros((2, 1, 2))
    k1 = np.stack([np.zeros((1, 2)), np.full((1, 2), -0.5)])  # [S=2, N=1, B=2]
    e = DR.ratio_entry([k0, k1], (0.0, 0.5))
    np.testing.assert_allclose(e["mean_log_ratio"], [0.0, -0.25])
    np.testing.assert_allclose(e["mean_ratio"], [1.0, (1 + np.exp(-0.5)) / 2])
    np.testing.assert_allclose(e["median_ratio"], [1.0, (1 + np.exp(-0.5)) / 2])
    np.testing.assert_allclose(e["mean_ratio_std"], [0.0, (1 - np.exp(-0.5)) / np.sqrt(2)])
    assert e["log_ratio_slope"] == pytest.approx(-0.25 * 0.25 / 0.5 ** 4)  # = -1
    assert e["noise_stds"] == [0.0, 0.5]
    with pytest.raises(ValueError, match="noise levels"):
        DR.ratio_entry([k0], (0.0, 0.25, 0.5))
    with pytest.raises(ValueError, match="at least one key"):
        DR.ratio_entry([], (0.0, 0.5))


def test_denoise_errors_and_mean_std_entry_by_hand():
    from gradjax import density_report as DR

    clean = np.zeros((2, 2, 1))
    start, samples = np.full_like(clean, 0.5), np.full_like(clean, 0.1)
    ld = np.array([[1.0, 3.0], [2.0, 6.0], [4.0, 4.0]])  # [T=3, B=2]: gains 3 and 1
    r = DR.denoise_errors(clean, start, samples, ld)
    assert r == pytest.approx({"mse_noisy": 0.25, "mse_denoised": 0.01, "f_gain": 2.0})
    e = DR.mean_std_entry([r, {"mse_noisy": 0.75, "mse_denoised": 0.03, "f_gain": 0.0}])
    assert e["mse_noisy"] == pytest.approx((0.5, np.sqrt(0.125)))
    assert e["f_gain"] == pytest.approx((1.0, np.sqrt(2.0)))
    with pytest.raises(ValueError, match="one shape"):
        DR.denoise_errors(clean, start[:1], samples, ld)
    with pytest.raises(ValueError, match="same keys"):
        DR.mean_std_entry([r, {"mse_noisy": 0.0}])


def test_gan_sampler_entry_by_hand():
    from gradjax import density_report as DR

    e = DR.gan_sampler_entry({"judge": [0.5, 1.0]}, {"judge": [[1, 1, 0], [0, 2, 0]]}, [2.0, 4.0],
                             [{"mean": 0.2}, {"mean": 0.4}])
    assert e["judge"]["mean"] == pytest.approx(0.75) and e["judge"]["std"] == pytest.approx(np.sqrt(0.125))
    assert e["judge"]["per_key"] == [0.5, 1.0] and e["judge"]["judge_class_histogram"] == [1, 3, 0]
    assert e["f_y"] == pytest.approx(3.0) and e["statistics"] == pytest.approx({"mean": 0.3})
    diverged = DR.gan_sampler_entry({"judge": [float("nan")]}, {"judge": [[0, 0, 0]]}, [], [])
    assert np.isnan(diverged["f_y"]) and "statistics" not in diverged  # no finite samples: no f_y, no statistics
    with pytest.raises(ValueError, match="same judges"):
        DR.gan_sampler_entry({"judge": [0.5]}, {"other": [[1]]}, [], [])


def test_summarize_seeds_merges_parts_over_the_seeds_that_have_them():
    """Seed 0 has the GAN-test and pixel curves, seed 1 only the GAN-test: each part is averaged over its own seeds
    (n_seeds per part), with the sample std over seeds; an objective absent everywhere has no parts."""
    from gradjax import density_report as DR

    per_seed = {0: {"gan_test": {"SM": {"mean": 0.4, "std": 0.1}}, "pixel_own": {"SM": [1.0, 0.5]},
                    "denoise": {"SM": {"mse_noisy": (0.2, 0.0), "mse_denoised": (0.1, 0.0), "f_gain": (3.0, 0.0)}}},
                1: {"gan_test": {"SM": {"mean": 0.8, "std": 0.3}}}}
    s = DR.summarize_seeds(per_seed, ["SM", "GN"])
    assert s["SM"]["gan_test"] == pytest.approx((0.6, np.sqrt(0.08)))
    assert s["SM"]["gan_test_key_std"] == pytest.approx(0.2)
    assert s["SM"]["pixel_own"] == [1.0, 0.5] and s["SM"]["pixel_own_std"] == [0.0, 0.0]
    assert s["SM"]["denoise"]["f_gain"] == (3.0, 0.0)
    assert s["SM"]["n_seeds"] == {"gan_test": 2, "pixel_own": 1, "denoise": 1}
    assert s["GN"] == {"n_seeds": {}}


def test_class_conditional_samples_orders_classes_and_splits_the_key_per_batch():
    """A sampler that returns its label plus a uniform draw from its key: class order, per_class each, the batch
    layout (7 samples in batches of 3: keys split in order), and the same result for the same key."""
    import jax
    import jax.numpy as jnp

    sample_fn = lambda lab, k: lab[:, None].astype(jnp.float32) + jax.random.uniform(k, (len(lab), 1))  # noqa: E731
    key = jax.random.PRNGKey(4)
    s, lab = D.class_conditional_samples(sample_fn, key, num_classes=3, per_class=2, batch=4)  # batches 4 + 2
    np.testing.assert_array_equal(lab, [0, 0, 1, 1, 2, 2])
    assert lab.dtype == np.int32 and s.shape == (6, 1)
    np.testing.assert_array_equal(np.floor(s[:, 0]), lab)  # each sample is drawn for its own label
    k0, k1 = jax.random.split(key, 2)
    np.testing.assert_allclose(s[:4, 0] - lab[:4], np.asarray(jax.random.uniform(k0, (4, 1)))[:, 0], rtol=1e-6)
    np.testing.assert_allclose(s[4:, 0] - lab[4:], np.asarray(jax.random.uniform(k1, (2, 1)))[:, 0], rtol=1e-6)
    s2, _ = D.class_conditional_samples(sample_fn, key, num_classes=3, per_class=2, batch=4)
    np.testing.assert_array_equal(s, s2)
    with pytest.raises(ValueError, match=">= 1"):
        D.class_conditional_samples(sample_fn, key, num_classes=3, per_class=0)


def test_sample_report_and_mean_statistics_by_hand():
    """Two 2-pixel samples [0, 1] and [0.5, 0.5] against one reference image [0, 1]: pixel means 0.5, saturated
    fractions (1/2 + 0) / 2 at each edge, NN distances 0 and sqrt(0.5); f_y is the mean of the given log-density;
    a non-finite sample gives no report."""
    from gradjax import density_report as DR

    samples = np.array([[[[0.0], [1.0]]], [[[0.5], [0.5]]]], np.float32)  # [2, 1, 2, 1]
    ref = samples[:1]
    st = DR.mean_statistics(samples, ref)
    assert st == pytest.approx({"mean": 0.5, "frac_low": 0.25, "frac_high": 0.25, "nn_distance": np.sqrt(0.5) / 2},
                               abs=1e-6)
    log_density_fn = lambda x, y: x.reshape(len(x), -1).sum(1) * (y + 1)  # noqa: E731  f = 1 and 2 here
    r = DR.sample_report(samples, np.array([0, 1]), log_density_fn, ref)
    assert r["f_y"] == pytest.approx(1.5) and r["statistics"] == pytest.approx(st)
    assert "statistics" not in DR.sample_report(samples, np.array([0, 1]), log_density_fn)
    bad = samples.copy()
    bad[1, 0, 0, 0] = np.inf
    assert DR.sample_report(bad, np.array([0, 1]), log_density_fn, ref) is None
    with pytest.raises(ValueError, match="agree"):
        DR.sample_report(samples, np.array([0]), log_density_fn)


def test_chunked_log_ratios_equal_the_unchunked_call_when_noise_depends_on_the_offset_key():
    """A log-ratio function whose output is the example's value plus a draw from the key: chunked in 2 + 2 + 1, each
    chunk uses fold_in(key, offset), so the result equals calling each chunk by hand; chunk >= B is one call."""
    import jax
    import jax.numpy as jnp

    fn = lambda xb, yb, k: (xb.reshape(len(xb), -1).sum(1) + yb + jax.random.uniform(k, ()))[None, None]  # noqa
    x = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1)
    y = np.array([0, 1, 0, 1, 0])
    key = jax.random.PRNGKey(2)
    lr = D.chunked_log_ratios(fn, x, y, key, chunk=2)
    assert lr.shape == (1, 1, 5)
    want = np.concatenate([np.asarray(fn(jnp.asarray(x[a:a + 2]), jnp.asarray(y[a:a + 2]),
                                         jax.random.fold_in(key, a))) for a in (0, 2, 4)], axis=2)
    np.testing.assert_array_equal(lr, want)
    u = [float(jax.random.uniform(jax.random.fold_in(key, a), ())) for a in (0, 2, 4)]
    np.testing.assert_allclose(lr[0, 0], np.arange(5) + y + np.repeat(u, [2, 2, 1]), rtol=1e-6)
    whole = D.chunked_log_ratios(fn, x, y, key, chunk=10)
    np.testing.assert_allclose(whole[0, 0], np.arange(5) + y + u[0], rtol=1e-6)
    with pytest.raises(ValueError, match="chunk"):
        D.chunked_log_ratios(fn, x, y, key, chunk=0)
    with pytest.raises(ValueError, match="agree"):
        D.chunked_log_ratios(fn, x, y[:3], key, chunk=2)
