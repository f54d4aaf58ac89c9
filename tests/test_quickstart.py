"""The README's quickstart, raw BIDS T1w scans to a prediction, run verbatim on a tiny raw synthetic cohort.

The commands are read from README.md between `<!-- quickstart -->` and `<!-- /quickstart -->` and given to the
`neuroar` command as they stand. Two things make them cheap: the run's settings are the test suite's tiny ones
(appended to `neuroar preprocess`, whose config.yaml every later command reads), and deepbet's networks are
replaced by the cohort's true brain masks (tests/test_raw.py measures deepbet itself). N4 and the ANTs
registration run as a user's scans would have them, on the raw synthetic scans resampled to 4 mm.
"""

import re
import shlex
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from nibabel.processing import resample_to_output

from conftest import TINY
from neuroar.cli import main
from neuroar.data import raw

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
# The test suite's tiny run at 8 mm (16^3 voxels, scales 1^3, 2^3, 4^3), one training step each.
RUN_SETTINGS = [*TINY, "data.spacing=8", "data.shape=[16,16,16]", "tokenizer.scales=[[1,1,1],[2,2,2],[4,4,4]]",
                "train_tokenizer.steps=1", "train_transformer.steps=1", "sampling.samples=1"]
SUBJECTS = 3  # with the tiny config's 75/25/0 split: two training subjects and one held out


def quickstart_commands(readme: str) -> list[list[str]]:
    """The command lines of the README's quickstart block, continuation lines joined, comments dropped."""
    block = readme.split("<!-- quickstart -->", 1)[1].split("<!-- /quickstart -->", 1)[0]
    code = re.search(r"```[a-z]*\n(.*?)```", block, flags=re.S).group(1)
    return [shlex.split(line, comments=True) for line in code.replace("\\\n", " ").splitlines() if line.strip()]


class TrueMasks:
    """Stands in for deepbet's BrainExtraction: the union of the cohort's true brain masks (on the raw grid)."""

    def __init__(self, mask: nib.Nifti1Image):
        self.mask = mask

    def run(self, img):
        assert img.shape == self.mask.shape and np.allclose(img.affine, self.mask.affine)
        return img, self.mask, None


def raw_bids(raw_cohort: Path, out: Path) -> nib.Nifti1Image:
    """SUBJECTS subjects, each with the raw cohort's two visits at 4 mm as ses-01 and ses-02, two years apart;
    returns the union of the visits' true brain masks on that grid."""
    subject = sorted((raw_cohort / "raw").glob("sub-*/"))[0]
    anat = [subject / "ses-01" / "anat", subject / "ses-02" / "anat"]
    scans = [resample_to_output(nib.load(next(a.glob("*_T1w.nii.gz"))), voxel_sizes=4.0, order=1) for a in anat]
    masks = [resample_to_output(nib.load(next(a.glob("*_desc-brain_mask.nii.gz"))), voxel_sizes=4.0, order=0)
             for a in anat]
    participants = []
    for k in range(1, SUBJECTS + 1):
        subject = f"sub-{k:02d}"
        for visit, scan in enumerate(scans, start=1):
            path = out / subject / f"ses-{visit:02d}" / "anat" / f"{subject}_ses-{visit:02d}_T1w.nii.gz"
            path.parent.mkdir(parents=True)
            nib.save(nib.Nifti1Image(np.asarray(scan.dataobj, dtype=np.float32), scan.affine), path)
        sessions = pd.DataFrame({"session_id": ["ses-01", "ses-02"], "age": [70.0 + k, 72.0 + k]})
        sessions.to_csv(out / subject / f"{subject}_sessions.tsv", sep="\t", index=False)
        participants.append({"participant_id": subject, "sex": "F", "diagnosis": "CN"})
    pd.DataFrame(participants).to_csv(out / "participants.tsv", sep="\t", index=False)
    union = np.any([np.asarray(m.dataobj) > 0 for m in masks], axis=0)
    return nib.Nifti1Image(union.astype(np.uint8), masks[0].affine)


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_readme_quickstart_runs_verbatim(raw_cohort, tmp_path, monkeypatch):
    commands = quickstart_commands(README.read_text())
    by_name = {command[1]: command for command in commands}
    assert all(command[0] == "neuroar" for command in commands)
    assert commands[0][1] == "preprocess" and {"evaluate", "predict"} <= set(by_name)
    preprocess, evaluate, predict = by_name["preprocess"], by_name["evaluate"], by_name["predict"]
    mask = raw_bids(raw_cohort, tmp_path / preprocess[2])
    monkeypatch.setattr(raw, "_deepbet", lambda: TrueMasks(mask))
    monkeypatch.chdir(tmp_path)
    for command in commands:
        settings = RUN_SETTINGS if command is preprocess else []
        assert main(command[1:] + settings) == 0, " ".join(command)

    run = Path(option(preprocess, "--out"))
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["raw"] is True  # the raw path, by name
    assert (run / "qc" / "index.html").is_file()
    summary = (Path(option(evaluate, "--out")) / "summary.md").read_text()
    assert "| copy |" in summary and "| tokenizer-oracle |" in summary

    # Each prediction lies on the raw input's grid, and outside the brain it is the input itself (the head).
    source = nib.load(option(predict, "--input"))
    out = Path(option(predict, "--out"))
    ages = [predict[i + 1] for i, arg in enumerate(predict) if arg == "--target-age"]
    outside = np.asarray(mask.dataobj) == 0
    for age in ages:
        for kind in ("mean", "std", "detail"):
            image = nib.load(next(out.glob(f"*_age-{float(age):g}_{kind}.nii.gz")))
            assert image.shape == source.shape and np.allclose(image.affine, source.affine), (age, kind)
        mean = np.asarray(nib.load(next(out.glob(f"*_age-{float(age):g}_mean.nii.gz"))).dataobj)
        assert np.allclose(mean[outside], np.asarray(source.dataobj)[outside], atol=1e-3)
