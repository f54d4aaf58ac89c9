"""Regional volumes of any standard-space T1 (a preprocessed scan, a prediction): the measure of aging.

Tissue: a three-class Gaussian mixture of the intensities inside MNI152's brain mask, leaving out
background-dark voxels (a subject's brain rarely fills the template mask); components ordered dark to
bright are CSF, grey and white matter. The mixture is fitted by EM to the intensity histogram: each iteration
then costs 512 bins instead of ~200k voxels, so the fit runs to convergence in about 30 ms, and several scans'
fits side by side (`regional_volumes_many`) in about 15 ms a scan (scikit-learn's GaussianMixture takes no
sample weights, and on every voxel it had to stop early, which left earlier scan and prediction at different
points of a flat likelihood). CSF is counted with a partial-volume model (the share of the way from the
grey-matter mean down to the CSF mean), which follows small changes of the ventricles far better than hard labels;
grey and white matter are the mixture's posterior probabilities.
Regions: the template's lateral ventricles and hippocampi (as located in the synthetic anatomy), dilated so
that a subject's structure stays inside them as it grows or moves. Ventricles = CSF inside the ventricle
region; hippocampus = grey matter inside the hippocampus regions; whole brain = everything but CSF.
Volumes in mL. How well this recovers the synthetic cohort's true volumes is measured in the tests.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

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
    return intensity_mixtures([values], bins, tol, max_iter)[0]


def intensity_mixtures(values: Sequence[np.ndarray], bins: int = 512, tol: float = 1e-8, max_iter: int = 1000
                       ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`intensity_mixture` of each of `values`, their EM iterations run side by side (one iteration of a few
    hundred bins costs about what the numpy calls cost: together they cost little more than one); each stops when
    its own likelihood stops rising, as it would alone."""
    if not len(values):
        return []
    histograms = [np.histogram(v, bins=bins) for v in values]
    counts_SK = np.stack([counts for counts, _ in histograms]).astype(np.float64)
    centres_SK = np.stack([(edges[:-1] + edges[1:]) / 2 for _, edges in histograms])
    floor_S = np.array([(edges[1] - edges[0]) ** 2 for _, edges in histograms])  # no collapse onto one bin
    total_S = counts_SK.sum(1)
    # Components first ((3, S) parameters, (3, A, K) per bin): the sums over three components are two additions.
    weights_3S = np.full((3, len(values)), 1 / 3)
    means_3S = np.stack([np.quantile(v, [0.1, 0.5, 0.9]) for v in values], axis=1)
    variances_3S = np.stack([np.full(3, v.var()) for v in values], axis=1)
    previous_S = np.full(len(values), -np.inf)
    active = np.arange(len(values))
    for _ in range(max_iter):
        if not len(active):
            break
        counts_AK, centres_AK = counts_SK[active], centres_SK[active]
        weights_3A1, means_3A1, variances_3A1 = (a[:, active, None] for a in (weights_3S, means_3S, variances_3S))
        log_joint_3AK = (np.log(weights_3A1) - 0.5 * np.log(2 * np.pi * variances_3A1)
                         - (centres_AK - means_3A1) ** 2 / (2 * variances_3A1))
        top_AK = np.maximum(np.maximum(log_joint_3AK[0], log_joint_3AK[1]), log_joint_3AK[2])
        joint_3AK = np.exp(log_joint_3AK - top_AK)  # log-sum-exp over the components, shifted by the largest
        sum_AK = joint_3AK[0] + joint_3AK[1] + joint_3AK[2]
        mean_log_likelihood_A = (counts_AK * (top_AK + np.log(sum_AK))).sum(1) / total_S[active]
        resp_3AK = joint_3AK * (counts_AK / sum_AK)
        mass_3A = resp_3AK.sum(2)
        means_3A = (resp_3AK * centres_AK).sum(2) / mass_3A
        weights_3S[:, active] = mass_3A / total_S[active]
        means_3S[:, active] = means_3A
        spread_3A = ((centres_AK - means_3A[..., None]) ** 2 * resp_3AK).sum(2)
        variances_3S[:, active] = spread_3A / mass_3A + floor_S[active]
        converged = mean_log_likelihood_A - previous_S[active] < tol
        previous_S[active] = mean_log_likelihood_A
        active = active[~converged]
    order_S3 = np.argsort(means_3S.T, axis=1)
    return [(w[o], m[o], v[o]) for w, m, v, o in zip(weights_3S.T, means_3S.T, variances_3S.T, order_S3)]


def _log_joint(x_N: np.ndarray, weights: np.ndarray, means: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """(N, 3): log of each component's weight times its density at x."""
    return np.log(weights) - 0.5 * np.log(2 * np.pi * variances) - (x_N[:, None] - means) ** 2 / (2 * variances)


def tissue_maps(volume_DHW: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """(3, D, H, W): CSF partial-volume fraction, grey- and white-matter posteriors; zero outside the tissue."""
    return tissue_maps_many([volume_DHW], brain)[0]


def tissue_maps_many(volumes_DHW: Sequence[np.ndarray], brain: np.ndarray) -> list[np.ndarray]:
    """`tissue_maps` of each volume, their mixtures fitted side by side (`intensity_mixtures`)."""
    tissues = [brain & (volume_DHW > BACKGROUND) for volume_DHW in volumes_DHW]
    values = [volume_DHW[tissue].astype(np.float64) for volume_DHW, tissue in zip(volumes_DHW, tissues)]
    maps = []
    for volume_DHW, tissue, values_N, (weights, means, variances) in zip(volumes_DHW, tissues, values,
                                                                         intensity_mixtures(values)):
        log_joint_3N = _log_joint(values_N, weights, means, variances).T
        joint_3N = np.exp(log_joint_3N - np.maximum(np.maximum(log_joint_3N[0], log_joint_3N[1]), log_joint_3N[2]))
        posterior_3N = joint_3N / (joint_3N[0] + joint_3N[1] + joint_3N[2])
        scan_maps = np.zeros((3, *volume_DHW.shape), dtype=np.float32)
        scan_maps[0, tissue] = np.clip((means[1] - values_N) / (means[1] - means[0]), 0.0, 1.0)
        scan_maps[1:, tissue] = posterior_3N[1:]
        maps.append(scan_maps)
    return maps


def regional_volumes(volume_DHW: np.ndarray, regions: TemplateRegions) -> dict[str, float]:
    return regional_volumes_many([volume_DHW], regions)[0]


def regional_volumes_many(volumes_DHW: Sequence[np.ndarray], regions: TemplateRegions) -> list[dict[str, float]]:
    """`regional_volumes` of each volume, measured together (faster; the same numbers to float rounding)."""
    measured = []
    for volume_DHW, (csf, grey, white) in zip(volumes_DHW, tissue_maps_many(volumes_DHW, regions.brain)):
        tissue = regions.brain & (volume_DHW > BACKGROUND)
        volumes = {"ventricles": (csf * regions.ventricles).sum(), "grey_matter": grey.sum(),
                   "white_matter": white.sum(), "hippocampus": (grey * regions.hippocampus).sum(),
                   "whole_brain": tissue.sum() - csf.sum()}
        measured.append({name: float(volumes[name]) * regions.voxel_ml for name in REGIONS})
    return measured


def true_volumes(truth_row: dict) -> dict[str, float]:
    """The synthetic cohort's truth (truth.csv) in the regions measured here."""
    hippocampus = truth_row["hippocampus_left"] + truth_row["hippocampus_right"]
    return {"ventricles": truth_row["ventricles"], "grey_matter": truth_row["grey_matter"] + hippocampus,
            "white_matter": truth_row["white_matter"], "hippocampus": hippocampus,
            "whole_brain": truth_row["whole_brain"]}
