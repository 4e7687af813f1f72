"""docs/RESULTS.md's chapter-5 numbers of issue 25 (the authors' training recipe, 3 seeds; the baseline's budget
axis) against the raw numbers under docs/results/ch5_*.json. Reads files only (no training): milliseconds."""
import numpy as np
import pytest

from gradjax.statistics import paired_comparison, sample_std
from tests.results_check import assert_reported, results_json, section

SHORT = {"baseline": "baseline", "score_matching": "SM", "anti_score_matching": "anti-SM", "gradient_norm": "GN"}
HEADING = "Issue 25: the four models trained with the authors' recipe"


@pytest.fixture(scope="module")
def text():
    return section(HEADING)


@pytest.fixture(scope="module")
def recipe():
    return results_json("ch5_authors_recipe")


def test_accuracy_gradient_norm_and_trace_as_reported(text, recipe):
    assert recipe["seeds"] == [0, 1, 2] and recipe["bn_policy"] == "train" and recipe["augment_pad"] == 2
    for o, e in recipe["per_objective"].items():
        for key, k, dec in (("test_accuracy", 100, 1), ("test_accuracy_batch_stats", 100, 1),
                            ("grad_sq_norm_mean", 1, 1), ("trace_mean", 1, 1)):
            v = np.asarray(e[key], float) * k
            assert_reported(text, v.mean(), dec, what=f"{o} {key} mean")
            assert_reported(text, float(sample_std(v)), dec, what=f"{o} {key} sample std")


def test_gan_test_and_density_ratios_as_reported(text, recipe):
    for o, e in recipe["per_objective"].items():
        for key in ("gan_test/authors/noise_judge", "gan_test/authors/judge"):
            if key in e:
                v = 100 * np.asarray(e[key], float)
                assert_reported(text, v.mean(), 1, what=f"{o} {key}")
                assert_reported(text, float(sample_std(v)), 1, what=f"{o} {key} std")
        if "denoise_mse" in e:
            v = np.asarray(e["denoise_mse"], float)
            assert_reported(text, v.mean(), 4, what=f"{o} denoising MSE")
            assert_reported(text, float(sample_std(v)), 4, what=f"{o} denoising MSE std")
        if "log_ratio_slope" in e:
            v = np.asarray(e["log_ratio_slope"], float)
            assert_reported(text, v.mean(), 1, what=f"{o} log-ratio slope")


def test_every_ordering_verdict_is_the_paired_comparison_of_the_stored_seeds(text, recipe):
    po = recipe["per_objective"]
    key = {"accuracy": "test_accuracy", "gan_test": recipe.get("gan_test_reported"),
           "log_ratio_slope": "log_ratio_slope", "pixel_baseline_mean": "pixel_baseline_mean",
           "denoise_mse": "denoise_mse"}
    assert recipe["paired"], "no paired comparisons stored"
    for measure, rows in recipe["paired"].items():
        for r in rows:
            sign = -1.0 if measure == "denoise_mse" else 1.0  # lower MSE = better: compared negated
            pc = paired_comparison(sign * np.asarray(po[r["a"]][key[measure]]),
                                   sign * np.asarray(po[r["b"]][key[measure]]))
            assert pc.verdict == r["verdict"] and pc.t == pytest.approx(r["t"])
            assert f"{SHORT[r['a']]} vs {SHORT[r['b']]}: {r['claim_held']}" in text, (measure, r["a"], r["b"])
            assert f"t = {r['t']:.2f}" in text


def test_budget_axis_of_the_baseline_as_reported(text):
    b = results_json("ch5_budget")
    assert len(b["budgets"]) >= 3
    for row in b["budgets"]:
        v = 100 * np.asarray(row["test_accuracy"], float)
        assert_reported(text, v.mean(), 1, what=f"baseline at {row['epochs']} epochs")
        assert f"{row['steps']} steps" in text


def test_scale_step_of_baseline_and_gn_as_reported(text):
    e6 = results_json("ch5_authors_recipe_e6")
    assert set(e6["per_objective"]) == {"baseline", "gradient_norm"} and e6["seeds"] == [0, 1, 2]
    assert all(s == [186, 186, 186] for s in (e["steps"] for e in e6["per_objective"].values()))
    po = e6["per_objective"]
    for o, e in po.items():
        v = 100 * np.asarray(e["test_accuracy"], float)
        assert_reported(text, v.mean(), 1, what=f"{o} accuracy at 6 epochs")
        assert_reported(text, float(np.mean(e["log_ratio_slope"])), 1, what=f"{o} slope at 6 epochs")
    for measure, key in (("accuracy", "test_accuracy"), ("log_ratio_slope", "log_ratio_slope")):
        for r in e6["paired"][measure]:
            pc = paired_comparison(po[r["a"]][key], po[r["b"]][key])
            assert pc.verdict == r["verdict"]
            assert f"{SHORT[r['a']]} vs {SHORT[r['b']]}: {r['claim_held']} (mean diff" in text
            assert f"t = {r['t']:.2f}" in text


def _check_four_models(text, name, steps):
    """Means, sample stds and every paired verdict of one budget point for all four models."""
    run = results_json(name)
    po = run["per_objective"]
    assert set(po) == set(SHORT) and run["seeds"] == [0, 1, 2] and run["eval_seeds"] == [0, 1, 2]
    assert all(e["steps"] == [steps] * 3 for e in po.values())
    for o, e in po.items():
        for key, k in (("test_accuracy", 100), ("gan_test/authors/noise_judge", 100), ("log_ratio_slope", 1),
                       ("pixel_baseline_mean", 100)):
            v = np.asarray(e[key], float) * k
            assert_reported(text, v.mean(), 1, what=f"{o} {key} at {steps} steps")
            assert_reported(text, float(sample_std(v)), 1, what=f"{o} {key} sample std at {steps} steps")
    for measure, key in (("accuracy", "test_accuracy"), ("gan_test", "gan_test/authors/noise_judge"),
                         ("log_ratio_slope", "log_ratio_slope"), ("pixel_baseline_mean", "pixel_baseline_mean")):
        for r in run["paired"][measure]:
            pc = paired_comparison(po[r["a"]][key], po[r["b"]][key])
            assert pc.verdict == r["verdict"] and pc.t == pytest.approx(r["t"])
            assert f"{SHORT[r['a']]} vs {SHORT[r['b']]}: {r['claim_held']} (mean diff" in text
            assert f"t = {r['t']:.2f}" in text
    return run


def _check_denoising(text, run):
    """Fig. 5.8 at one budget: each model's MSE after the ascent (mean and sample std, 4 decimals) and the paired
    verdicts (lower MSE = better, compared negated)."""
    po = run["per_objective"]
    for o, e in po.items():
        v = np.asarray(e["denoise_mse"], float)
        assert_reported(text, v.mean(), 4, what=f"{o} denoising MSE")
        assert_reported(text, float(sample_std(v)), 4, what=f"{o} denoising MSE sample std")
    assert len(run["paired"]["denoise_mse"]) == 6
    for r in run["paired"]["denoise_mse"]:
        pc = paired_comparison(-np.asarray(po[r["a"]]["denoise_mse"]), -np.asarray(po[r["b"]]["denoise_mse"]))
        assert pc.verdict == r["verdict"] and pc.t == pytest.approx(r["t"])
        assert f"{SHORT[r['a']]} vs {SHORT[r['b']]}: {r['claim_held']} (mean diff {r['mean']:+.4f}, t = {r['t']:.2f}" \
            in text, (r["a"], r["b"])


def test_all_four_models_at_186_steps_as_reported(text):
    """The second budget point for all four models (6 epochs)."""
    _check_four_models(text, "ch5_authors_recipe_e6_all", 186)


def test_all_four_models_at_310_steps_as_reported(text):
    """The third budget point for all four models (10 epochs)."""
    _check_four_models(text, "ch5_authors_recipe_e10_all", 310)


def _fake_fooling(seed, before, afters):
    """A ``results.json`` of experiments.fooling with budgets 1 and 3 (numbers only, no training)."""
    keys = ("logit_gradient", "loss_gradient_T", "loss_gradient")
    by = [{"finetune_epochs": e, "finetune_steps": 31 * e, "accuracy_fooled": 0.9, "seconds": 1.0,
           "energy_after_%": dict(zip(keys, a))} for e, a in zip((1, 3), afters)]
    return {"scale": {}, "command": "c", "result": {
        "seed": seed, "lam": 1e4, "mask_fraction": 0.22, "eval_examples": 8, "accuracy_pretrained": 0.95,
        "pretrain_seconds": 1.0, "energy_before_%": dict(zip(keys, before)), "by_budget": by}}


def test_fooling_export_pairs_the_seeds_in_the_thesis_order():
    from experiments import fooling
    runs = [_fake_fooling(s, (17, 17, 17), [(30 + s, 25 + s, 20 + 2 * s), (60 + s, 55 - s, 50)]) for s in (2, 0, 1)]
    out = fooling.export_summary(runs)
    assert out["seeds"] == [0, 1, 2] and [b["finetune_epochs"] for b in out["budgets"]] == [1, 3]
    b1 = out["budgets"][0]
    assert b1["energy_after_%"]["loss_gradient"] == [20, 22, 24]
    rows = {(r["a"], r["b"]): r for r in b1["paired_order"]}
    assert set(rows) == {("logit_gradient", "loss_gradient_T"), ("logit_gradient", "loss_gradient"),
                         ("loss_gradient_T", "loss_gradient")}
    assert rows[("logit_gradient", "loss_gradient_T")]["claim_held"] == "yes"  # +5 on every seed
    assert rows[("loss_gradient_T", "loss_gradient")]["differences"] == [5, 4, 3]
    moved = {r["gradient"]: r for r in out["budgets"][1]["paired_after_vs_before"]}
    assert moved["loss_gradient"]["differences"] == [33, 33, 33] and moved["loss_gradient"]["verdict"] == "a>b"
    with pytest.raises(ValueError, match="duplicate"):
        fooling.export_summary([runs[0], runs[0]])
    with pytest.raises(ValueError, match="at least two"):
        fooling.export_summary(runs[:1])


def test_denoising_at_186_and_310_steps_as_reported(text):
    """Fig. 5.8 at the second and third budgets (issue 25 items 3-4), and the 310-vs-93-step trend per model."""
    runs = [results_json(n) for n in ("ch5_authors_recipe", "ch5_authors_recipe_e6_all", "ch5_authors_recipe_e10_all")]
    for run in runs[1:]:
        _check_denoising(text, run)
    for o in SHORT:
        pc = paired_comparison(runs[2]["per_objective"][o]["denoise_mse"], runs[0]["per_objective"][o]["denoise_mse"])
        flat = " ".join(text.replace("-", "−").split())  # the bullets wrap lines
        assert f"{pc.mean:+.4f}, t = {pc.t:.2f}".replace("-", "−") in flat, o


def test_sweep_export_finds_the_thesis_table_5_2_pattern_on_the_thesis_numbers():
    """export_sweep on the thesis's own Table 5.2 (as if it were a run): accuracy falls at every one-step increase of
    lambda, the best GAN-test cell is (1e-5, 1e-3), a diverged cell's NaN GAN-test is left out."""
    from experiments import density_evaluation as DE
    rows = [{"lam": l, "mu": m, "test_accuracy": a / 100, "test_accuracy_batch_stats": a / 100,
             "gan_test": {"mean": 0.1, "std": 0.0}, "other_gan_tests": {"authors/noise_judge": g / 100},
             "log_ratio_slope": -1.0, "diverged": None, "steps": 32} for (l, m), (a, g) in DE.THESIS_TABLE_5_2.items()]
    rows[0] = {**rows[0], "other_gan_tests": {"authors/noise_judge": float("nan")}, "diverged": "step 3"}
    out = DE.export_sweep({"sweep": {"rows": rows}})
    assert out["gan_test_reported"] == "gan_test_noise_judge" and len(out["cells"]) == 20
    acc = out["trend/accuracy"]
    assert acc == out["trend/accuracy/thesis"] and acc["falls_when_lam_grows"] == [16, 16]
    assert acc["falls_when_mu_grows"] == [10, 15] and acc["spearman_log_lam"] < -0.8
    assert out["best/gan_test_noise_judge"]["cells"] == [[1e-5, 1e-3]]
    assert out["best/gan_test_noise_judge"]["value"] == pytest.approx(85.64)
    assert out["trend/gan_test_noise_judge"]["falls_when_lam_grows"][1] == 15  # the NaN cell's step left out
    assert out["cells"][0]["diverged"] and not out["cells"][1]["diverged"]


FOOL = {"logit_gradient": "logit", "loss_gradient_T": "loss (T = 1e3)", "loss_gradient": "loss"}


def test_fooling_three_seeds_and_budgets_as_reported(text):
    """§5.7.2 fooling (thesis L1729–1731), issue 25: 3 seeds, energies after each fine-tuning budget, paired verdicts."""
    f = results_json("ch5_fooling")
    assert f["seeds"] == [0, 1, 2] and len(f["budgets"]) >= 3
    flat = " ".join(text.split())
    for k in FOOL:
        v = np.asarray(f["energy_before_%"][k], float)
        assert_reported(text, v.mean(), 1, what=f"{k} before fooling")
    assert_reported(text, 100 * np.mean(f["accuracy_pretrained"]), 1, what="pre-trained accuracy")
    for b in f["budgets"]:
        assert f"{b['finetune_steps']} steps" in flat
        assert_reported(text, 100 * np.mean(b["accuracy_fooled"]), 1, what=f"accuracy at {b['finetune_epochs']}")
        for k in FOOL:
            v = np.asarray(b["energy_after_%"][k], float)
            assert_reported(text, v.mean(), 1, what=f"{k} after {b['finetune_epochs']} epochs")
            assert_reported(text, float(sample_std(v)), 1, what=f"{k} std after {b['finetune_epochs']} epochs")
        for r in b["paired_order"]:
            pc = paired_comparison(b["energy_after_%"][r["a"]], b["energy_after_%"][r["b"]])
            assert pc.verdict == r["verdict"] and pc.t == pytest.approx(r["t"])
            s = f"{FOOL[r['a']]} vs {FOOL[r['b']]}: {r['claim_held']} (mean diff {r['mean']:+.2f}, t = {r['t']:.2f}"
            assert s in flat, s


def test_table_5_2_grid_as_reported(text):
    """Table 5.2's λ × μ grid (thesis L1802–1815) at reduced scale, one seed: every finished cell's accuracy and
    GAN-test of both judges, the thesis's value beside it, and the trend summaries (ours and the thesis's)."""
    f = results_json("ch5_table5_2_grid")
    assert f["gan_test_reported"] == "gan_test_noise_judge" and f["cells"]
    flat = " ".join(text.split())
    for c in f["cells"]:
        row = (f"| {c['lam']:g} | {c['mu']:g} | {c['accuracy']:.1f} / {c['accuracy_batch_stats']:.1f} | "
               f"{c['gan_test_noise_judge']:.1f} | ")
        assert row in text, row
        assert f"| {c['thesis_accuracy']} / {c['thesis_gan_test']} |" in text
    for key in ("accuracy", "gan_test_noise_judge"):
        for w in ("", "/thesis"):
            t = f[f"trend/{key}{w}"]
            assert f"{t['spearman_log_lam']:.2f}" in flat and f"{t['spearman_log_mu']:.2f}" in flat, (key, w)
            assert f"{t['falls_when_lam_grows'][0]}/{t['falls_when_lam_grows'][1]}" in flat, (key, w)
            assert f"{t['falls_when_mu_grows'][0]}/{t['falls_when_mu_grows'][1]}" in flat, (key, w)
        b = f[f"best/{key}"]
        assert_reported(text, b["value"], 1, what=f"best {key}")
