"""`tokenizer.code: change`: a follow-up's tokens code its change from the earlier scan's continuous latent. The
same scan pair gives the same tokens on every path (training, cache, evaluation, prediction), a pair with no
change gives the tokens of no change and the earlier scan back, and NeuroAR trains and predicts on these tokens
with its finest scale through the convolutional head."""

import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ball, make_tokenized_run
from neuroar.config import load_config
from neuroar.data.pairs import token_pairs
from neuroar.data.preprocess import load_preprocessed
from neuroar.data.tokens import load_tokens, pair_rows, pair_tokens, training_tokens
from neuroar.errors import NeuroARError
from neuroar.evaluate.forecasters import ChangeBase, TokenizerCopy, TokenizerOracle, load_forecasters
from neuroar.models.change_regressor import ChangeRegressor
from neuroar.models.mean_change import advance, fit_mean_change
from neuroar.models.quantizer import MultiScaleQuantizer
from neuroar.models.tokenizer import MSVQVAE
from neuroar.predict import Predictor, with_change
from neuroar.runs import load_tokenizer
from neuroar.train.tokenizer import change_l1, item_batch, train_tokenizer, training_items
from neuroar.train.transformer import train_transformer

CHANGE = ["tokenizer.code=change", "transformer.earlier=latent", "transformer.local_scales=1"]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """A tiny run with a briefly trained change-coding tokenizer and its cached latents (shared; tests copy)."""
    return make_tokenized_run(tmp_path_factory.mktemp("change"), tuple(CHANGE))


@pytest.fixture
def run_dir(tokenized, tmp_path):
    return shutil.copytree(tokenized, tmp_path / "run")


def test_the_tokenizer_trains_on_the_training_pairs_earlier_scans_first(tokenized):
    train, val = training_items(tokenized, "change")
    pairs = pd.read_csv(tokenized / "pairs.csv", keep_default_na=False)
    assert train == list(pairs.loc[pairs["split"] == "train", ["earlier_path", "later_path"]].itertuples(False, None))
    assert len(val) == (pairs["split"] == "val").sum() and all(len(item) == 2 for item in train + val)
    x = item_batch(train, [0, 1])
    assert x.shape[0] == 4
    assert torch.equal(x[1, 0], torch.from_numpy(load_preprocessed(train[1][0])[0]))  # earlier scans first
    assert torch.equal(x[2, 0], torch.from_numpy(load_preprocessed(train[0][1])[0]))  # then their follow-ups
    log = pd.read_csv(tokenized / "tokenizer_train.csv")
    assert log["l1"].iloc[-3:].mean() < log["l1"].iloc[:3].mean()


def test_the_change_loss_counts_only_what_the_decoded_change_gets_wrong(tokenized, tmp_path):
    x = torch.rand(4, 1, 8, 8, 8)  # two pairs: earlier scans, then their follow-ups
    weights = torch.ones(1, 1, 8, 8, 8)
    assert change_l1(x + 0.3, x, weights) == pytest.approx(0, abs=1e-6)  # both off alike: the change is right
    flipped = torch.cat([x[2:], x[:2]])  # each pair's change reversed
    assert change_l1(flipped, x, weights) == pytest.approx(2 * (x[2:] - x[:2]).abs().mean().item(), rel=1e-6)
    # Training logs it beside the reconstruction's L1; weighted, it falls faster than the reconstruction alone
    # brings it down (the same start, batches and steps).
    final = {}
    for weight in (0, 20):
        run = shutil.copytree(tokenized, tmp_path / f"weight{weight}")
        shutil.rmtree(run / "tokenizer")
        train_tokenizer(run, load_config(run / "config.yaml", [f"train_tokenizer.change_weight={weight}"]),
                        progress=False)
        final[weight] = pd.read_csv(run / "tokenizer_train.csv")["change_l1"].iloc[-3:].mean()
    assert final[20] < 0.95 * final[0], final  # (without the loss the two runs are the same run)


def test_the_earlier_half_is_decoded_from_its_continuous_latent_the_later_from_the_change():
    config = load_config("demo", ["data.shape=[32,32,32]", "tokenizer.scales=[[1,1,1],[4,4,4],[16,16,16]]",
                                  "tokenizer.dead_zone=0", *CHANGE[:2]])  # untrained, a dead zone codes no change
    torch.manual_seed(0)
    model = MSVQVAE(config.tokenizer).eval()
    earlier, later, other = (torch.rand(1, 1, 32, 32, 32) for _ in range(3))
    with torch.no_grad():
        one, _, _ = model(torch.cat([earlier, later]))
        two, _, _ = model(torch.cat([earlier, other]))
        assert torch.equal(one[0], two[0])
        assert torch.allclose(one[0], model.decode(model.features(earlier))[0], atol=1e-4)  # batch of 2 vs 1
        assert not torch.allclose(one[1], two[1])
    # What a follow-up decodes to depends on its earlier scan, and no change has the same tokens for any scan.
    f_earlier, f_later, f_other = (model.latent_scan(v) for v in (earlier, later, other))
    tokens = model.followup_tokens(f_earlier, f_later)
    assert not np.array_equal(model.decode_followup(f_earlier, tokens), model.decode_followup(f_other, tokens))
    # No change is the zero code at every scale, and decodes to the earlier scan's own latent.
    # `unchanged_tokens` and `decode_unchanged` say so without running the quantizer: the same, to the bit.
    unchanged = model.unchanged_tokens(f_earlier)
    for coded, given in zip(model.followup_tokens(f_later, f_later), unchanged):
        assert not coded.any() and coded.dtype == given.dtype and torch.equal(coded, given)
    assert np.array_equal(model.decode_followup(f_earlier, model.followup_tokens(f_earlier, f_earlier)),
                          model.decode_unchanged(f_earlier))


def test_the_zero_code_stays_zero_and_the_dead_zone_leaves_small_changes_out():
    torch.manual_seed(0)
    scales = ((1, 1, 1), (2, 2, 2), (4, 4, 4))
    plain = MultiScaleQuantizer(32, 8, scales, zero_code=True)
    sparse = MultiScaleQuantizer(32, 8, scales, zero_code=True, dead_zone=1.0)
    change = torch.zeros(16, 8, 4, 4, 4)
    kinds = 3.0 * torch.randn(4, 8)
    change[:, :, 1:3, 1:3, 1:3] = kinds[torch.arange(16) % 4][:, :, None, None, None]  # strong local changes
    change += 0.3 * torch.randn_like(change)  # and weak noise everywhere
    for quantizer in (plain, sparse):
        optimizer = torch.optim.Adam(quantizer.parameters(), lr=0.01)
        for _ in range(20):
            _, _, loss, _ = quantizer.train()(change)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        quantizer.eval()
        assert not quantizer.codes[0].any() and quantizer.codes[1:].abs().sum() > 0
    inside = torch.zeros(4, 4, 4, dtype=torch.bool)
    inside[1:3, 1:3, 1:3] = True
    zeros, kept, noise = {}, {}, {}
    for name, quantizer in (("plain", plain), ("sparse", sparse)):
        tokens = quantizer.encode(change)
        f_hat = quantizer.tokens_to_fhat(tokens).detach()
        zeros[name] = torch.cat([(t == 0).float().flatten() for t in tokens]).mean()
        kept[name] = 1 - (f_hat - change)[..., inside].square().mean() / change[..., inside].square().mean()
        noise[name] = f_hat[..., ~inside].square().mean()
    # Measured: 89 % / 11 % zero tokens, noise energy outside the change 0.042 / 0.079, change kept 75 % / 95 %.
    assert zeros["sparse"] > 0.5 > zeros["plain"]  # most tokens say "nothing changed"
    assert noise["sparse"] < 0.6 * noise["plain"]  # the noise is left out
    assert kept["sparse"] > 0.6  # most of the change is kept


def test_the_cache_and_every_path_give_a_pair_the_same_tokens_and_no_change_the_earlier_scan(tokenized):
    config = load_config(tokenized / "config.yaml")
    tokenizer = load_tokenizer(tokenized, config)
    latents, scans = load_tokens(tokenized)
    pairs = token_pairs(tokenized, scans, "train")
    volumes = [load_preprocessed(path)[0] for path in scans["preprocessed"]]
    assert torch.equal(latents[0][3], tokenizer.latent_scan(volumes[3])[0])
    earlier, later = (torch.as_tensor(pairs[c].to_numpy(copy=True)) for c in ("earlier_index", "later_index"))
    cached = pair_tokens(tokenizer, latents[0], earlier, later)
    direct = tokenizer.followup_tokens(tokenizer.latent_scan(volumes[int(earlier[0])]),
                                       tokenizer.latent_scan(volumes[int(later[0])]))
    assert all(torch.equal(c[:1], d) for c, d in zip(cached, direct))
    # The oracle of a scan paired with itself adds nothing; of a true pair it adds the decoded change.
    oracle = TokenizerOracle(TokenizerCopy(tokenized, config))
    first, second = volumes[int(earlier[0])], volumes[int(later[0])]
    (same,) = next(iter(oracle.predict(first, 70.0, [71.0], 0, later_DHWs=[first]).values()))
    assert np.allclose(same, first, atol=1e-6)
    (changed,) = next(iter(oracle.predict(first, 70.0, [71.0], 0, later_DHWs=[second]).values()))
    assert not np.allclose(changed, first, atol=1e-3)


def test_neuroar_trains_on_change_tokens_and_predicts_the_earlier_scan_when_it_predicts_no_change(run_dir):
    config = load_config(run_dir / "config.yaml", ["train_transformer.steps=20", "train_transformer.lr=0.003"])
    metrics = train_transformer(run_dir, config, progress=False)
    log = pd.read_csv(run_dir / "neuroar_train.csv")
    assert log["loss"].iloc[-4:].mean() < log["loss"].iloc[:4].mean()
    # Copy here is "no change": the share of each validation pair's tokens equal to the tokens of no change.
    tokenizer = load_tokenizer(run_dir, config)
    latents, scans = load_tokens(run_dir)
    pairs = token_pairs(run_dir, scans, "val")
    tokens = pair_tokens(tokenizer, latents[0], torch.as_tensor(pairs["earlier_index"].to_numpy(copy=True)),
                         torch.as_tensor(pairs["later_index"].to_numpy(copy=True)))
    unchanged = tokenizer.unchanged_tokens(latents[0][:1])
    for k, (maps, none) in enumerate(zip(tokens, unchanged)):
        assert metrics[f"scale{k}_copy_accuracy"] == pytest.approx((maps == none).float().mean().item(), abs=1e-6)

    predictor = Predictor.from_checkpoint(run_dir)
    image = nib.Nifti1Image(ball((0, 0, 0), 3), np.diag([4.0, 4.0, 4.0, 1.0]))
    volume_DHW = load_preprocessed(scans["preprocessed"].iloc[0])[0]
    with torch.no_grad():
        predictor.model.copy_logit.fill_(50.0)  # every token "unchanged"
    ((mean, std, detail),) = predictor.predict_preprocessed(volume_DHW, 70.0, [73.0], samples=2)
    # (a batch of two samples rounds its convolutions differently from one scan: 1e-7 here)
    assert np.allclose(mean, TokenizerCopy(run_dir, config).reconstruct(volume_DHW), atol=1e-5) and not std.any()
    assert np.allclose(detail, volume_DHW, atol=1e-5)
    with torch.no_grad():
        predictor.model.copy_logit.fill_(0.0)
    assert predictor.predict(image, 70.0, [74.0], samples=2)[0].mean.shape == image.shape


def test_the_mean_change_is_the_change_per_year_that_every_pair_shares():
    generator = torch.Generator().manual_seed(0)
    rate_Cdhw = torch.randn(2, 3, 4, 3, generator=generator)
    base_Cdhw = torch.randn(2, 3, 4, 3, generator=generator)
    ages = torch.tensor([60.0, 61.5, 64.0, 70.0, 72.5])
    latents_NCdhw = base_Cdhw + (ages - 60.0)[:, None, None, None, None] * rate_Cdhw
    earlier, later = torch.tensor([0, 0, 1, 3, 2]), torch.tensor([1, 2, 2, 4, 2])  # the last: zero years
    fitted = fit_mean_change(latents_NCdhw, earlier, later, ages[later] - ages[earlier], chunk=2)
    assert torch.allclose(fitted, rate_Cdhw, atol=1e-5)
    assert torch.allclose(advance(latents_NCdhw[:2], torch.tensor([1.5, 2.5]), fitted), latents_NCdhw[[1, 2]],
                          atol=1e-5)
    with pytest.raises(NeuroARError, match="zero years"):
        fit_mean_change(latents_NCdhw, earlier[-1:], later[-1:], torch.zeros(1))


def test_with_the_cohorts_mean_change_neuroar_codes_and_predicts_the_deviation_from_it(run_dir):
    config = load_config(run_dir / "config.yaml", ["train_transformer.steps=4", "transformer.mean_change=true"])
    metrics = train_transformer(run_dir, config, progress=False)
    tokenizer = load_tokenizer(run_dir, config)
    latents, train_pairs, val_pairs = training_tokens(run_dir, config.train_transformer.mirror)
    assert len(train_pairs) > len(token_pairs(run_dir, load_tokens(run_dir)[1], "train"))  # mirrored pairs too
    # The mean change per year, by its formula, over every training pair NeuroAR learns from.
    years = (train_pairs["later_age"] - train_pairs["earlier_age"]).to_numpy()
    change = (latents[0][train_pairs["later_index"]] - latents[0][train_pairs["earlier_index"]]).numpy()
    mean_change = np.einsum("p,p...->...", years, change) / (years ** 2).sum()
    g_Cdhw = torch.from_numpy(mean_change).float()
    predictor = Predictor.from_checkpoint(run_dir)
    assert np.allclose(predictor.model.mean_change_Cdhw.numpy(), mean_change, atol=1e-6)
    assert np.abs(mean_change).max() > 1e-3
    # Training coded the validation pairs against the earlier latents advanced by it: "copy" is zero change there.
    earlier, later, years_P = pair_rows(val_pairs)
    advanced = latents[0][earlier] + years_P[:, None, None, None, None] * g_Cdhw
    tokens = tokenizer.followup_tokens(advanced, latents[0][later])
    for k, maps in enumerate(tokens):
        assert metrics[f"scale{k}_copy_accuracy"] == pytest.approx((maps == 0).float().mean().item(), abs=1e-6)
    # Predicting "no change" from there gives the cohort's mean aging, and at the earlier scan's own age nothing.
    volume_DHW = load_preprocessed(load_tokens(run_dir)[1]["preprocessed"].iloc[0])[0]
    with torch.no_grad():
        predictor.model.copy_logit.fill_(50.0)
    ((same, _, _), (aged, _, detail)) = predictor.predict_preprocessed(volume_DHW, 70.0, [70.0, 73.0], samples=1)
    f_earlier = tokenizer.latent_scan(volume_DHW)
    assert np.allclose(same, tokenizer.decode_unchanged(f_earlier)[0], atol=1e-5)
    expected = tokenizer.decode_latent(f_earlier + 3.0 * g_Cdhw)[0]
    assert np.allclose(aged, expected, atol=1e-5) and not np.allclose(aged, same, atol=1e-3)
    assert np.allclose(detail, with_change(volume_DHW, expected, same), atol=1e-5)


def test_the_change_regressor_learns_each_scans_own_rate_that_the_mean_change_cannot():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    f_NCdhw = torch.randn(24, 2, 4, 5, 4, generator=generator)
    ages = torch.linspace(60.0, 80.0, 24)
    # Each subject's change per year: its own latent, more so the older it is; over subjects it averages ~0.
    rate_NCdhw = 0.2 * f_NCdhw * (1 + (ages - 70.0) / 10)[:, None, None, None, None]
    years = torch.rand(24, generator=generator) * 3 + 1
    latents_NCdhw = torch.cat([f_NCdhw, f_NCdhw + years[:, None, None, None, None] * rate_NCdhw])
    earlier, later = torch.arange(24), torch.arange(24, 48)
    mean_Cdhw = fit_mean_change(latents_NCdhw, earlier, later, years)
    regressor = ChangeRegressor(latent_dim=2, width=16)
    assert not regressor(f_NCdhw, ages).any()  # untrained: the mean change alone
    losses = regressor.fit(latents_NCdhw, torch.cat([earlier, earlier[:2]]), torch.cat([later, earlier[:2]]),
                           torch.cat([years, torch.zeros(2)]), torch.cat([ages, ages[:2]]), mean_Cdhw, steps=300,
                           batch_size=8, lr=3e-3, seed=0, progress=False)
    with torch.no_grad():
        predicted_NCdhw = mean_Cdhw + regressor(f_NCdhw, ages)
    mean_error = (mean_Cdhw - rate_NCdhw).square().mean()
    assert (predicted_NCdhw - rate_NCdhw).square().mean() < 0.2 * mean_error
    assert losses["mse"] < 0.2 * losses["mean_change_mse"]
    assert not any(p.requires_grad for p in regressor.parameters())  # fixed: what tokens are coded against


def test_with_a_change_regressor_neuroar_codes_against_each_scans_own_predicted_change(run_dir, monkeypatch):
    overrides = ["train_transformer.steps=2", "transformer.mean_change=true", "transformer.change_width=8",
                 "train_transformer.change_steps=40", "train_transformer.change_lr=0.003"]
    metrics = train_transformer(run_dir, load_config(run_dir / "config.yaml", overrides), progress=False)
    predictor = Predictor.from_checkpoint(run_dir)
    model, tokenizer = predictor.model, predictor.tokenizer
    latents, train_pairs, val_pairs = training_tokens(run_dir, True)
    # The validation pairs were coded against each one's own base: "copy" is zero change from there.
    earlier, later, years_P = pair_rows(val_pairs)
    ages_P = torch.tensor(val_pairs["earlier_age"].to_numpy(), dtype=torch.float32)
    with torch.no_grad():
        deviation = model.change_regressor(latents[0][earlier], ages_P)
        tokens = tokenizer.followup_tokens(latents[0][earlier] + years_P[:, None, None, None, None] * (
            model.mean_change_Cdhw + deviation), latents[0][later])
    assert deviation.abs().max() > 1e-4  # trained: its last layer started at zero
    for k, maps in enumerate(tokens):
        assert metrics[f"scale{k}_copy_accuracy"] == pytest.approx((maps == 0).float().mean().item(), abs=1e-6)
    # Predicting "no change" from there gives the scan's own expected aging.
    volume_DHW = load_preprocessed(load_tokens(run_dir)[1]["preprocessed"].iloc[0])[0]
    with torch.no_grad():
        model.copy_logit.fill_(50.0)
        f_volume = tokenizer.latent_scan(volume_DHW)
        expected = tokenizer.decode_latent(f_volume + 3.0 * (model.mean_change_Cdhw + model.change_regressor(
            f_volume, torch.tensor([70.0]))))[0]
    ((aged, _, _),) = predictor.predict_preprocessed(volume_DHW, 70.0, [73.0], samples=1)
    assert np.allclose(aged, expected, atol=1e-5)
    # The evaluation scores that base alone beside the model's outputs, as the earlier scan plus its decoded change.
    forecasters = load_forecasters([str(run_dir)], run_dir, load_config(run_dir / "config.yaml"))
    (base,) = [f for f in forecasters if isinstance(f, ChangeBase)]
    ((output, (based_DHW,)),) = base.predict(volume_DHW, 70.0, [73.0], seed=0).items()
    assert output.label == f"{run_dir.name}+base"
    unchanged_DHW = tokenizer.decode_unchanged(f_volume)[0]
    assert np.allclose(based_DHW, with_change(volume_DHW, expected, unchanged_DHW), atol=1e-5)
    # Resumed, training keeps the regressor the checkpoint's tokens were coded against: it is not fitted again.
    def refit(*args, **kwargs):
        raise AssertionError("the change regressor was fitted again on resuming")

    monkeypatch.setattr(ChangeRegressor, "fit", refit)
    train_transformer(run_dir, load_config(run_dir / "config.yaml", [*overrides, "train_transformer.steps=3"]),
                      progress=False)
    resumed = Predictor.from_checkpoint(run_dir).model.change_regressor.state_dict()
    assert all(torch.equal(resumed[k], v) for k, v in model.change_regressor.state_dict().items())


@pytest.mark.parametrize("overrides, message", [
    (["tokenizer.code=scan", "tokenizer.dead_zone=0", "train_tokenizer.change_weight=0",
      "transformer.mean_change=false", "transformer.change_width=0"], "transformer.earlier"),
    (["transformer.mean_change=false", "transformer.change_width=8"], "transformer.change_width"),
    (["transformer.earlier=tokens"], "transformer.earlier"),
    (["transformer.local_scales=6"], "transformer.local_scales"),
    (["tokenizer.code=delta"], "tokenizer.code"),
    (["tokenizer.code=scan", "tokenizer.dead_zone=0", "transformer.earlier=tokens", "train_tokenizer.change_weight=0",
      "transformer.mean_change=true"], "transformer.mean_change"),
    (["tokenizer.code=scan", "tokenizer.dead_zone=0", "transformer.earlier=tokens", "train_tokenizer.change_weight=1"],
     "train_tokenizer.change_weight"),
    (["tokenizer.code=scan", "tokenizer.dead_zone=1", "train_tokenizer.change_weight=0", "transformer.earlier=tokens"],
     "tokenizer.dead_zone"),
])
def test_settings_that_do_not_go_together_are_refused(overrides, message):
    with pytest.raises(NeuroARError, match=message):
        load_config("demo", overrides)
