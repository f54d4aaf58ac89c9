import warnings

import numpy as np
import pandas as pd
import pytest

from conftest import blob_volume, write_nifti
from neuroar.data.bids import discover_bids
from neuroar.data.manifest import assign_splits, read_manifest
from neuroar.data.nifti import read_volume
from neuroar.errors import ImageError, ManifestError

HEADER = "subject_id,session_id,age,path"


@pytest.fixture
def scans_dir(tmp_path):
    for sub in ("a", "b"):
        for ses, _age in (("1", 70), ("2", 72.5)):
            write_nifti(tmp_path / "img" / f"{sub}_{ses}.nii.gz", blob_volume())
    return tmp_path


def manifest(folder, *rows, header=HEADER):
    path = folder / "manifest.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_valid_manifest_is_typed_sorted_and_resolved(scans_dir):
    path = manifest(scans_dir, "b,2,72.5,img/b_2.nii.gz", "b,1,70,img/b_1.nii.gz",
                    "a,1, 70 ,img/a_1.nii.gz", "a,2,72.5,img/a_2.nii.gz")
    scans = read_manifest(path)
    assert list(scans["subject_id"]) == ["a", "a", "b", "b"]
    assert scans["age"].dtype == float and list(scans["age"]) == [70, 72.5, 70, 72.5]
    assert scans["path"].iloc[0] == str((scans_dir / "img" / "a_1.nii.gz").resolve())


@pytest.mark.parametrize("rows, message", [
    (["a,1,seventy,img/a_1.nii.gz"], r"line 2: age 'seventy' is not a number"),
    (["a,1,,img/a_1.nii.gz"], r"line 2: age '' is not a number"),
    (["a,1,150,img/a_1.nii.gz"], r"line 2: age 150 is outside 0-120"),
    (["a,1,-3,img/a_1.nii.gz"], r"line 2: age -3 is outside"),
    (["a,1,nan,img/a_1.nii.gz"], r"line 2: age 'nan' is not a number"),
    ([",1,70,img/a_1.nii.gz"], r"line 2: empty subject_id"),
    (["a,1,70,img/a_1.nii.gz", "a,1,71,img/a_2.nii.gz"], r"line 3: subject 'a' session '1' also appears on line 2"),
    (["a,1,70,img/missing.nii.gz"], r"line 2: .*missing.nii.gz: file not found"),
])
def test_row_errors_name_the_line_and_problem(scans_dir, rows, message):
    with pytest.raises(ManifestError, match=message):
        read_manifest(manifest(scans_dir, *rows))


def test_all_problems_are_reported_together(scans_dir):
    with pytest.raises(ManifestError, match="3 problem") as info:
        read_manifest(manifest(scans_dir, "a,1,x,img/a_1.nii.gz", "b,1,200,img/b_1.nii.gz", "c,1,70,img/none.nii"))
    assert "line 2" in str(info.value) and "line 3" in str(info.value) and "line 4" in str(info.value)


def test_columns_are_checked(scans_dir):
    with pytest.raises(ManifestError, match="missing column.*age.*unknown column.*'Age'"):
        read_manifest(manifest(scans_dir, "a,1,70,img/a_1.nii.gz", header="subject_id,session_id,Age,path"))
    with pytest.raises(ManifestError, match="no scans"):
        read_manifest(manifest(scans_dir))
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(scans_dir / "nothing.csv")


def test_split_errors(scans_dir):
    header = HEADER + ",split"
    with pytest.raises(ManifestError, match=r"subject 'a' is in several splits \(test, train\) on lines 2, 3"):
        read_manifest(manifest(scans_dir, "a,1,70,img/a_1.nii.gz,train", "a,2,72,img/a_2.nii.gz,test", header=header))
    with pytest.raises(ManifestError, match="split 'training' is not one of train, val, test"):
        read_manifest(manifest(scans_dir, "a,1,70,img/a_1.nii.gz,training", header=header))
    with pytest.raises(ManifestError, match="line 3: split is empty while other rows have one"):
        read_manifest(manifest(scans_dir, "a,1,70,img/a_1.nii.gz,train", "b,1,70,img/b_1.nii.gz,", header=header))


def test_bad_images_are_named(scans_dir, nibabel_data):
    (scans_dir / "img" / "corrupt.nii.gz").write_bytes(b"not a nifti file at all")
    path = manifest(scans_dir, f"a,1,70,{nibabel_data / 'example4d.nii.gz'}", "b,1,70,img/corrupt.nii.gz")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    text = str(info.value)
    assert "line 2" in text and "shape (128, 96, 24, 2)" in text and "single 3D" in text
    assert "line 3" in text and "cannot be read as NIfTI" in text


def test_single_scan_subjects_are_kept_with_a_warning(scans_dir):
    path = manifest(scans_dir, "a,1,70,img/a_1.nii.gz", "a,2,72,img/a_2.nii.gz", "b,1,70,img/b_1.nii.gz")
    with pytest.warns(UserWarning, match="1 subject.*single scan.*b"):
        scans = read_manifest(path)
    assert len(scans) == 3


def test_nan_voxels_are_refused(tmp_path):
    data = blob_volume()
    data[3, 4, 5] = np.nan
    data[1, 1, 1] = np.inf
    with pytest.raises(ImageError, match="2 voxels are NaN or infinite"):
        read_volume(write_nifti(tmp_path / "nan.nii.gz", data))


def test_four_d_files_are_refused_and_single_volume_4d_accepted(tmp_path, nibabel_data):
    with pytest.raises(ImageError, match="single 3D"):
        read_volume(nibabel_data / "example4d.nii.gz")
    with pytest.raises(ImageError, match="single 3D"):
        read_volume(nibabel_data / "example_nifti2.nii.gz")
    img = read_volume(write_nifti(tmp_path / "one.nii.gz", blob_volume()[..., None]))
    assert img.shape == (24, 28, 20)


def _frame(n_subjects, groups=("CN", "MCI", "AD")):
    rows = [{"subject_id": f"s{i:02d}", "session_id": str(v), "age": 70.0 + v, "path": "",
             "diagnosis": groups[i % len(groups)]} for i in range(n_subjects) for v in range(2)]
    return pd.DataFrame(rows)


def test_splits_are_by_subject_seeded_and_stratified():
    frame = _frame(30)
    split = assign_splits(frame, (0.6, 0.2, 0.2), seed=1)
    per_subject = split.groupby("subject_id")["split"].nunique()
    assert (per_subject == 1).all()
    counts = split.groupby("split")["subject_id"].nunique()
    assert dict(counts) == {"train": 18, "val": 6, "test": 6}
    by_group = split.groupby(["split", "diagnosis"])["subject_id"].nunique().unstack()
    assert (by_group.loc["train"] >= 5).all() and (by_group.loc["test"] >= 1).all()
    assert assign_splits(frame, (0.6, 0.2, 0.2), seed=1).equals(split)
    assert not assign_splits(frame, (0.6, 0.2, 0.2), seed=2)["split"].equals(split["split"])


def test_existing_splits_are_kept():
    frame = _frame(4).assign(split="test")
    assert (assign_splits(frame, seed=0)["split"] == "test").all()


def test_bids_discovery_reads_ages_from_sessions_and_participants(tmp_path):
    for ses in ("ses-01", "ses-02"):
        write_nifti(tmp_path / "sub-01" / ses / "anat" / f"sub-01_{ses}_T1w.nii.gz", blob_volume())
    write_nifti(tmp_path / "sub-02" / "anat" / "sub-02_T1w.nii.gz", blob_volume())
    write_nifti(tmp_path / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz", blob_volume())
    (tmp_path / "participants.tsv").write_text(
        "participant_id\tage\tsex\tgroup\nsub-01\t70\tF\tAD\nsub-02\t64\tM\tCN\n")
    (tmp_path / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-01\t70.5\nses-02\t72.25\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sub-02 has a single scan
        scans = discover_bids(tmp_path)
    assert list(zip(scans["subject_id"], scans["session_id"], scans["age"])) == [
        ("sub-01", "ses-01", 70.5), ("sub-01", "ses-02", 72.25), ("sub-02", "ses-1", 64.0)]
    assert list(scans["diagnosis"]) == ["AD", "AD", "CN"] and list(scans["sex"]) == ["F", "F", "M"]


def test_bids_without_ages_says_where_to_put_them(tmp_path):
    write_nifti(tmp_path / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_T1w.nii.gz", blob_volume())
    with pytest.raises(ManifestError, match="no age for sub-01 ses-01.*sub-01_sessions.tsv"):
        discover_bids(tmp_path)
    with pytest.raises(ManifestError, match="no T1-weighted images"):
        discover_bids(tmp_path / "sub-01" / "ses-01" / "anat")
