"""Regional volumes of any standard-space T1 (a preprocessed scan, a prediction): the measure of aging.

Tissue: a three-class Gaussian mixture of the intensities inside MNI152's brain mask, leaving out
background-dark voxels (a subject's brain rarely fills the template mask); components ordered dark to
bright are CSF, grey and white matter. The mixture is fitted by EM to the intensity histogram: each
iteration then costs 512 bins instead of ~200k voxels, so the fit runs to convergence in about 30 ms
(scikit-learn's GaussianMixture takes no sample weights, and on every voxel it had to stop early, which
left earlier scan and prediction at different points of a flat likelihood). CSF is counted with a
partial-volume model (the share of the way from the grey-matter mean down to the CSF mean), which follows
small changes of the ventricles far better than hard labels; grey and white matter are the mixture's
posterior probabilities.
Regions: the template's lateral ventricles and hippocampi (as located in the synthetic anatomy), dilated so
that a subject's structure stays inside them as it grows or moves. Ventricles = CSF inside the ventricle
region; hippocampus = grey matter inside the hippocampus regions; whole brain = everything but CSF.
Volumes in mL. How well this recovers the synthetic cohort's true volumes is measured in the tests.
"""

from __future__ import annotations

import dataclasses
import functools

import nibabel as nib
import numpy as np
from scipy import ndimage

from neuroar.config import DataConfig
from neuroar.data.atlas import CLASSES, load_anatomy
from neuroar.data.preprocess import template_brain_mask, to_grid

REGIONS = ("ventricles", "grey_matter", "white_matter", "hippocampus", "whole_brain")
BACKGROUND = 0.1  # preprocessed intensity below which a voxel inside the mask is background, not tissue
# Region dilation: ventricles grow by up to half their volume in the cohorts we model; hippocampi shrink.
VENTRICLE_DILATION_MM = 8.0
HIPPOCAMPUS_DILATION_MM = 4.0


@dataclasses.dataclass(frozen=True)
class TemplateRegions:
    brain: np.ndarray  # bool, on the preprocessed grid
    ventricles: np.ndarray
    hippocampus: np.ndarray
    voxel_ml: float


def template_regions(config: DataConfig) -> TemplateRegions:
    return _template_regions(config.spacing, tuple(config.shape))


@functools.lru_cache(maxsize=4)
def _template_regions(spacing: float, shape: tuple[int, int, int]) -> TemplateRegions:
    anatomy = load_anatomy(1)
    config = DataConfig(spacing=spacing, shape=shape)

    def on_grid(probability: np.ndarray, dilation_mm: float) -> np.ndarray:
        grid, _ = to_grid(nib.Nifti1Image(probability.astype(np.float32), anatomy.affine), config, mode="bilinear")
        return ndimage.binary_dilation(grid > 0.25, iterations=max(1, round(dilation_mm / config.spacing)))

    probability = dict(zip(CLASSES, anatomy.probabilities))
    hippocampus = probability["hippocampus_left"] + probability["hippocampus_right"]
    return TemplateRegions(brain=template_brain_mask(config),
                           ventricles=on_grid(probability["ventricles"], VENTRICLE_DILATION_MM),
                           hippocampus=on_grid(hippocampus, HIPPOCAMPUS_DILATION_MM),
                           voxel_ml=config.spacing**3 / 1000.0)


def intensity_mixture(values: np.ndarray, bins: int = 512, tol: float = 1e-8, max_iter: int = 1000
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights, means and variances, each (3,) and ordered by mean, of a three-Gaussian mixture fitted by EM
    to the histogram of `values`, starting from their 10/50/90 % quantiles."""
    counts_K, edges = np.histogram(values, bins=bins)
    centres_K = (edges[:-1] + edges[1:]) / 2
    floor = (edges[1] - edges[0]) ** 2  # a component cannot collapse onto one bin
    weights, means, variances = np.full(3, 1 / 3), np.quantile(values, [0.1, 0.5, 0.9]), np.full(3, values.var())
    previous = -np.inf
    for _ in range(max_iter):
        log_joint_K3 = _log_joint(centres_K, weights, means, variances)
        log_likelihood_K = np.logaddexp.reduce(log_joint_K3, axis=1)
        mean_log_likelihood = float(counts_K @ log_likelihood_K) / counts_K.sum()
        resp_K3 = np.exp(log_joint_K3 - log_likelihood_K[:, None]) * counts_K[:, None]
        total_3 = resp_K3.sum(0)
        weights, means = total_3 / counts_K.sum(), centres_K @ resp_K3 / total_3
        variances = ((centres_K[:, None] - means) ** 2 * resp_K3).sum(0) / total_3 + floor
        if mean_log_likelihood - previous < tol:
            break
        previous = mean_log_likelihood
    order = np.argsort(means)
    return weights[order], means[order], variances[order]


def _log_joint(x_N: np.ndarray, weights: np.ndarray, means: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """(N, 3): log of each component's weight times its density at x."""
    return np.log(weights) - 0.5 * np.log(2 * np.pi * variances) - (x_N[:, None] - means) ** 2 / (2 * variances)


def tissue_maps(volume_DHW: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """(3, D, H, W): CSF partial-volume fraction, grey- and white-matter posteriors; zero outside the tissue."""
    tissue = brain & (volume_DHW > BACKGROUND)
    values_N = volume_DHW[tissue].astype(np.float64)
    weights, means, variances = intensity_mixture(values_N)
    log_joint_N3 = _log_joint(values_N, weights, means, variances)
    posterior_N3 = np.exp(log_joint_N3 - np.logaddexp.reduce(log_joint_N3, axis=1, keepdims=True))
    maps = np.zeros((3, *volume_DHW.shape), dtype=np.float32)
    maps[0, tissue] = np.clip((means[1] - values_N) / (means[1] - means[0]), 0.0, 1.0)
    maps[1:, tissue] = posterior_N3[:, 1:].T
    return maps


def regional_volumes(volume_DHW: np.ndarray, regions: TemplateRegions) -> dict[str, float]:
    csf, grey, white = tissue_maps(volume_DHW, regions.brain)
    tissue = regions.brain & (volume_DHW > BACKGROUND)
    volumes = {"ventricles": (csf * regions.ventricles).sum(), "grey_matter": grey.sum(),
               "white_matter": white.sum(), "hippocampus": (grey * regions.hippocampus).sum(),
               "whole_brain": tissue.sum() - csf.sum()}
    return {name: float(volumes[name]) * regions.voxel_ml for name in REGIONS}


def true_volumes(truth_row: dict) -> dict[str, float]:
    """The synthetic cohort's truth (truth.csv) in the regions measured here."""
    hippocampus = truth_row["hippocampus_left"] + truth_row["hippocampus_right"]
    return {"ventricles": truth_row["ventricles"], "grey_matter": truth_row["grey_matter"] + hippocampus,
            "white_matter": truth_row["white_matter"], "hippocampus": hippocampus,
            "whole_brain": truth_row["whole_brain"]}
