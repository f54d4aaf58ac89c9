import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.datasets import load_mni152_template

from conftest import blob_volume, write_nifti
from neuroar.config import DataConfig
from neuroar.data import preprocess
from neuroar.data.nifti import read_volume
from neuroar.data.preprocess import (
    PREPROCESS_VERSION,
    cache_key,
    denoise,
    load_preprocessed,
    noise_sigma,
    preprocess_image,
    preprocess_scans,
    to_input_space,
    with_change_in_input_space,
)
from neuroar.errors import ConfigError, ImageError
from neuroar.files import sha256_file, sha256_json

SMALL = DataConfig(spacing=4.0, shape=(40, 48, 40))


@pytest.mark.parametrize("name", ["anatomical.nii", "reoriented_anat_moved.nii", "standard.nii.gz"])
def test_third_party_files_preprocess_to_shape_range_and_ras(nibabel_data, name):
    volume, record = preprocess_image(read_volume(nibabel_data / name), DataConfig())
    assert volume.shape == (80, 96, 88) and volume.dtype == np.float32
    assert volume.min() == 0.0 and volume.max() == 1.0
    assert nib.aff2axcodes(record.affine) == ("R", "A", "S")
    assert np.allclose(np.abs(np.diag(record.affine)[:3]), 2.0)


def test_mni_template_at_paper_and_demo_shapes():
    template = load_mni152_template(resolution=1)
    for config in (DataConfig(spacing=1.0, shape=(160, 192, 176)), DataConfig()):
        volume, record = preprocess_image(template, config)
        assert volume.shape == config.shape
        centre = np.array(config.shape) // 2
        assert volume[tuple(centre)] > 0.3  # brain in the middle of the crop
        assert volume[0, 0, 0] == 0.0  # air at the corner
        assert np.allclose(np.diag(record.affine)[:3], config.spacing)


def test_non_ras_input_lands_in_ras_with_the_marker_at_its_world_position(tmp_path):
    shape = (30, 36, 26)
    data = blob_volume(shape) * 0.5
    marker = (6, 25, 17)
    data[marker] = 1000.0
    # Voxel axes run left (-x), inferior (-z) and anterior (+y): an "LIA" image with 1.5 mm voxels, shifted.
    affine = np.array([[-1.5, 0, 0, 20.0], [0, 0, 1.5, -30.0], [0, -1.5, 0, 25.0], [0, 0, 0, 1]])
    assert nib.aff2axcodes(affine) == ("L", "I", "A")
    img = read_volume(write_nifti(tmp_path / "lia.nii.gz", data, affine))
    volume, record = preprocess_image(img, DataConfig(spacing=1.5, shape=(40, 40, 40), intensity_percentiles=(0, 100)))
    assert nib.aff2axcodes(record.affine) == ("R", "A", "S")
    found = np.unravel_index(np.argmax(volume), volume.shape)
    world_in = affine @ np.array([*marker, 1.0])
    world_out = record.affine @ np.array([*found, 1.0])
    assert np.allclose(world_in[:3], world_out[:3], atol=1e-3)


def test_back_to_input_space_restores_grid_and_intensities(nibabel_data):
    img = read_volume(nibabel_data / "anatomical.nii")
    original = img.get_fdata()
    # Without clipping, same spacing: the round trip is exact.
    volume, record = preprocess_image(img, DataConfig(spacing=2.0, shape=(48, 48, 48), intensity_percentiles=(0, 100)))
    back = to_input_space(volume, record)
    assert back.shape == img.shape and np.allclose(back.affine, img.affine)
    assert np.allclose(back.get_fdata(), original, rtol=1e-4, atol=1e-3 * original.max())
    # With the default robust range only the clipped brightest voxels differ.
    volume, record = preprocess_image(img, DataConfig(spacing=2.0, shape=(48, 48, 48)))
    back = to_input_space(volume, record).get_fdata()
    low, high = record.intensity_range
    kept = (original >= low) & (original <= high)
    assert np.allclose(back[kept], original[kept], rtol=1e-4, atol=1e-3 * high)
    # Resampled to 1 mm and back, the volume stays close to the input.
    volume, record = preprocess_image(img, DataConfig(spacing=1.0, shape=(96, 96, 96), intensity_percentiles=(0, 100)))
    head = original > np.percentile(original, 50)
    assert np.corrcoef(to_input_space(volume, record).get_fdata()[head], original[head])[0, 1] > 0.95


def test_a_change_goes_back_onto_the_input_at_the_inputs_own_resolution(nibabel_data):
    """The "+detail" output in the input's space: the input itself plus the change resampled onto it, not the
    model's coarser grid resampled back (which would blur the input's anatomy)."""
    img = read_volume(nibabel_data / "anatomical.nii")
    original = img.get_fdata(dtype=np.float32)
    volume, record = preprocess_image(img, DataConfig(spacing=4.0, shape=(24, 24, 24)))
    low, high = record.intensity_range
    unchanged = with_change_in_input_space(np.zeros_like(volume), record, original)
    assert unchanged.shape == img.shape and np.allclose(unchanged.affine, img.affine)
    assert np.array_equal(unchanged.get_fdata(dtype=np.float32), original)  # no change: the input, voxel for voxel
    assert not np.allclose(to_input_space(volume, record).get_fdata(), original, atol=0.05 * high)  # the 4 mm way
    # A change of +0.1 (of the preprocessed range) in a block of the grid: the input plus 0.1 x its range there,
    # within the input's own intensity range; nothing moves far from the block.
    change = np.zeros_like(volume)
    change[8:16, 8:16, 8:16] = 0.1
    changed = with_change_in_input_space(change, record, original).get_fdata(dtype=np.float32)
    centre = tuple(np.round(np.linalg.solve(img.affine, record.affine @ [12, 12, 12, 1])[:3]).astype(int))
    expected = min(original[centre] + 0.1 * (high - low), original.max())
    assert changed[centre] == pytest.approx(expected, rel=1e-4)
    assert changed.min() >= original.min() and changed.max() <= original.max()
    outside = tuple(np.round(np.linalg.solve(img.affine, record.affine @ [4, 4, 4, 1])[:3]).astype(int))
    assert changed[outside] == original[outside]


def test_robust_range_ignores_a_few_bright_voxels(tmp_path):
    data = blob_volume()
    data[12, 14, 10] = 1e6
    volume, record = preprocess_image(read_volume(write_nifti(tmp_path / "a.nii.gz", data)), SMALL)
    assert record.intensity_range[1] < 200
    assert np.median(volume[volume > 0]) > 0.5


def test_cache_is_reused_and_keyed_by_content_and_settings(tmp_path, monkeypatch):
    paths = [write_nifti(tmp_path / f"s{i}.nii.gz", blob_volume(seed=i)) for i in range(2)]
    scans = pd.DataFrame({"subject_id": ["a", "b"], "session_id": ["1", "1"], "path": [str(p) for p in paths]})
    config = DataConfig(spacing=4.0, shape=(40, 48, 40), cache_dir=str(tmp_path / "cache"))
    first = preprocess_scans(scans, config, progress=False)
    assert first["preprocessed"].nunique() == 2
    volume, record = load_preprocessed(first["preprocessed"].iloc[0])
    assert volume.shape == (40, 48, 40) and record.source_shape == (24, 28, 20)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached volume")

    monkeypatch.setattr(preprocess, "preprocess_image", fail)
    again = preprocess_scans(scans, config, progress=False)
    assert list(again["preprocessed"]) == list(first["preprocessed"])
    monkeypatch.undo()
    other = preprocess_scans(scans, DataConfig(spacing=2.0, shape=(40, 48, 40), cache_dir=config.cache_dir),
                             progress=False)
    assert set(other["preprocessed"]).isdisjoint(first["preprocessed"])


def test_scans_preprocessed_in_parallel_equal_one_by_one_in_the_manifests_order(tmp_path):
    paths = [write_nifti(tmp_path / f"s{i}.nii.gz", blob_volume(seed=i)) for i in range(4)]
    scans = pd.DataFrame({"subject_id": list("abcd"), "session_id": ["1"] * 4, "path": [str(p) for p in paths]})
    one = preprocess_scans(scans, dataclasses.replace(SMALL, cache_dir=str(tmp_path / "one")), False, workers=1)
    two = preprocess_scans(scans, dataclasses.replace(SMALL, cache_dir=str(tmp_path / "two")), False, workers=2)
    for serial, parallel in zip(one["preprocessed"], two["preprocessed"]):
        assert Path(serial).name == Path(parallel).name  # the same scan's cache key, row by row
        assert np.array_equal(load_preprocessed(serial)[0], load_preprocessed(parallel)[0])
    bad = blob_volume()
    bad[0, 0, 0] = np.nan
    with_bad = pd.concat([scans, pd.DataFrame({"subject_id": ["e"], "session_id": ["9"],
                                               "path": [str(write_nifti(tmp_path / "nan.nii.gz", bad))]})])
    with pytest.raises(ImageError, match=r"1 scan\(s\).*\n  subject e session 9: .*NaN"):
        preprocess_scans(with_bad, dataclasses.replace(SMALL, cache_dir=str(tmp_path / "three")), False, workers=2)


def test_denoising_removes_noise_keeps_edges_and_is_repeatable():
    rng = np.random.default_rng(0)
    clean = np.zeros((24, 28, 24), np.float32)
    clean[4:20, 4:24, 4:20] = 0.4  # "grey matter" around a brighter core, inside a dark background
    clean[8:16, 9:19, 8:16] = 0.8
    noisy = np.clip(clean + rng.normal(0, 0.05, clean.shape), 0, 1).astype(np.float32)
    inside = clean > 0
    assert 0.035 < noise_sigma(noisy) < 0.065  # the level it was given, from the volume alone
    denoised = denoise(noisy)
    assert np.abs(denoised - clean)[inside].mean() < 0.5 * np.abs(noisy - clean)[inside].mean()
    edge = denoised[12, 14, 17] - denoised[12, 14, 15]  # one voxel across the core's boundary each side
    assert edge < -0.3  # the step of 0.4 stays a step, not a ramp
    assert np.array_equal(denoised, denoise(noisy))  # the same scan, the same tokens
    assert np.array_equal(denoise(clean), clean)  # nothing to remove: nothing changes


def test_denoising_has_its_own_cache_key_and_leaves_the_others_as_they_were(tmp_path):
    path = write_nifti(tmp_path / "a.nii.gz", blob_volume())
    plain = cache_key(path, SMALL)
    assert cache_key(path, dataclasses.replace(SMALL, denoise=True)) != plain
    # A run preprocessed before the setting existed keeps its cache (and so its models' data fingerprint).
    settings = {k: v for k, v in dataclasses.asdict(SMALL).items()
                if k not in ("cache_dir", "split_fractions", "denoise")}
    assert plain == sha256_json({"file": sha256_file(path), "settings": settings, "version": PREPROCESS_VERSION})


def test_failed_scans_are_reported_with_their_rows(tmp_path):
    data = blob_volume()
    data[0, 0, 0] = np.nan
    path = write_nifti(tmp_path / "nan.nii.gz", data)
    scans = pd.DataFrame({"subject_id": ["a"], "session_id": ["2"], "path": [str(path)]})
    with pytest.raises(ImageError, match="subject a session 2: .*NaN"):
        preprocess_scans(scans, DataConfig(cache_dir=str(tmp_path / "cache")), progress=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.nii"))


def test_registration_recovers_a_known_transform_and_maps_back():
    pytest.importorskip("ants")
    template = load_mni152_template(resolution=2)
    angle = np.deg2rad(8)
    moved = np.eye(4)
    moved[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    moved[:3, 3] = [12.0, -7.0, 5.0]
    # The same voxels with a header moved by a known rigid transform: MNI world p is input world moved @ p.
    img = nib.Nifti1Image(template.get_fdata(dtype=np.float32), moved @ template.affine)
    from neuroar.data.registration import mni_to_input_affine

    assert np.allclose(mni_to_input_affine(img), moved, atol=0.05)
    volume, record = preprocess_image(img, DataConfig(register=True))
    reference, _ = preprocess_image(template, DataConfig())
    assert np.corrcoef(volume.ravel(), reference.ravel())[0, 1] > 0.98
    back = to_input_space(volume, record)
    assert back.shape == img.shape and np.allclose(back.affine, img.affine)
    assert np.corrcoef(back.get_fdata().ravel(), img.get_fdata().ravel())[0, 1] > 0.98


def test_registration_without_ants_says_how_to_install(monkeypatch, nibabel_data):
    monkeypatch.setitem(__import__("sys").modules, "ants", None)
    with pytest.raises(ConfigError, match=r"neuroar\[register\]"):
        preprocess_image(read_volume(nibabel_data / "anatomical.nii"), DataConfig(register=True))


@pytest.mark.parametrize("missing", ["ants", "deepbet"])
def test_raw_scans_without_their_packages_say_how_to_install(monkeypatch, nibabel_data, missing):
    from neuroar.data import raw

    raw._deepbet.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, missing, None)
    with pytest.raises(ConfigError, match=r"neuroar\[raw\]"):
        preprocess_image(read_volume(nibabel_data / "anatomical.nii"), DataConfig(raw=True))
    raw._deepbet.cache_clear()
