"""Aging: literature rates per cohort and group, and the flow that makes each tissue change at its rate.

Rates are annual % volume changes at a pivot age; atrophy accelerates with age through
log-rate(age) = log(1 + rate / 100) * exp(acceleration * (age - pivot)). Disease groups age at the healthy
group's rates until an onset a few years before their first visit, then at their own.

Elderly (per year at age 70): whole brain -0.45 % in healthy elderly and about -1 % in mild AD
(Fotenos 2005); hippocampus -1.4 % in controls and -4.7 % in AD (Barnes 2009); lateral ventricles +3 %
in healthy 73-87-year-olds, faster in MCI and faster still in AD (Nestor 2008); cortex about -0.5 % in
healthy elderly (Fjell 2009). MCI values lie between CN and AD. Adolescents (9-16): cortical grey matter
-1.2 % with white matter growing (Tamnes 2013, Giedd 1999) while the whole brain stays nearly constant.
White matter's rate is derived so that grey + white matter together change at the whole-brain rate; the
extra-ventricular CSF fills what the brain loses, so the intracranial volume never changes.

The flow: tissue moves with a velocity whose divergence is each tissue's log-rate, recomputed from the
deformed tissue maps at every step (the rate moves with the tissue it belongs to). The velocity is the
gradient of a potential solved by FFT (div grad phi = L), with central-difference operators because
the warp's linear interpolation changes volumes by the finite-difference divergence. The flow runs on a
4 mm grid, where thin structures blur into their neighbours; the per-tissue sources are therefore found by
inverting the matrix of overlaps between fine tissue maps and coarse ones, so that each fine tissue map
changes by its target to first order. What first order misses as shapes change over decades is corrected
by the cohort, which measures each visit's volumes and rescales the next request (cohort.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from neuroar.data.atlas import CLASSES, Anatomy
from neuroar.data.synth.warp import sample

FLOW_GRID_MM = 4.0
MAX_LOG_STEP = 0.03  # largest log-volume change of any tissue in one flow step


@dataclass(frozen=True)
class GroupRates:
    """Annual % volume change at the cohort's pivot age."""

    ventricles: float
    hippocampus: float
    grey_matter: float
    whole_brain: float


@dataclass(frozen=True)
class CohortSpec:
    ages: tuple[float, float]  # every visit falls in this age range
    reference_age: float  # the template is a subject of this age
    pivot_age: float  # the age the rates are given at
    acceleration: float  # per year
    groups: dict[str, tuple[float, GroupRates]]  # name -> (share of subjects, rates)
    healthy: str
    onset_years: tuple[float, float] = (1.0, 5.0)  # disease onset before the first visit
    contrast_decline: float = 0.0  # per year: white-matter signal falls toward grey matter's with age
    subject_rate_sd: float = 0.15  # each subject's rate = group rate * N(1, sd), per structure


COHORTS: dict[str, CohortSpec] = {
    "elderly": CohortSpec(
        ages=(55.0, 90.0), reference_age=50.0, pivot_age=70.0, acceleration=0.03, healthy="CN",
        groups={"CN": (0.4, GroupRates(ventricles=3.0, hippocampus=-1.4, grey_matter=-0.5, whole_brain=-0.45)),
                "MCI": (0.3, GroupRates(ventricles=4.5, hippocampus=-2.8, grey_matter=-0.8, whole_brain=-0.7)),
                "AD": (0.3, GroupRates(ventricles=6.0, hippocampus=-4.7, grey_matter=-1.2, whole_brain=-1.0))},
        contrast_decline=0.002),
    "adolescent": CohortSpec(
        ages=(9.0, 16.0), reference_age=8.0, pivot_age=12.0, acceleration=0.0, healthy="TD",
        groups={"TD": (1.0, GroupRates(ventricles=1.0, hippocampus=0.3, grey_matter=-1.2, whole_brain=-0.2))}),
}


@dataclass(frozen=True)
class SubjectAging:
    """One subject's rates: its group's, scaled per structure by its own factors."""

    cohort: CohortSpec
    group: str
    factors: dict[str, float]  # per GroupRates field
    onset_age: float  # disease onset (the reference age for the healthy group)
    template_ml: dict[str, float] = field(repr=False)

    def annual_rate(self, structure: str, age: float) -> float:
        """Annual % change at `age` of a structure of CLASSES (csf excluded), 'hippocampus' or 'whole_brain',
        at the subject's own group rates (those after any disease onset)."""
        return 100.0 * math.expm1(self._log_rate(self.group, structure) * self._acceleration(age))

    def log_change(self, age: float) -> np.ndarray:
        """Cumulative log-volume change of each of CLASSES from the reference age; csf is set by the flow."""
        return np.array([0.0 if name == "csf" else self.cumulative(name, age) for name in CLASSES])

    def cumulative(self, structure: str, age: float) -> float:
        """Log-volume change of a structure (as for `annual_rate`) from the reference age."""
        healthy = self.cohort.healthy
        change = self._integral(healthy, structure, self.cohort.reference_age, age)
        if age > self.onset_age:
            change += (self._integral(self.group, structure, self.onset_age, age)
                       - self._integral(healthy, structure, self.onset_age, age))
        return change

    def _log_rate(self, group: str, structure: str) -> float:
        rates = self.cohort.groups[group][1]
        f = self.factors

        def log_rate(name: str) -> float:
            return math.log1p(getattr(rates, name) * f[name] / 100.0)

        if structure in ("ventricles", "grey_matter", "whole_brain"):
            return log_rate(structure)
        if structure.startswith("hippocampus"):
            return log_rate("hippocampus")
        if structure == "white_matter":
            v = self.template_ml
            hippocampus_ml = v["hippocampus_left"] + v["hippocampus_right"]
            brain_ml = v["grey_matter"] + v["white_matter"] + hippocampus_ml
            return (log_rate("whole_brain") * brain_ml - log_rate("grey_matter") * v["grey_matter"]
                    - log_rate("hippocampus") * hippocampus_ml) / v["white_matter"]
        raise ValueError(f"no configured rate for {structure!r}")

    def _acceleration(self, age: float) -> float:
        return math.exp(self.cohort.acceleration * (age - self.cohort.pivot_age))

    def _integral(self, group: str, structure: str, start: float, end: float) -> float:
        """Integral of the log-rate from start to end (negative when end < start)."""
        g, p = self.cohort.acceleration, self.cohort.pivot_age
        span = end - start if g == 0 else (math.exp(g * (end - p)) - math.exp(g * (start - p))) / g
        return self._log_rate(group, structure) * span


class AgingFlow:
    """Integrates the tissue flow on a coarse grid for one template anatomy; reused across subjects."""

    def __init__(self, anatomy: Anatomy):
        voxel_mm = float(abs(anatomy.affine[0, 0]))
        self.factor = max(1, round(FLOW_GRID_MM / voxel_mm))  # fine voxels per coarse voxel
        self.probabilities = np.stack([_block_mean(p, self.factor) for p in anatomy.probabilities])
        self.template_ml = anatomy.volumes_ml()
        # overlap[s, t]: mean over fine tissue s of coarse tissue t's map (upsampled); inverting it turns the
        # wanted log-rates per fine tissue into source strengths per coarse map.
        up = np.stack([self._upsample(p, anatomy.t1.shape) for p in self.probabilities])
        fine = anatomy.probabilities.reshape(len(CLASSES), -1).astype(np.float64)
        overlap = (fine @ up.reshape(len(CLASSES), -1).T) / fine.sum(axis=1, keepdims=True)
        # Sources that give every tissue but csf its target change, with a zero net source so that the
        # intracranial volume stays constant; csf then takes up exactly what the other tissues lose.
        coarse_ml = self.probabilities.reshape(len(CLASSES), -1).sum(axis=1, dtype=np.float64)
        self.system = np.vstack([coarse_ml / coarse_ml.sum(), overlap[1:]])
        self.shape = self.probabilities.shape[1:]
        self.pad = 8
        padded = tuple(s + 2 * self.pad for s in self.shape)
        k = np.meshgrid(*[2 * np.pi * np.fft.fftfreq(n) for n in padded[:2]], 2 * np.pi * np.fft.rfftfreq(padded[2]),
                        indexing="ij")
        # Central-difference operators (sin k rather than k): the warp sees the velocity through linear
        # interpolation, whose volume change follows the finite-difference divergence, not the spectral one.
        self.derivative = [np.sin(kk) for kk in k]
        laplacian = sum(d**2 for d in self.derivative)
        self.inverse_laplacian = np.divide(1.0, laplacian, out=np.zeros_like(laplacian), where=laplacian > 1e-9)
        self.padded = padded
        self.grid = np.indices(self.shape, dtype=np.float32)

    def identity(self) -> np.ndarray:
        """The state of a subject at the reference age: no displacement."""
        return np.zeros((3, *self.shape), dtype=np.float32)

    def advance(self, displacement: np.ndarray, log_change: np.ndarray) -> np.ndarray:
        """Age a state by `log_change` (per tissue of CLASSES; csf's entry is ignored: csf keeps the
        intracranial volume constant) in steps small enough for the first-order volume model."""
        increment = np.asarray(log_change, dtype=float).copy()
        increment[0] = 0.0
        steps = max(1, math.ceil(np.abs(increment).max() / MAX_LOG_STEP))
        for _ in range(steps):
            displacement = self._step(displacement, increment / steps)
        return displacement

    def sample(self, displacement: np.ndarray, fine_coords: np.ndarray) -> np.ndarray:
        """The displacement, in fine voxels, at fine-grid coordinates (3, ...): template = coords + this."""
        coarse = self.fine_to_coarse(fine_coords)
        return sample(displacement, coarse, outside="nearest") * np.float32(self.factor)

    def _step(self, displacement: np.ndarray, log_step: np.ndarray) -> np.ndarray:
        sources = np.linalg.solve(self.system, np.concatenate([[0.0], log_step[1:]]))
        coords = self.grid + displacement
        source = sample(np.tensordot(sources, self.probabilities, axes=1), coords, outside="nearest")
        # The net source must vanish in the current space, not the template's, or the head slowly inflates
        # as the expanding csf gains weight; the csf absorbs the remainder.
        csf = sample(self.probabilities[0], coords, outside="nearest")
        source -= csf * (source.sum(dtype=np.float64) / csf.sum(dtype=np.float64))
        velocity = self._velocity(source)
        back = self.grid - velocity
        moved = sample(displacement, back, outside="nearest")
        return (moved - velocity).astype(np.float32)

    def _velocity(self, source: np.ndarray) -> np.ndarray:
        """The gradient field whose divergence is `source` (coarse voxels per step)."""
        p = self.pad
        padded = np.pad(source, p)
        potential_hat = -np.fft.rfftn(padded) * self.inverse_laplacian
        velocity = [np.fft.irfftn(1j * d * potential_hat, s=self.padded, axes=(0, 1, 2)) for d in self.derivative]
        return np.stack([v[p:-p, p:-p, p:-p] for v in velocity]).astype(np.float32)

    def _upsample(self, coarse: np.ndarray, fine_shape: tuple[int, ...]) -> np.ndarray:
        return sample(coarse, self.fine_to_coarse(np.indices(fine_shape, dtype=np.float32)), outside="nearest")

    def fine_to_coarse(self, fine_coords: np.ndarray) -> np.ndarray:
        """Coarse voxel i averages fine voxels f*i .. f*i + f - 1, so its centre is f*i + (f - 1) / 2."""
        return (fine_coords - (self.factor - 1) / 2.0) / self.factor


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    pad = [(0, -s % factor) for s in volume.shape]
    padded = np.pad(volume, pad)
    shape = [s // factor for s in padded.shape]
    blocks = padded.reshape(shape[0], factor, shape[1], factor, shape[2], factor)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)
