"""The LDM and latent StarGAN baselines: training in the autoencoder's latent space, exact resume, and
`predict` through the same interface as NeuroAR."""

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from conftest import ball, make_tiny_run, write_nifti
from neuroar.checkpoint import weights_path
from neuroar.cli import main
from neuroar.config import load_config
from neuroar.errors import NeuroARError
from neuroar.predict import Predictor
from neuroar.runs import model_checkpoint
from neuroar.train.autoencoder import train_autoencoder
from neuroar.train.baselines import train_baseline

AUTOENCODER = ["train_autoencoder.steps=20", "train_autoencoder.lr=0.002", "train_autoencoder.warmup_steps=2"]


def settings(kind: str, steps: int, *extra: str) -> list[str]:
    return [*AUTOENCODER, f"train_{kind}.steps={steps}", f"train_{kind}.lr=0.001", f"train_{kind}.warmup_steps=3",
            *extra]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A tiny run with a briefly trained autoencoder (shared; tests copy it)."""
    run = make_tiny_run(tmp_path_factory.mktemp("encoded"))
    train_autoencoder(run, load_config(run / "config.yaml", AUTOENCODER), progress=False)
    return run


@pytest.fixture
def run_dir(encoded, tmp_path):
    return shutil.copytree(encoded, tmp_path / "run")


def test_ldm_loss_falls_and_the_checkpoint_holds_the_latent_scale(run_dir):
    metrics = train_baseline(run_dir, load_config(run_dir / "config.yaml", settings("ldm", 40)), "ldm",
                             progress=False)
    log = pd.read_csv(run_dir / "ldm_train.csv")
    assert log["mse"].iloc[-8:].mean() < 0.8 * log["mse"].iloc[:8].mean()
    meta = json.loads(model_checkpoint(run_dir, "ldm").with_suffix(".json").read_text())
    assert meta["model"] == "ldm" and meta["latent_scale"] > 0 and len(meta["autoencoder_sha256"]) == 64
    assert {"latent_mse", "copy_latent_mse"} <= set(metrics)


def test_stargan_discriminator_learns_and_generator_starts_as_identity(run_dir):
    from neuroar.data.latents import load_latents
    from neuroar.models.baselines import build_baseline

    config = load_config(run_dir / "config.yaml", settings("stargan", 30))
    train_baseline(run_dir, config, "stargan", progress=False)
    log = pd.read_csv(run_dir / "stargan_train.csv")
    assert log["discriminator"].iloc[-5:].mean() < 0.7 * log["discriminator"].iloc[:5].mean()
    assert {"cycle", "identity", "age_g", "adversarial_g"} <= set(log.columns)
    latents, _, _ = load_latents(run_dir)
    untrained = build_baseline("stargan", config)["model"]
    import torch
    ages = torch.tensor([70.0, 70.0])
    assert torch.equal(untrained(latents[:2], ages, ages + 5), latents[:2])


@pytest.mark.parametrize("kind", ["ldm", "stargan"])
def test_resumed_training_equals_an_uninterrupted_run(run_dir, tmp_path, kind):
    other = shutil.copytree(run_dir, tmp_path / "other")
    every = f"train_{kind}.checkpoint_every=3"
    train_baseline(run_dir, load_config(run_dir / "config.yaml", settings(kind, 6, every)), kind, progress=False)
    train_baseline(other, load_config(other / "config.yaml", settings(kind, 3, every)), kind, progress=False)
    train_baseline(other, load_config(other / "config.yaml", settings(kind, 6, every)), kind, progress=False)
    a = load_file(weights_path(model_checkpoint(run_dir, kind)))
    b = load_file(weights_path(model_checkpoint(other, kind)))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a if not k.startswith("rng."))
    assert list(pd.read_csv(other / f"{kind}_train.csv")["step"]) == list(range(1, 7))


@pytest.mark.parametrize("kind", ["ldm", "stargan"])
def test_predict_writes_follow_ups_in_the_input_space(run_dir, tmp_path, kind):
    train_baseline(run_dir, load_config(run_dir / "config.yaml", settings(kind, 5)), kind, progress=False)
    # another grid than the run's: 3.5 mm, LPS, 36x36x27
    native = write_nifti(tmp_path / "native.nii.gz", np.pad(ball((0, 0, 0), 0), ((2, 2), (2, 2), (0, 0)))[:, :, 2:29],
                         np.diag([-3.5, -3.5, 3.5, 1.0]))
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(run_dir / kind), "--input", str(native), "--age", "70",
                 "--target-age", "72", "--target-age", "76", "--samples", "2", "--out", str(out)]) == 0
    written = nib.load(out / "native_age-76_mean.nii.gz")
    assert written.shape == (36, 36, 27) and np.allclose(written.affine, np.diag([-3.5, -3.5, 3.5, 1.0]))
    predictor = Predictor.from_checkpoint(run_dir / kind)
    first, second = predictor.predict(native, 70, [72, 76], samples=2, seed=1)
    again = predictor.predict(native, 70, [72, 76], samples=2, seed=1)[1]
    assert np.array_equal(second.mean_DHW, again.mean_DHW)  # seeded
    assert not np.array_equal(first.mean_DHW, second.mean_DHW)  # the target age reaches the model
    assert (first.std_DHW > 0).any() == (kind == "ldm")  # the StarGAN generator is deterministic


@pytest.mark.parametrize("kind", ["ldm", "stargan"])
def test_scans_predicted_in_a_batch_equal_each_scans_own_prediction(run_dir, kind):
    from neuroar.data.preprocess import load_preprocessed

    train_baseline(run_dir, load_config(run_dir / "config.yaml", settings(kind, 5)), kind, progress=False)
    predictor = Predictor.from_checkpoint(run_dir / kind)
    scans = pd.read_csv(run_dir / "scans.csv").head(3)
    volumes = [load_preprocessed(path)[0] for path in scans["preprocessed"]]
    ages = [70.0, 72.0, 74.0]
    targets = [[71.0, 73.0], [73.0], [75.0, 77.0, 79.0]]  # as many target ages as a scan's pairs
    seeds = [5, 6, 7]
    batched = predictor.predict_scans(volumes, ages, targets, samples=2, seeds=seeds, batch=3)
    for scan_outputs, volume, age, target, seed in zip(batched, volumes, ages, targets, seeds):
        alone = predictor.predict_preprocessed(volume, age, target, samples=2, seed=seed)
        for got, expected in zip(scan_outputs, alone):
            for got_DHW, expected_DHW in zip(got, expected):
                np.testing.assert_allclose(got_DHW, expected_DHW, atol=1e-5)
    if kind == "ldm":  # each scan draws its own noise: another seed gives another prediction
        other = predictor.predict_preprocessed(volumes[1], ages[1], targets[1], samples=2, seed=seeds[0])
        assert not np.allclose(other[0][0], batched[1][0][0], atol=1e-4)


def test_a_baseline_of_another_autoencoder_is_refused(run_dir):
    train_baseline(run_dir, load_config(run_dir / "config.yaml", settings("stargan", 2)), "stargan", progress=False)
    train_autoencoder(run_dir, load_config(run_dir / "config.yaml", [*AUTOENCODER, "train_autoencoder.steps=22"]),
                      progress=False)
    with pytest.raises(NeuroARError, match="another autoencoder|no longer holds"):
        Predictor.from_checkpoint(run_dir / "stargan")
    with pytest.raises(NeuroARError, match="another autoencoder"):
        train_baseline(run_dir, load_config(run_dir / "config.yaml", settings("stargan", 4)), "stargan",
                       progress=False)


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon", "sample"])
def test_ddim_sampling_with_a_perfect_denoiser_returns_the_clean_latent(prediction, monkeypatch):
    """An oracle that knows the clean latent x0 answers every step exactly; DDIM must then land on x0."""
    import torch

    from neuroar.models.ldm import LatentDiffusion

    config = load_config("demo", [f"ldm.prediction={prediction}", "ldm.ddim_steps=10"])
    model = LatentDiffusion(config.ldm, 2, 8)
    x0 = torch.randn(2, 2, 6, 6, 6, generator=torch.Generator().manual_seed(0)).clamp(-3, 3)
    alphas = model.scheduler.alphas_cumprod

    def oracle(noisy, earlier, t_B, earlier_age, target_age):
        a = alphas[t_B].view(-1, 1, 1, 1, 1)
        noise = (noisy - a.sqrt() * x0) / (1 - a).sqrt()
        return {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction]

    monkeypatch.setattr(model, "denoise", oracle)
    ages = torch.tensor([70.0, 71.0])
    sampled = model.sample(torch.zeros_like(x0), ages, ages + 2)  # any starting noise
    assert torch.allclose(sampled, x0, atol=1e-4)


def test_a_change_ldm_samples_the_earlier_latent_plus_the_change_its_denoiser_knows(monkeypatch):
    """A perfect denoiser of the scaled change (later - earlier) * change_scale: DDIM must land on the later latent."""
    import torch

    from neuroar.models.ldm import LatentDiffusion

    model = LatentDiffusion(load_config("demo", ["ldm.target=change", "ldm.ddim_steps=10"]).ldm, 2, 8)
    model.change_scale.fill_(4.0)
    generator = torch.Generator().manual_seed(0)
    earlier = torch.randn(2, 2, 6, 6, 6, generator=generator)
    later = earlier + 0.1 * torch.randn(2, 2, 6, 6, 6, generator=generator)
    x0 = (later - earlier) * 4.0
    alphas = model.scheduler.alphas_cumprod

    def oracle(noisy, earlier_BCDHW, t_B, earlier_age, target_age):
        a = alphas[t_B].view(-1, 1, 1, 1, 1)
        noise = (noisy - a.sqrt() * x0) / (1 - a).sqrt()
        return a.sqrt() * noise - (1 - a).sqrt() * x0  # the velocity, the default prediction

    monkeypatch.setattr(model, "denoise", oracle)
    ages = torch.tensor([70.0, 71.0])
    assert torch.allclose(model.sample(earlier, ages, ages + 2), later, atol=1e-4)


def test_a_change_ldm_keeps_the_scale_of_its_training_changes_with_its_weights(run_dir):
    """change_scale is 1 / the standard deviation of the training subjects' later - earlier latents, in the
    latent scale (1 / the training scans' latents' standard deviation): computed here with numpy from the
    latent file and the scan table."""
    from safetensors.numpy import load_file as load_numpy

    config = load_config(run_dir / "config.yaml", settings("ldm", 2, "ldm.target=change"))
    train_baseline(run_dir, config, "ldm", progress=False)
    [path] = (run_dir / "latents").glob("*.safetensors")
    latents = load_numpy(str(path))["latents"].astype(np.float64)
    scans = pd.read_csv(run_dir / "scans.csv", dtype={"subject_id": str})
    assert [s["preprocessed"] for s in json.loads(path.with_suffix(".json").read_text())["scans"]] == list(
        scans["preprocessed"])  # the latents' rows are the table's scans
    train = scans[scans["split"] == "train"]
    latents = latents / latents[train.index].std(ddof=1)
    changes = [latents[subject["age"].idxmax()] - latents[subject["age"].idxmin()]
               for _, subject in train.groupby("subject_id")]
    assert len(changes) == 3  # the tiny run's training subjects, two visits each
    expected = 1 / np.std(changes, ddof=1)
    saved = load_file(weights_path(model_checkpoint(run_dir, "ldm")))
    assert saved["model.change_scale"].item() == pytest.approx(expected, rel=1e-5)
    predictor = Predictor.from_checkpoint(run_dir / "ldm")
    assert predictor.model.change_scale.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["autoencoder", "ldm", "stargan"])
def test_a_step_logs_the_mean_over_its_micro_batches(encoded, tmp_path, kind):
    """Two steps of two micro-batches of one scan (or pair) each log what two steps on both at once log: their
    batch means (the StarGAN's cycle and identity losses are 0 at the first step, its generator being identity)."""
    logged = []
    for accumulation in (1, 2):
        run = shutil.copytree(encoded, tmp_path / f"accumulation{accumulation}")
        overrides = [f"train_{kind}.steps=2", f"train_{kind}.batch_size=2", f"train_{kind}.accumulation={accumulation}"]
        if kind == "autoencoder":
            shutil.rmtree(run / "autoencoder")
            train_autoencoder(run, load_config(run / "config.yaml", [*AUTOENCODER, *overrides]), progress=False)
        else:
            train_baseline(run, load_config(run / "config.yaml", settings(kind, 2, *overrides)), kind, progress=False)
        logged.append(pd.read_csv(run / f"{kind}_train.csv"))
    assert len(logged[0]) == 2
    pd.testing.assert_frame_equal(logged[1], logged[0], rtol=1e-5)
