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
