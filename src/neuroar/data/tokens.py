"""Cached token maps: every preprocessed scan of a run encoded once by the trained tokenizer, and every
training scan once more mirrored left-right (the transformer's augmentation: a mirrored brain ages the same
way, and doubles the anatomies it learns from).

One safetensors file per dataset (RUN/tokens/KEY.safetensors: "scale0".."scaleK-1", each (N, d, h, w)
int16, and "mirrored_scale0".. for the M training scans) beside a JSON file listing the scans in order. With
`tokenizer.code: change` a scan has no tokens of its own (a follow-up's tokens code its change from an earlier
scan), so the file holds each scan's continuous latent instead ("latent", (N, C, d, h, w) float32, and
"mirrored_latent"), from which the tokens of any pair follow by quantizing alone (`pair_tokens`). KEY
hashes the tokenizer's weights and the run's scans and split, so re-running after any of them changed writes a
new file and re-running unchanged does nothing. A tokenizer trained on other scans or another split (whose
training subjects may now be test subjects) is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from neuroar import distributed
from neuroar.checkpoint import weights_path
from neuroar.config import Config
from neuroar.data.fingerprint import check_model_fits_run, scan_fingerprint
from neuroar.data.nifti import write_volume
from neuroar.data.pairs import token_pairs
from neuroar.data.preprocess import load_preprocessed, to_input_space
from neuroar.errors import NeuroARError
from neuroar.files import atomic_path, sha256_file, sha256_json, write_json
from neuroar.models.mean_change import fit_mean_change
from neuroar.models.tokenizer import MSVQVAE
from neuroar.progress import Progress
from neuroar.runs import load_tokenizer, tokenizer_checkpoint

SCAN_COLUMNS = ["subject_id", "session_id", "age", "split", "preprocessed"]
# (earlier latents (B, C, d, h, w), years (B,), earlier ages (B,)) -> the latents the follow-ups are coded against
ChangeBase = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def tokenize_run(run_dir: str | Path, config: Config, progress: bool = True) -> Path:
    """Encode every scan of the run (once) and return the token file."""
    run_dir = Path(run_dir)
    scans = pd.read_csv(run_dir / "scans.csv", keep_default_na=False)
    path = token_path(run_dir)
    if path.with_suffix(".json").is_file():
        return path
    check_model_fits_run(tokenizer_checkpoint(run_dir), run_dir,
                         f"Re-train it: `neuroar train-tokenizer --run {run_dir} --retrain`.")
    model = load_tokenizer(run_dir, config).to(distributed.default_device())
    train = scans[scans["split"] == "train"]
    jobs = [(p, False) for p in scans["preprocessed"]] + [(p, True) for p in train["preprocessed"]]
    encoded: dict[str, list[torch.Tensor]] = {}
    for preprocessed, mirrored in Progress(jobs, desc="tokenize", unit="scan", enabled=progress):
        volume_DHW = load_preprocessed(preprocessed)[0]
        if mirrored:
            volume_DHW = volume_DHW[::-1]  # the preprocessed grid is RAS: its first axis runs left to right
        prefix = "mirrored_" if mirrored else ""
        f_1Cdhw = model.latent_scan(volume_DHW)
        if config.tokenizer.code == "change":
            encoded.setdefault(f"{prefix}latent", []).append(f_1Cdhw[0].cpu())
            continue
        for k, idx in enumerate(model.followup_tokens(None, f_1Cdhw)):
            encoded.setdefault(f"{prefix}scale{k}", []).append(idx[0].to(torch.int16).cpu())
    tensors = {name: torch.stack(parts) for name, parts in encoded.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    write_json(path.with_suffix(".json"), {"scans": scans[SCAN_COLUMNS].to_dict("records"),
                                           "mirrored": train[SCAN_COLUMNS].to_dict("records"),
                                           "scales": [list(s) for s in config.tokenizer.scales],
                                           "code": config.tokenizer.code})
    return path


def load_tokens(run_dir: str | Path, mirrored: bool = False) -> tuple[list[torch.Tensor], pd.DataFrame]:
    """Token maps per scale, (N, d, h, w) int64, and the table of the N scans they belong to: the run's scans,
    or with `mirrored` its training scans mirrored left-right. With code "change": [the latents (N, C, d, h, w)]
    instead (see the module's text)."""
    run_dir = Path(run_dir)
    path = token_path(run_dir)
    if not path.with_suffix(".json").is_file():
        check_model_fits_run(tokenizer_checkpoint(run_dir), run_dir,
                         f"Re-train it: `neuroar train-tokenizer --run {run_dir} --retrain`.")
        raise NeuroARError(f"no tokens for the current tokenizer and scans of {run_dir}; run "
                           f"`neuroar tokenize --run {run_dir}`.")
    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    prefix, table = ("mirrored_", meta["mirrored"]) if mirrored else ("", meta["scans"])
    if not table:
        return [], pd.DataFrame(table, columns=SCAN_COLUMNS)
    if meta.get("code", "scan") == "change":
        return [tensors[f"{prefix}latent"]], pd.DataFrame(table)
    return [tensors[f"{prefix}scale{k}"].long() for k in range(len(meta["scales"]))], pd.DataFrame(table)


@torch.no_grad()
def pair_tokens(tokenizer: MSVQVAE, latents_NCdhw: torch.Tensor, earlier_N: torch.Tensor, later_N: torch.Tensor,
                years_N: torch.Tensor | None = None, earlier_age_N: torch.Tensor | None = None,
                change_base: ChangeBase | None = None, chunk: int = 32) -> list[torch.Tensor]:
    """Code "change": the token maps (P, d, h, w) per scale of P follow-ups against their earlier scans, from
    the cached latents (rows `later_N` against rows `earlier_N`), by `followup_tokens` as every other path.
    Given a `change_base` (`NeuroAR.change_base`: the earlier latents advanced by the aging expected over the
    pairs' years, from their earlier ages), against that instead."""
    parts = []
    for i in range(0, len(earlier_N), chunk):
        f_earlier = latents_NCdhw[earlier_N[i:i + chunk]]
        if change_base is not None:
            f_earlier = change_base(f_earlier, years_N[i:i + chunk], earlier_age_N[i:i + chunk])
        parts.append(tokenizer.followup_tokens(f_earlier, latents_NCdhw[later_N[i:i + chunk]]))
    return [torch.cat(maps) for maps in zip(*parts)]


def training_tokens(run_dir: str | Path, mirror: bool) -> tuple[list[torch.Tensor], pd.DataFrame, pd.DataFrame]:
    """What NeuroAR learns from: the run's tokens (code "change": [its latents]) and its training and validation
    pairs (rows as `token_pairs` gives them); with `mirror` the training pairs once more with both scans mirrored,
    whose tokens follow the run's own scans'."""
    tokens, scans = load_tokens(run_dir)
    train_pairs, val_pairs = token_pairs(run_dir, scans, "train"), token_pairs(run_dir, scans, "val")
    if train_pairs.empty:
        raise NeuroARError(f"{run_dir}/pairs.csv has no training pairs; NeuroAR needs subjects with at least two "
                           "scans at different ages in the training split.")
    if mirror:
        mirrored_tokens, mirrored_scans = load_tokens(run_dir, mirrored=True)
        mirrored = token_pairs(run_dir, mirrored_scans, "train")
        mirrored[["earlier_index", "later_index"]] += len(scans)
        tokens = [torch.cat([a, b]) for a, b in zip(tokens, mirrored_tokens)]
        train_pairs = pd.concat([train_pairs, mirrored], ignore_index=True)
    return tokens, train_pairs, val_pairs


def pair_rows(pairs: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pairs' earlier and later rows in the token table, and their years (later age - earlier age)."""
    return (torch.as_tensor(pairs["earlier_index"].to_numpy(copy=True)),
            torch.as_tensor(pairs["later_index"].to_numpy(copy=True)),
            torch.tensor((pairs["later_age"] - pairs["earlier_age"]).to_numpy(), dtype=torch.float32))


def earlier_ages(pairs: pd.DataFrame) -> torch.Tensor:
    """The pairs' earlier ages (P,) float32."""
    return torch.tensor(pairs["earlier_age"].to_numpy(), dtype=torch.float32)


def run_mean_change(run_dir: str | Path, mirror: bool) -> torch.Tensor:
    """The cohort's mean latent change per year (C, d, h, w) over the training pairs NeuroAR learns from
    (`training_tokens`) of a change-coding run."""
    tokens, train_pairs, _ = training_tokens(run_dir, mirror)
    return fit_mean_change(tokens[0], *pair_rows(train_pairs))


def decode_scan(run_dir: str | Path, config: Config, subject_id: str, session_id: str) -> nib.Nifti1Image:
    """A scan's cached tokens decoded by the tokenizer, in the scan's own space and intensity range."""
    tokens, scans = load_tokens(run_dir)
    match = (scans["subject_id"].astype(str) == subject_id) & (scans["session_id"].astype(str) == session_id)
    if not match.any():
        raise NeuroARError(f"no scan of subject {subject_id!r}, session {session_id!r} in {run_dir}/scans.csv.")
    index = int(match.to_numpy().nonzero()[0][0])
    tokenizer = load_tokenizer(run_dir, config)
    if config.tokenizer.code == "change":  # the scan's latent with no change on top (as tokenizer-copy decodes it)
        volume = tokenizer.decode_unchanged(tokens[0][index:index + 1])[0]
    else:
        volume = tokenizer.decode_scan([t[index:index + 1] for t in tokens])[0]
    _, record = load_preprocessed(scans["preprocessed"].iloc[index])
    return to_input_space(volume, record)


def write_decoded_scan(run_dir: str | Path, config: Config, subject_id: str, session_id: str,
                       out: str | Path) -> Path:
    """`decode_scan` written to `out` (NIfTI), never over one of the run's input scans."""
    scans = pd.read_csv(Path(run_dir) / "scans.csv", keep_default_na=False)
    if Path(out).resolve() in {Path(p).resolve() for p in scans["path"]}:
        raise NeuroARError(f"{out} is one of the run's input scans; choose another output path.")
    image = decode_scan(run_dir, config, subject_id, session_id)
    write_volume(out, image.get_fdata(dtype="float32"), image.affine)
    return Path(out)


def token_path(run_dir: str | Path) -> Path:
    """The run's token file for its current tokenizer, scans and split (its stem is the tokens' fingerprint)."""
    run_dir = Path(run_dir)
    checkpoint = tokenizer_checkpoint(run_dir)
    if not checkpoint.with_suffix(".json").is_file():
        raise NeuroARError(f"no trained tokenizer in {run_dir}; run `neuroar train-tokenizer --run {run_dir}`.")
    scans = pd.read_csv(run_dir / "scans.csv", keep_default_na=False)
    # "mirrored": the file also holds the training scans mirrored; "split": which scans those are.
    key = sha256_json({"weights": sha256_file(weights_path(checkpoint)), "scans": list(scans["preprocessed"]),
                       "mirrored": "train", "split": scan_fingerprint(run_dir)["split"]})
    return run_dir / "tokens" / f"{key[:16]}.safetensors"

