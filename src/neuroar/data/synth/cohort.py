"""The synthetic longitudinal cohort: subjects made from the MNI152 template, aged along literature rates.

Each subject is the template seen through (1) an aging flow from the cohort's reference age to each visit
(aging.py), (2) its own smooth diffeomorphic deformation and head size, and (3) its own tissue contrast and
bias field; each visit adds fresh Rician noise (and, if asked, a small rigid misregistration).
The output folder is BIDS-like, so it can be read as a manifest CSV or as a BIDS folder:

    manifest.csv  truth.csv  subjects.csv  participants.tsv  synth.json  figures/
    sub-001/sub-001_sessions.tsv
    sub-001/ses-01/anat/sub-001_ses-01_T1w.nii.gz   (int16 image)
    sub-001/ses-01/anat/sub-001_ses-01_dseg.nii.gz  (uint8 labels: 0 background, 1 + index in CLASSES)
    raw/  (with `raw`: every visit as a scanner gives it, a head in the scanner's pose (head.py), with
           manifest.csv, poses.csv and each scan's true *_desc-brain_mask.nii.gz)

truth.csv holds the true volumes (mL) of every labelled structure and of the whole brain (grey + white
matter + hippocampi; grey_matter excludes the hippocampi, which have their own columns), measured on the
label maps, which assign each voxel its most probable class. The aging itself is controlled on the
partial-volume tissue maps; on label maps at 2 mm the thin cortical ribbon makes grey matter's measured
rate run ~15-20 % faster than its configured one.

Every subject draws from its own seed (spawned from --seed), so files do not depend on the number of
worker processes, and the same seed gives bit-identical files.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial.transform import Rotation

from neuroar import __version__
from neuroar.data.atlas import CLASSES, Anatomy, load_anatomy
from neuroar.data.manifest import write_manifest
from neuroar.data.nifti import write_volume
from neuroar.data.synth.aging import COHORTS, AgingFlow, GroupRates, SubjectAging
from neuroar.data.synth.head import clean_voxels, draw_pose, head_layers, raw_grid
from neuroar.data.synth.warp import sample
from neuroar.errors import NeuroARError
from neuroar.files import atomic_path, write_json
from neuroar.parallel import in_processes
from neuroar.progress import Progress

WHITE_MATTER_SIGNAL = 1000.0  # stored intensity of white matter (int16 images, like scanners write)
VISIT_GAP_YEARS = (0.5, 4.0)  # irregular follow-up
CLEAN_BIAS = 0.08  # what is left after a scanner's own correction
RAW_BIAS = 0.3  # an uncorrected head coil's receive field


@dataclass(frozen=True)
class SynthOptions:
    subjects: int = 40
    visits: int = 3
    cohort: str = "elderly"
    spacing: int = 2  # mm: 1 or 2
    seed: int = 0
    deformation_mm: float = 2.0  # RMS of each subject's smooth deformation
    noise: float = 0.03  # Rician noise sigma, as a fraction of the white-matter signal
    misregistration: bool = False  # a small random rigid motion between visits
    raw: bool = False  # also write every scan as a scanner would (head, pose, strong bias) into raw/
    workers: int = 0  # processes; 0 = one per CPU core


@dataclass(frozen=True)
class SubjectPlan:
    subject_id: str
    group: str
    sex: str
    ages: tuple[float, ...]
    onset_age: float
    seed: np.random.SeedSequence


def make_cohort(out_dir: str | Path, options: SynthOptions = SynthOptions(), progress: bool = True) -> pd.DataFrame:
    """Write the cohort into `out_dir` and return its manifest."""
    _check(options)
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "synth.json").is_file():
        raise NeuroARError(f"{out_dir} is not empty and holds no earlier synthetic cohort; choose a new or empty "
                           "folder, so that nothing already there is overwritten.")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Marked as this tool's (and unfinished) before the first file, so that a synthesis stopped half-way is
    # written again over its own files rather than refused as someone else's folder.
    meta = {"options": asdict(options), "version": __version__, "finished": False,
            "labels": {str(i + 1): name for i, name in enumerate(CLASSES)}}
    write_json(out_dir / "synth.json", meta)
    plans = plan_subjects(options)
    if (options.workers or os.cpu_count() or 1) > 1:
        _flow(options.spacing)  # built once here, inherited by the forked workers (3 s each otherwise)
    rows: list[dict] = []
    for subject_rows in Progress(in_processes(make_subject, [(plan, options, out_dir) for plan in plans],
                                              options.workers), total=len(plans), desc="synth", unit="subject",
                                 enabled=progress):
        rows += subject_rows
    table = pd.DataFrame(rows).sort_values(["subject_id", "session_id"]).reset_index(drop=True)
    manifest = table[["subject_id", "session_id", "age", "path", "sex", "diagnosis"]]
    write_manifest(manifest, out_dir / "manifest.csv")
    _write_csv(table[["subject_id", "session_id", "age", *CLASSES, "whole_brain"]], out_dir / "truth.csv")
    _write_csv(pd.DataFrame([_subject_row(p, options) for p in plans]), out_dir / "subjects.csv")
    _write_bids_tables(manifest, out_dir)
    if options.raw:
        _write_raw_tables(table, out_dir / "raw")
    from neuroar.data.synth.figures import plot_montage, plot_trajectories

    plot_trajectories(table, out_dir / "figures" / "trajectories.png")
    plot_montage(manifest, out_dir, out_dir / "figures" / "montage.png")
    write_json(out_dir / "synth.json", {**meta, "finished": True})
    return manifest


def plan_subjects(options: SynthOptions) -> list[SubjectPlan]:
    """Groups (in the cohort's proportions), sexes, visit ages and disease onsets, all from the seed."""
    cohort = COHORTS[options.cohort]
    root = np.random.SeedSequence(options.seed)
    rng = np.random.default_rng(root.spawn(1)[0])
    names = list(cohort.groups)
    shares = np.array([cohort.groups[g][0] for g in names]) * options.subjects
    counts = np.floor(shares).astype(int)
    counts[np.argsort(-(shares - counts), kind="stable")[: options.subjects - counts.sum()]] += 1
    groups = np.repeat(names, counts)
    rng.shuffle(groups)
    plans = []
    for k, (group, seed) in enumerate(zip(groups, root.spawn(options.subjects + 1)[1:])):
        gaps = rng.uniform(*VISIT_GAP_YEARS, options.visits - 1)
        youngest, oldest = cohort.ages
        if gaps.sum() > oldest - youngest:  # many visits: squeeze them into the cohort's age range
            gaps *= (oldest - youngest) / gaps.sum()
        # max(): after squeezing, rounding can leave the gaps' sum a hair above the range (numpy refuses high < low).
        first = rng.uniform(youngest, max(youngest, oldest - gaps.sum()))
        ages = first + np.concatenate([[0.0], np.cumsum(gaps)])
        onset = cohort.reference_age if group == cohort.healthy else first - rng.uniform(*cohort.onset_years)
        plans.append(SubjectPlan(subject_id=f"sub-{k + 1:03d}", group=str(group), sex=str(rng.choice(["F", "M"])),
                                 ages=tuple(float(round(a, 2)) for a in ages), onset_age=float(round(onset, 2)),
                                 seed=seed))
    return plans


def make_subject(plan: SubjectPlan, options: SynthOptions, out_dir: Path) -> list[dict]:
    """Write one subject's visits (images and label maps); return one row per visit with true volumes."""
    anatomy = load_anatomy(options.spacing)
    flow = _flow(options.spacing)
    rng = np.random.default_rng(plan.seed)
    # The raw scans draw from their own stream, so that a cohort's clean scans do not depend on `raw`.
    raw_rng = np.random.default_rng(plan.seed.spawn(1)[0]) if options.raw else None
    aging = subject_aging(plan, options, rng, flow.template_ml)
    look = _Appearance.draw(rng, anatomy.t1.shape, options)
    grid = np.indices(anatomy.t1.shape, dtype=np.float32)
    deform = _subject_deformation(rng, flow, grid, anatomy.probabilities.sum(axis=0), options.deformation_mm)

    # The flow's volume gain drifts as structures change shape; each segment's request is corrected by the
    # gain the previous segment achieved, so that the change between visits follows the configured rates.
    unaged = deform(grid)
    baseline = _soft_volumes(anatomy.probabilities, unaged)
    state = flow.identity()
    achieved = np.zeros(len(CLASSES))
    gain = np.ones(len(CLASSES))
    target_before = np.zeros(len(CLASSES))
    rows = []
    for visit, age in enumerate(plan.ages, start=1):
        target = aging.log_change(age)
        increment = (target - target_before) / gain
        state = flow.advance(state, increment)
        template_coords = deform(_rigid(rng, grid)) if options.misregistration else unaged.copy()
        template_coords += flow.sample(state, template_coords)
        probabilities = sample(anatomy.probabilities, template_coords)
        volumes = _soft_volumes(anatomy.probabilities, template_coords, probabilities)
        now = np.log(volumes / baseline)
        with np.errstate(divide="ignore", invalid="ignore"):
            measured_gain = np.where(np.abs(increment) > 1e-3, (now - achieved) / increment, gain)
        gain = np.clip(measured_gain, 0.5, 1.5)
        achieved, target_before = now, target

        t1 = sample(anatomy.t1, template_coords)
        image = look.render(t1, probabilities, age, rng)
        labels = np.argmax(np.concatenate([1.0 - probabilities.sum(axis=0, keepdims=True), probabilities]), axis=0)
        session = f"ses-{visit:02d}"
        stem = Path(plan.subject_id) / session / "anat" / f"{plan.subject_id}_{session}"
        write_volume(out_dir / f"{stem}_T1w.nii.gz", image, anatomy.affine)
        write_volume(out_dir / f"{stem}_dseg.nii.gz", labels.astype(np.uint8), anatomy.affine)
        counts = np.bincount(labels.ravel(), minlength=len(CLASSES) + 1)[1:]
        ml = {name: float(n) * anatomy.voxel_ml for name, n in zip(CLASSES, counts)}
        ml["whole_brain"] = ml["grey_matter"] + ml["white_matter"] + ml["hippocampus_left"] + ml["hippocampus_right"]
        row = {"subject_id": plan.subject_id, "session_id": session, "age": age, "path": f"{stem}_T1w.nii.gz",
               "sex": plan.sex, "diagnosis": plan.group, **{k: round(v, 3) for k, v in ml.items()}}
        if raw_rng is not None:
            pose = write_raw_scan(out_dir / "raw" / stem, raw_rng, anatomy, deform, flow, state, look, age,
                                  options.spacing)
            row["pose"] = " ".join(f"{v:.6g}" for v in pose[:3].ravel())
        rows.append(row)
    return rows


def write_raw_scan(stem: Path, rng: np.random.Generator, anatomy: Anatomy, deform: Callable[[np.ndarray], np.ndarray],
                   flow: AgingFlow, state: np.ndarray, look: _Appearance, age: float, spacing: int) -> np.ndarray:
    """One visit as the scanner sees it (head.py): the image and its true brain mask on the raw grid.
    Returns the pose (MNI world -> scanner world)."""
    pose = draw_pose(rng)
    shape, affine = raw_grid(spacing)
    unaged = deform(clean_voxels(pose, shape, affine, anatomy.affine))
    template_coords = unaged + flow.sample(state, unaged)
    probabilities = sample(anatomy.probabilities, template_coords)
    brain = probabilities.sum(axis=0)
    t1 = sample(anatomy.t1, template_coords) + sample(head_layers(spacing), unaged) * np.clip(1.0 - brain, 0.0, 1.0)
    image = look.render(t1, probabilities, age, rng, bias=bias_field(rng, shape, RAW_BIAS))
    write_volume(stem.with_name(stem.name + "_T1w.nii.gz"), image, affine)
    write_volume(stem.with_name(stem.name + "_desc-brain_mask.nii.gz"), (brain > 0.5).astype(np.uint8), affine)
    return pose


def subject_aging(plan: SubjectPlan, options: SynthOptions, rng: np.random.Generator,
                  template_ml: dict[str, float]) -> SubjectAging:
    cohort = COHORTS[options.cohort]
    factors = {name: float(np.clip(rng.normal(1.0, cohort.subject_rate_sd), 0.5, 1.5))
               for name in GroupRates.__dataclass_fields__}
    return SubjectAging(cohort=cohort, group=plan.group, factors=factors, onset_age=plan.onset_age,
                        template_ml=template_ml)


@functools.lru_cache(maxsize=2)
def _flow(spacing: int) -> AgingFlow:
    return AgingFlow(load_anatomy(spacing))


def _soft_volumes(template_probabilities: np.ndarray, coords: np.ndarray,
                  warped: np.ndarray | None = None) -> np.ndarray:
    if warped is None:
        warped = sample(template_probabilities, coords)
    return warped.reshape(len(CLASSES), -1).sum(axis=1, dtype=np.float64)


def _subject_deformation(rng: np.random.Generator, flow: AgingFlow, grid: np.ndarray, brain: np.ndarray,
                         rms_mm: float):
    """Head size and a smooth diffeomorphism (a stationary velocity field integrated by scaling and
    squaring); returns a function from subject voxel coordinates to (unaged) template coordinates."""
    voxel_mm = 4.0 / flow.factor
    scale = float(np.clip(rng.normal(1.0, 0.035), 0.9, 1.1))  # linear head size; ~10 % SD in volume
    centre = np.array(ndimage.center_of_mass(brain), dtype=np.float32)[:, None, None, None]
    velocity = np.stack([ndimage.gaussian_filter(rng.standard_normal(flow.shape), 3.0) for _ in range(3)])
    velocity *= (rms_mm / voxel_mm / flow.factor) / np.sqrt((velocity**2).sum(axis=0).mean())
    squarings = 6
    displacement = velocity / 2**squarings
    coarse_grid = np.indices(flow.shape, dtype=np.float32)
    for _ in range(squarings):
        displacement = displacement + sample(displacement, coarse_grid + displacement, outside="nearest")
    displacement = displacement.astype(np.float32)

    def to_template(coords: np.ndarray) -> np.ndarray:
        scaled = centre + (coords - centre) / np.float32(scale)
        return scaled + flow.sample(displacement, scaled)

    return to_template


def _rigid(rng: np.random.Generator, grid: np.ndarray) -> np.ndarray:
    """A small random rigid motion (about 1 degree, 1 voxel) of the sampling grid about its centre."""
    rotation = Rotation.from_euler("XYZ", rng.normal(0.0, 1.0, 3), degrees=True).as_matrix()
    centre = (np.array(grid.shape[1:]) - 1) / 2.0
    flat = grid.reshape(3, -1) - centre[:, None]
    moved = rotation @ flat + (centre + rng.normal(0.0, 1.0, 3))[:, None]
    return moved.reshape(grid.shape).astype(np.float32)


@dataclass(frozen=True)
class _Appearance:
    """A subject's look: tissue contrast, a smooth multiplicative bias field and its noise level."""

    gains: np.ndarray  # per class of CLASSES
    contrast_decline: float
    reference_age: float
    bias: np.ndarray
    noise: float

    @classmethod
    def draw(cls, rng: np.random.Generator, shape: tuple[int, ...], options: SynthOptions) -> _Appearance:
        csf, gm = rng.normal(1.0, 0.1), rng.normal(1.0, 0.04)
        gains = np.array([csf, gm, 1.0, csf, gm, gm], dtype=np.float32)
        cohort = COHORTS[options.cohort]
        return cls(gains, cohort.contrast_decline, cohort.reference_age, bias_field(rng, shape, CLEAN_BIAS),
                   options.noise * WHITE_MATTER_SIGNAL)

    def render(self, t1: np.ndarray, probabilities: np.ndarray, age: float, rng: np.random.Generator,
               bias: np.ndarray | None = None) -> np.ndarray:
        """The image of `t1` with this subject's contrast, bias field (or `bias`, on another grid) and noise."""
        gains = self.gains.copy()
        gains[2] *= 1.0 - self.contrast_decline * (age - self.reference_age)  # aging white matter darkens
        contrast = 1.0 + np.tensordot(gains - 1.0, probabilities, axes=1)
        bias = self.bias if bias is None else bias
        signal = t1 * contrast * bias * (WHITE_MATTER_SIGNAL / 0.87)  # template white matter is ~0.87
        real = signal + rng.normal(0.0, self.noise, signal.shape)
        imaginary = rng.normal(0.0, self.noise, signal.shape)
        return np.round(np.hypot(real, imaginary)).clip(0, 32767).astype(np.int16)


def bias_field(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """A smooth multiplicative field of up to about +-`amplitude` across the volume."""
    coarse = ndimage.gaussian_filter(rng.standard_normal(tuple(max(2, s // 8) for s in shape)), 1.5)
    coarse *= amplitude / max(float(np.abs(coarse).max()), 1e-6)
    return np.exp(ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=3)).astype(np.float32)


def _subject_row(plan: SubjectPlan, options: SynthOptions) -> dict:
    rng = np.random.default_rng(plan.seed)
    aging = subject_aging(plan, options, rng, _flow(options.spacing).template_ml)
    pivot = aging.cohort.pivot_age
    rates = {f"{name}_rate_at_{pivot:g}": round(aging.annual_rate(name, pivot), 3)
             for name in ("ventricles", "hippocampus", "grey_matter", "white_matter", "whole_brain")}
    return {"subject_id": plan.subject_id, "diagnosis": plan.group, "sex": plan.sex, "onset_age": plan.onset_age,
            **{f"factor_{k}": round(v, 4) for k, v in aging.factors.items()}, **rates}


def _write_bids_tables(manifest: pd.DataFrame, out_dir: Path) -> None:
    first = manifest.groupby("subject_id", sort=True).first().reset_index()
    participants = first.rename(columns={"subject_id": "participant_id"})[["participant_id", "age", "sex", "diagnosis"]]
    _write_csv(participants, out_dir / "participants.tsv", sep="\t")
    for subject, visits in manifest.groupby("subject_id"):
        _write_csv(visits[["session_id", "age"]], out_dir / subject / f"{subject}_sessions.tsv", sep="\t")
    write_json(out_dir / "dataset_description.json",
               {"Name": "neuroar synthetic longitudinal cohort", "BIDSVersion": "1.9.0", "DatasetType": "raw"})


def _write_raw_tables(table: pd.DataFrame, raw_dir: Path) -> None:
    """raw/manifest.csv (the raw scans, to preprocess with data.raw=true), raw/poses.csv (each scan's true
    pose: the top three rows of the MNI -> scanner world matrix) and the BIDS tables, so that raw/ also reads
    as a BIDS folder."""
    manifest = table[["subject_id", "session_id", "age", "path", "sex", "diagnosis"]]
    write_manifest(manifest, raw_dir / "manifest.csv")
    _write_csv(table[["subject_id", "session_id", "pose"]], raw_dir / "poses.csv")
    _write_bids_tables(manifest, raw_dir)


def _write_csv(frame: pd.DataFrame, path: Path, sep: str = ",") -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, sep=sep)


def _check(options: SynthOptions) -> None:
    if options.cohort not in COHORTS:
        raise NeuroARError(f"unknown cohort {options.cohort!r}; choose one of {', '.join(COHORTS)}.")
    if options.spacing not in (1, 2):
        raise NeuroARError(f"--spacing must be 1 or 2 (mm), got {options.spacing}.")
    if options.subjects < 1 or options.visits < 1:
        raise NeuroARError("--subjects and --visits must be at least 1.")
    if options.raw and options.misregistration:
        raise NeuroARError("--raw and --misregistration both move the head between visits; choose one (a raw "
                           "scan's pose already differs at every visit).")
    if not 0 <= options.noise < 1 or options.deformation_mm < 0 or not math.isfinite(options.deformation_mm):
        raise NeuroARError("noise must be in [0, 1) and deformation_mm >= 0.")
