"""The synthetic cohort: literature rates measured back from its label maps, truth, determinism, figures."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from scipy import ndimage

from conftest import COHORT_OPTIONS
from neuroar.data.atlas import CLASSES, load_anatomy
from neuroar.data.bids import discover_bids
from neuroar.data.manifest import read_manifest
from neuroar.data.synth import cohort as cohort_module
from neuroar.data.synth.aging import COHORTS
from neuroar.data.synth.cohort import SynthOptions, _flow, make_cohort, plan_subjects, subject_aging
from neuroar.data.synth.warp import sample
from neuroar.errors import NeuroARError
from neuroar.pipeline import _cohort_options

OPTIONS = COHORT_OPTIONS
# Label ids of each structure whose change is measured.
LABELS = {"ventricles": [4], "hippocampus": [5, 6], "grey_matter": [2], "whole_brain": [2, 3, 5, 6]}


def label_volumes_ml(path):
    """Independent of the generator: count voxels of the written label map."""
    img = nib.load(path)
    labels = np.asarray(img.dataobj)
    voxel_ml = abs(np.linalg.det(img.affine[:3, :3])) / 1000
    return {name: np.isin(labels, ids).sum() * voxel_ml for name, ids in LABELS.items()}


@pytest.fixture(scope="module")
def annual_changes(cohort):
    """Per subject, first to last visit: measured and configured annual log-volume change (%/yr) of each
    structure, and the measured one adjusted to the pivot age (the age-acceleration divided out)."""
    manifest = pd.read_csv(cohort / "manifest.csv")
    plans = {p.subject_id: p for p in plan_subjects(OPTIONS)}
    rows = []
    for subject, visits in manifest.groupby("subject_id"):
        plan = plans[subject]
        aging = subject_aging(plan, OPTIONS, np.random.default_rng(plan.seed), _flow(OPTIONS.spacing).template_ml)
        first, last = (label_volumes_ml(cohort / visits["path"].iloc[i].replace("_T1w", "_dseg")) for i in (0, -1))
        start, end = visits["age"].iloc[0], visits["age"].iloc[-1]
        acceleration = np.exp(aging.cohort.acceleration * ((start + end) / 2 - aging.cohort.pivot_age))
        for name in LABELS:
            measured = 100 * np.log(last[name] / first[name]) / (end - start)
            configured = 100 * (aging.cumulative(name, end) - aging.cumulative(name, start)) / (end - start)
            rows.append({"group": plan.group, "structure": name, "measured": measured, "configured": configured,
                         "measured_at_pivot_age": measured / acceleration})
    return pd.DataFrame(rows).groupby(["structure", "group"]).mean()


def test_every_group_ages_at_its_configured_rates(annual_changes):
    ratio = annual_changes["measured"] / annual_changes["configured"]
    assert ((ratio > 0.7) & (ratio < 1.3)).all(), annual_changes.assign(ratio=ratio)


def test_disease_groups_atrophy_faster_at_matched_age(annual_changes):
    measured = annual_changes["measured_at_pivot_age"]
    for name, sign in [("hippocampus", -1), ("whole_brain", -1), ("grey_matter", -1), ("ventricles", 1)]:
        speed = sign * measured[name]
        assert speed["AD"] > speed["MCI"] > speed["CN"] > 0, (name, speed)


def test_truth_matches_the_label_maps(cohort):
    truth = pd.read_csv(cohort / "truth.csv")
    manifest = pd.read_csv(cohort / "manifest.csv")
    assert list(truth["session_id"]) == list(manifest["session_id"])
    for (_, row), path in zip(truth.iterrows(), manifest["path"]):
        img = nib.load(cohort / path.replace("_T1w", "_dseg"))
        labels = np.asarray(img.dataobj)
        voxel_ml = abs(np.linalg.det(img.affine[:3, :3])) / 1000
        for k, name in enumerate(CLASSES, start=1):
            assert row[name] == pytest.approx((labels == k).sum() * voxel_ml, abs=1e-3)
        assert row["whole_brain"] == pytest.approx(np.isin(labels, [2, 3, 5, 6]).sum() * voxel_ml, abs=1e-3)
        assert 1000 < row["whole_brain"] < 2400 and 1 < row["hippocampus_left"] < 5


def test_cohort_reads_as_a_manifest_and_as_bids(cohort):
    manifest = read_manifest(cohort / "manifest.csv")
    bids = discover_bids(cohort)
    assert len(manifest) == OPTIONS.subjects * OPTIONS.visits
    columns = ["subject_id", "session_id", "age", "path", "diagnosis", "sex"]
    pd.testing.assert_frame_equal(manifest[columns], bids[columns])
    assert set(manifest["diagnosis"]) == {"CN", "MCI", "AD"}
    gaps = manifest.groupby("subject_id")["age"].diff().dropna()
    assert gaps.between(0.5, 4.0).all() and manifest["age"].between(55, 90).all()


def test_subjects_differ_more_than_visits_of_one_subject(cohort):
    manifest = pd.read_csv(cohort / "manifest.csv")

    def image(subject, visit):
        path = manifest[manifest["subject_id"] == subject]["path"].iloc[visit]
        return ndimage.gaussian_filter(nib.load(cohort / path).get_fdata(), 1.0)  # smooth the noise out

    subjects = sorted(manifest["subject_id"].unique())[:4]
    first = {s: image(s, 0) for s in subjects}
    head = first[subjects[0]] > 200
    within = [np.abs(first[s] - image(s, 1))[head].mean() for s in subjects]
    between = [np.abs(first[a] - first[b])[head].mean() for a, b in zip(subjects, subjects[1:])]
    assert min(between) > 2 * max(within) > 0


def test_figures_are_written(cohort):
    for name in ("trajectories.png", "montage.png"):
        picture = imread(cohort / "figures" / name)
        assert picture.shape[0] > 300 and picture.shape[1] > 300
        assert picture[..., :3].std() > 0.05  # not a blank canvas


def test_same_seed_gives_identical_files_whatever_the_worker_count(tmp_path):
    options = SynthOptions(subjects=2, visits=2, seed=11, workers=1)
    make_cohort(tmp_path / "one", options, progress=False)
    make_cohort(tmp_path / "two", SynthOptions(subjects=2, visits=2, seed=11, workers=2), progress=False)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*")
                   if p.is_file() and p.suffix != ".png" and p.name != "synth.json")
    assert len(files) > 10
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    make_cohort(tmp_path / "other", SynthOptions(subjects=2, visits=2, seed=12, workers=1), progress=False)
    assert (tmp_path / "other" / "truth.csv").read_bytes() != (tmp_path / "one" / "truth.csv").read_bytes()


def test_adolescents_lose_grey_matter_and_gain_white_matter(tmp_path):
    make_cohort(tmp_path, SynthOptions(subjects=2, visits=2, cohort="adolescent", workers=1), progress=False)
    truth = pd.read_csv(tmp_path / "truth.csv").sort_values(["subject_id", "age"])
    change = truth.groupby("subject_id")[["grey_matter", "white_matter"]].agg(lambda v: v.iloc[-1] / v.iloc[0] - 1)
    assert (change["grey_matter"] < 0).all() and (change["white_matter"] > 0).all()
    assert pd.read_csv(tmp_path / "manifest.csv")["age"].between(9, 16).all()


@pytest.mark.parametrize("cohort", ["elderly", "adolescent"])
def test_every_visit_lies_in_the_cohort_age_range_even_when_visits_must_be_squeezed(cohort):
    # The study's size: 4 visits of 0.5-4 years apart often span more than the adolescents' 7 years.
    youngest, oldest = COHORTS[cohort].ages
    for plan in plan_subjects(SynthOptions(subjects=150, visits=4, cohort=cohort, seed=0)):
        assert youngest <= plan.ages[0] < plan.ages[-1] <= oldest, plan
        assert all(np.diff(plan.ages) > 0), plan


def test_template_structures_are_where_anatomy_puts_them():
    anatomy = load_anatomy(2)
    volumes = anatomy.volumes_ml()
    assert 10 < volumes["ventricles"] < 30
    assert 2 < volumes["hippocampus_left"] < 5 and volumes["hippocampus_left"] == pytest.approx(
        volumes["hippocampus_right"], rel=0.05)
    ijk = np.array(np.nonzero(anatomy.probabilities[CLASSES.index("hippocampus_left")] > 0.5))
    x, y, z = (anatomy.affine[:3, :3] @ ijk + anatomy.affine[:3, 3:]).mean(axis=1)
    assert -35 < x < -18 and -35 < y < -10 and -25 < z < 0  # left medial temporal lobe, MNI mm
    assert np.allclose(anatomy.probabilities.sum(axis=0)[anatomy.t1 > 0.2], 1.0, atol=1e-4)




@pytest.mark.parametrize("outside, scipy_mode", [("zero", "grid-constant"), ("nearest", "nearest")])
def test_warp_interpolates_as_scipy_does_inside_and_outside_the_volume(outside, scipy_mode):
    rng = np.random.default_rng(0)
    volumes = rng.random((3, 7, 9, 8)).astype(np.float32)
    coords = rng.uniform(-2.0, 10.0, (3, 5, 40)).astype(np.float32)  # a third of the points lie outside
    expected = np.stack([ndimage.map_coordinates(v, coords, order=1, mode=scipy_mode) for v in volumes])
    warped = sample(volumes, coords, outside=outside)
    assert warped.shape == (3, 5, 40)
    np.testing.assert_allclose(warped, expected, atol=1e-5)
    np.testing.assert_allclose(sample(volumes[1], coords, outside=outside), expected[1], atol=1e-5)


@pytest.mark.slow
def test_one_millimetre_cohort(tmp_path):
    make_cohort(tmp_path, SynthOptions(subjects=1, visits=2, spacing=1, workers=1), progress=False)
    path = pd.read_csv(tmp_path / "manifest.csv")["path"].iloc[0]
    img = nib.load(tmp_path / path)
    assert img.shape == (197, 233, 189) and np.allclose(img.header.get_zooms(), 1.0)
    truth = pd.read_csv(tmp_path / "truth.csv")
    assert truth["ventricles"].iloc[1] > truth["ventricles"].iloc[0]
    assert truth["whole_brain"].iloc[1] < truth["whole_brain"].iloc[0]


def test_refuses_to_write_into_a_folder_with_other_content(tmp_path):
    (tmp_path / "my_scan.nii.gz").write_bytes(b"precious")
    with pytest.raises(NeuroARError, match="not empty"):
        make_cohort(tmp_path, SynthOptions(subjects=1, visits=1, workers=1), progress=False)
    assert (tmp_path / "my_scan.nii.gz").read_bytes() == b"precious"


def test_a_synthesis_stopped_half_way_is_written_again_over_its_own_files_and_never_taken_for_finished(
        tmp_path, monkeypatch):
    """A stopped `neuroar study` or `demo` resumes: the cohort folder it left half-written is neither refused as
    someone else's nor, where a finished cohort of other options had left its manifest, kept as done."""
    written = cohort_module.make_subject

    def stop_at_the_second_subject(plan, *args):
        if plan.subject_id == "sub-002":
            raise KeyboardInterrupt
        return written(plan, *args)

    def stopped(options):
        monkeypatch.setattr(cohort_module, "make_subject", stop_at_the_second_subject)
        with pytest.raises(KeyboardInterrupt):
            make_cohort(tmp_path, options, progress=False)
        monkeypatch.undo()

    first, second = SynthOptions(subjects=2, visits=1, workers=1), SynthOptions(subjects=2, visits=1, seed=1, workers=1)
    stopped(first)
    assert (tmp_path / "sub-001").is_dir() and len(make_cohort(tmp_path, first, progress=False)) == 2
    assert _cohort_options(tmp_path) == json.loads((tmp_path / "synth.json").read_text())["options"]
    stopped(second)
    assert (tmp_path / "manifest.csv").is_file() and _cohort_options(tmp_path) is None


def test_raw_scans_are_the_clean_brains_in_a_head_and_a_scanner_pose(raw_cohort, tmp_path):
    """--raw adds raw/ and changes nothing else; each raw scan holds its clean scan's brain (the true mask's
    volume is the labelled brain's) in a pose away from MNI space, with bright scalp outside the brain."""
    make_cohort(tmp_path, SynthOptions(subjects=1, visits=2, seed=5, workers=1), progress=False)
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    for path in manifest["path"]:
        assert (tmp_path / path).read_bytes() == (raw_cohort / path).read_bytes()
    assert not (tmp_path / "raw").exists()
    raw = read_manifest(raw_cohort / "raw" / "manifest.csv")
    assert len(discover_bids(raw_cohort / "raw")) == len(raw) == len(manifest)
    poses = pd.read_csv(raw_cohort / "raw" / "poses.csv")
    for scan, clean, pose in zip(raw.itertuples(), manifest["path"], poses["pose"]):
        image = nib.load(scan.path)
        mask = nib.load(scan.path.replace("_T1w", "_desc-brain_mask"))
        labels = nib.load(raw_cohort / clean.replace("_T1w", "_dseg"))
        raw_ml = np.asarray(mask.dataobj).sum() * abs(np.linalg.det(mask.affine[:3, :3])) / 1000
        clean_ml = (np.asarray(labels.dataobj) > 0).sum() * abs(np.linalg.det(labels.affine[:3, :3])) / 1000
        assert raw_ml == pytest.approx(clean_ml, rel=0.02)
        assert np.allclose(image.affine, mask.affine) and not np.allclose(image.affine, labels.affine)
        rotation = np.array(pose.split(), dtype=float).reshape(3, 4)[:, :3]
        assert np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-4) and not np.allclose(rotation, np.eye(3))
        data = np.asarray(image.dataobj, dtype=np.float32)
        outside = ndimage.binary_dilation(np.asarray(mask.dataobj) > 0, iterations=6) & ~ndimage.binary_dilation(
            np.asarray(mask.dataobj) > 0, iterations=3)
        assert data[outside].max() > 0.8 * np.percentile(data[np.asarray(mask.dataobj) > 0], 99)  # scalp fat
