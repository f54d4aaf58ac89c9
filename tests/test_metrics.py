import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from neuroar.config import DataConfig
from neuroar.data.preprocess import template_brain_mask
from neuroar.metrics import masked_mae, masked_psnr, masked_ssim


@pytest.fixture
def volumes():
    rng = np.random.default_rng(0)
    target = rng.random((20, 24, 18))
    prediction = np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1)
    mask = np.zeros(target.shape, bool)
    mask[4:16, 5:20, 3:15] = True
    return prediction, target, mask


def test_psnr_matches_scikit_image_on_the_masked_voxels(volumes):
    prediction, target, mask = volumes
    expected = peak_signal_noise_ratio(target[mask], prediction[mask], data_range=1.0)
    assert masked_psnr(prediction, target, mask) == pytest.approx(expected, rel=1e-9)
    assert masked_psnr(target, target, mask) == float("inf")


def test_ssim_inside_the_border_is_scikit_images_mean_ssim(volumes):
    prediction, target, _ = volumes
    full = np.zeros(target.shape, bool)
    full[5:-5, 5:-5, 5:-5] = True  # scikit-image's mean leaves out the half-window (5 voxels) at the border
    expected = structural_similarity(target, prediction, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert masked_ssim(prediction, target, full) == pytest.approx(expected, rel=1e-9)
    assert masked_ssim(target, target, full) == pytest.approx(1.0)


def test_mae_is_the_mean_absolute_error_inside(volumes):
    prediction, target, mask = volumes
    assert masked_mae(prediction, target, mask) == pytest.approx(np.abs(prediction - target)[mask].mean())


def test_template_brain_mask_lies_on_the_preprocessed_grid():
    mask = template_brain_mask(DataConfig())
    assert mask.shape == (80, 96, 88) and mask.dtype == bool
    assert 0.25 < mask.mean() < 0.45 and mask[40, 48, 44] and not mask[0, 0, 0]
