import pandas as pd
import torch

from conftest import blob_volume, write_nifti
from neuroar.config import DataConfig
from neuroar.data.pairs import PairDataset, longitudinal_pairs
from neuroar.data.preprocess import preprocess_file


def scans_table(paths=None):
    rows = [("a", "1", 70.0), ("a", "2", 72.0), ("a", "3", 75.5), ("b", "1", 60.0), ("c", "1", 65.0),
            ("c", "2", 65.0)]
    frame = pd.DataFrame(rows, columns=["subject_id", "session_id", "age"])
    frame["path"] = paths or [f"{s}_{v}.nii" for s, v, _ in rows]
    frame["split"] = ["train"] * 3 + ["test"] * 3
    return frame


def test_all_ordered_pairs_of_each_subject():
    pairs = longitudinal_pairs(scans_table())
    assert list(zip(pairs["earlier_session"], pairs["later_session"])) == [("1", "2"), ("1", "3"), ("2", "3")]
    assert (pairs["later_age"] > pairs["earlier_age"]).all()
    assert list(pairs["years"]) == [2.0, 5.5, 3.5]
    assert list(pairs["earlier_path"]) == ["a_1.nii", "a_1.nii", "a_2.nii"]
    assert longitudinal_pairs(scans_table(), split="test").empty  # b has one scan; c's scans share an age


def test_pair_dataset_loads_preprocessed_volumes(tmp_path):
    config = DataConfig(spacing=4.0, shape=(40, 48, 40), cache_dir=str(tmp_path / "cache"))
    paths = [str(preprocess_file(write_nifti(tmp_path / f"{i}.nii.gz", blob_volume(seed=i)), config))
             for i in range(6)]
    dataset = PairDataset(longitudinal_pairs(scans_table(paths)))
    item = dataset[2]
    assert len(dataset) == 3
    assert item["earlier"].shape == item["later"].shape == (1, 40, 48, 40)
    assert item["earlier"].dtype == torch.float32 and float(item["later"].max()) == 1.0
    assert (float(item["earlier_age"]), float(item["later_age"])) == (72.0, 75.5)
