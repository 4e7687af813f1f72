"""gradjax.density.gan_test_report (moved from experiments/density_evaluation.py): the GAN-test accuracy with the
histogram of the judge's classes, and no verdict on samples from a diverged ascent."""
import numpy as np
import pytest

from gradjax import density as D


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
