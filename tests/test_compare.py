"""The evaluation: each pair's row holds the prediction for that pair's own later scan and age; p-values against
copy; the cohort's own aging region in the headline and the sweep; "no change" relative to the truth; and a real
model's outputs against an independent recomputation."""

import numpy as np
import pandas as pd
import pytest

from conftest import TINY, OneByOne, ball, make_tiny_run, write_nifti
from neuroar.config import load_config
from neuroar.data.preprocess import load_preprocessed, template_brain_mask
from neuroar.errors import NeuroARError
from neuroar.evaluate import compare
from neuroar.evaluate.forecasters import Copy, ModelForecaster, Output, TokenizerCopy, TokenizerOracle
from neuroar.evaluate.volumes import REGIONS, regional_volumes, template_regions
from neuroar.metrics import masked_psnr
from neuroar.pipeline import prepare_dataset


class AgeScaled:
    """A forecaster whose output differs with every target age, so that a prediction paired with another
    pair's age shows."""

    def predict(self, earlier_DHW, earlier_age, target_ages, seed, diagnosis=None, later_DHWs=None):
        return {Output("scaled"): [scaled(earlier_DHW, earlier_age, age) for age in target_ages]}


def scaled(earlier_DHW: np.ndarray, earlier_age: float, target_age: float) -> np.ndarray:
    return earlier_DHW * (1 + 0.05 * (target_age - earlier_age))


def two_subjects_in_the_test_split(tmp_path):
    """A run of two subjects of three visits, all in the test split: each first scan starts two pairs."""
    rows = []
    for i in range(6):
        path = write_nifti(tmp_path / "in" / f"s{i}.nii.gz", ball((i % 3 - 1, i % 2, 0), i), np.diag([4.0] * 3 + [1]))
        rows.append(f"s{i // 3},{i % 3},{[70, 71, 73][i % 3]},{path}")
    (tmp_path / "in" / "manifest.csv").write_text("subject_id,session_id,age,path\n" + "\n".join(rows) + "\n")
    config = load_config("demo", TINY + [f"data.cache_dir={tmp_path / 'cache'}"])
    prepare_dataset(tmp_path / "in" / "manifest.csv", config, tmp_path / "run", progress=False)
    for table in ("pairs", "scans"):
        frame = pd.read_csv(tmp_path / "run" / f"{table}.csv", dtype={"subject_id": str}, keep_default_na=False)
        frame.assign(split="test").to_csv(tmp_path / "run" / f"{table}.csv", index=False)
    return config, pd.read_csv(tmp_path / "run" / "pairs.csv", dtype={"subject_id": str}, keep_default_na=False)


@pytest.mark.parametrize("at_once", [1, 3, 16])  # earlier scans predicted together: 4 in one chunk or several
def test_every_pair_is_scored_against_its_own_later_scan_and_age(tmp_path, monkeypatch, at_once):
    config, pairs = two_subjects_in_the_test_split(tmp_path)
    assert len(pairs) == 6 and pairs["earlier_path"].value_counts().max() == 2
    # A forecaster of its own and a model's, predicted together across a chunk's scans.
    monkeypatch.setattr(compare, "load_forecasters",
                        lambda *args: [Copy(), AgeScaled(), ModelForecaster("model", AgeScaledPredictor())])
    monkeypatch.setattr(compare, "MAX_SCANS_AT_ONCE", at_once)

    compare.evaluate_models([], tmp_path / "out", run_dir=tmp_path / "run", progress=False, sweep_years=())

    per_pair = pd.read_csv(tmp_path / "out" / "pairs.csv", dtype={"subject_id": str})
    brain = template_brain_mask(config.data)
    for name in ("copy", "scaled", "model"):
        mine = per_pair[per_pair["label"] == name].reset_index(drop=True)
        assert (mine["model"] == name).all() and (mine["variant"] == "plain").all()
        columns = ["subject_id", "earlier_age", "later_age"]
        assert mine[columns].equals(pairs[columns])
        for pair, row in zip(pairs.itertuples(), mine.itertuples()):
            earlier, later = load_preprocessed(pair.earlier_path)[0], load_preprocessed(pair.later_path)[0]
            predicted = earlier if name == "copy" else scaled(earlier, pair.earlier_age, pair.later_age)
            assert np.isclose(row.psnr, masked_psnr(predicted, later, brain))


class AgeScaledPredictor(OneByOne):
    """Stands in for a model's `Predictor`: mean, spread and detail output are all the age-scaled scan."""

    def predict_preprocessed(self, earlier_DHW, earlier_age, target_ages, samples, seed, diagnosis=None):
        return [(scaled(earlier_DHW, earlier_age, age),) * 3 for age in target_ages]


def test_the_age_sweep_predicts_the_first_scan_of_the_first_sweep_subjects_only(tmp_path, monkeypatch):
    two_subjects_in_the_test_split(tmp_path)
    monkeypatch.setattr(compare, "load_forecasters", lambda *args: [ModelForecaster("model", AgeScaledPredictor())])

    compare.evaluate_models([], tmp_path / "out", run_dir=tmp_path / "run", progress=False, sweep_years=(1, 3),
                            sweep_subjects=1)

    sweep = pd.read_csv(tmp_path / "out" / "sweep.csv", dtype={"subject_id": str})
    assert set(sweep["subject_id"]) == {"s0"} and set(sweep["age"]) == {70}
    assert sorted(sweep.loc[sweep["label"] == "model", "target_age"]) == [71, 73]
    # The model's variants are data: fields, not a name to parse.
    assert set(zip(sweep["label"], sweep["model"], sweep["variant"])) == {
        ("model", "model", "plain"), ("model+detail", "model", "detail"), ("model+aging", "model", "aging")}


def test_the_headline_and_the_sweep_follow_the_aging_region(tmp_path, monkeypatch):
    """Given: the sweep records that region's volume and summary.md says it was given. Not given: the region that
    `aging_region` picks from the evaluated pairs' truth, with the scores it picked from."""
    config, pairs = two_subjects_in_the_test_split(tmp_path)
    monkeypatch.setattr(compare, "load_forecasters",
                        lambda *args: [Copy(), ModelForecaster("model", AgeScaledPredictor())])
    with pytest.raises(NeuroARError, match="not one of ventricles"):
        compare.evaluate_models([], tmp_path / "out", run_dir=tmp_path / "run", region="cortex")

    compare.evaluate_models([], tmp_path / "given", run_dir=tmp_path / "run", progress=False, sweep_years=(1, 3),
                            sweep_subjects=1, region="grey_matter")

    sweep = pd.read_csv(tmp_path / "given" / "sweep.csv", dtype={"subject_id": str})
    first_DHW = load_preprocessed(pairs["earlier_path"].iloc[0])[0]
    regions = template_regions(config.data)
    assert (sweep["region"] == "grey_matter").all()
    assert sweep["volume_start"].to_numpy() == pytest.approx(regional_volumes(first_DHW, regions)["grey_matter"])
    plain = sweep[sweep["label"] == "model"].sort_values("target_age")
    expected = [regional_volumes(scaled(first_DHW, 70, age), regions)["grey_matter"] for age in (71, 73)]
    assert plain["volume"].to_numpy() == pytest.approx(expected)
    assert (pd.read_csv(tmp_path / "given" / "summary.csv")["region"] == "grey_matter").all()
    text = (tmp_path / "given" / "summary.md").read_text()
    assert "Aging region: grey matter (given)." in text and "| grey matter change r |" in text

    compare.evaluate_models([], tmp_path / "chosen", run_dir=tmp_path / "run", progress=False, sweep_years=(1, 3),
                            sweep_subjects=1)

    per_pair = pd.read_csv(tmp_path / "chosen" / "pairs.csv", dtype={"subject_id": str})
    region = compare.aging_region(per_pair)
    assert (pd.read_csv(tmp_path / "chosen" / "summary.csv")["region"] == region).all()
    assert (pd.read_csv(tmp_path / "chosen" / "sweep.csv")["region"] == region).all()
    assert f"Aging region: {region.replace('_', ' ')}, the region whose mean true change" in (
        tmp_path / "chosen" / "summary.md").read_text()


def pairs_table(true_RP: dict[str, np.ndarray], earlier_R: dict[str, float], outputs: dict[Output, dict]
                ) -> pd.DataFrame:
    """A per-pair table as `score_pairs` writes it: per output its "psnr", "ssim" and "predicted" change per pair
    (one array for every region, or one per region), beside the true changes and earlier volumes per region."""
    pairs = len(next(iter(true_RP.values())))
    rows = []
    for output, values in outputs.items():
        predicted = values["predicted"]
        predicted_RP = predicted if isinstance(predicted, dict) else {r: predicted for r in REGIONS}
        for p in range(pairs):
            rows.append({"label": output.label, "model": output.model, "variant": output.variant, "pair": p,
                         "subject_id": f"s{p // 2}", "earlier_age": 60.0, "later_age": 61.0 + p % 2,
                         "years": 1.0 + p % 2, "psnr": values["psnr"][p], "ssim": values["ssim"][p], "mae": 0.05,
                         **{f"earlier_volume_{r}": earlier_R[r] for r in REGIONS},
                         **{f"true_change_{r}": true_RP[r][p] for r in REGIONS},
                         **{f"predicted_change_{r}": predicted_RP[r][p] for r in REGIONS}})
    return pd.DataFrame(rows)


NO_SWEEP = pd.DataFrame(columns=["label", "subject_id", "target_age", "volume"])


def test_every_p_value_compares_against_copy_on_the_same_pairs():
    """Copy has no p (it is what the others are tested against); a model worse than copy on every pair gets a
    small p against copy, and so does the plain NeuroAR output that the p-values used to be taken against."""
    rng = np.random.default_rng(0)
    true_P = rng.uniform(1, 5, 10)
    copy_psnr, copy_ssim = rng.uniform(24, 26, 10), rng.uniform(0.93, 0.95, 10)
    better, worse = np.linspace(0.5, 1.4, 10), np.linspace(0.1, 1.0, 10)  # no two pairs alike: an exact test
    outputs = {Output("copy"): {"psnr": copy_psnr, "ssim": copy_ssim, "predicted": np.zeros(10)},
               Output("run"): {"psnr": copy_psnr + better, "ssim": copy_ssim + better / 100,
                               "predicted": true_P * 0.9},
               Output("run", "detail"): {"psnr": copy_psnr - worse, "ssim": copy_ssim - worse / 100,
                                         "predicted": -true_P}}
    per_pair = pairs_table({r: true_P for r in REGIONS}, {r: 100.0 for r in REGIONS}, outputs)
    # Pairs are matched by their pair, not by their place in the table.
    per_pair = pd.concat([per_pair[per_pair["label"] != "run+detail"],
                          per_pair[per_pair["label"] == "run+detail"].iloc[::-1]], ignore_index=True)

    summary = compare.summarize(per_pair, NO_SWEEP, "ventricles").set_index("label")

    columns = ["psnr_p_vs_copy", "ssim_p_vs_copy", "ventricles_change_mae_p_vs_copy"]
    assert summary.loc["copy", columns].isna().all()
    every_pair = 2 / 2 ** 10  # the exact two-sided p when all 10 pairs differ in one direction
    for label in ("run", "run+detail"):
        assert summary.loc[label, columns].to_numpy(dtype=float) == pytest.approx([every_pair] * 3), label
    assert (summary.loc["run+detail", ["model", "variant"]] == ["run", "detail"]).all()
    table = compare.summary_markdown(summary.reset_index(), per_pair, "test")
    assert "p vs copy: two-sided paired Wilcoxon signed-rank test against copy" in table
    assert "| PSNR (dB) | p vs copy | SSIM | p vs copy |" in table
    copy_row = next(line for line in table.splitlines() if line.startswith("| copy |")).split(" | ")
    assert [copy_row[i] for i in (2, 4, 8)] == ["–", "–", "–"]


def test_carried_is_each_outputs_mean_change_over_the_true_mean_change():
    rng = np.random.default_rng(2)
    true_P = rng.uniform(1, 5, 10)
    psnr = {"psnr": rng.uniform(24, 26, 10), "ssim": rng.uniform(0.93, 0.95, 10)}
    shuffled = rng.permutation(true_P)  # the same mean, another order: carried alone cannot tell it from the truth
    outputs = {Output("copy"): {**psnr, "predicted": np.zeros(10)},
               Output("tokenizer-oracle"): {**psnr, "predicted": 0.4 * true_P + 0.1},
               Output("run"): {**psnr, "predicted": shuffled}}
    per_pair = pairs_table({r: true_P for r in REGIONS}, {r: 100.0 for r in REGIONS}, outputs)
    summary = compare.summarize(per_pair, NO_SWEEP, "ventricles").set_index("label")
    expected = (0.4 * true_P.mean() + 0.1) / true_P.mean()
    assert summary.loc["tokenizer-oracle", "ventricles_carried"] == pytest.approx(expected)
    assert summary.loc["copy", "ventricles_carried"] == 0
    assert summary.loc["run", "ventricles_carried"] == pytest.approx(1.0)
    assert summary.loc["run", "ventricles_change_r"] < 0.9  # which is why r stands beside it
    table = compare.summary_markdown(summary.reset_index(), per_pair, "test")
    oracle_row = next(line for line in table.splitlines() if line.startswith("| tokenizer-oracle |")).split(" | ")
    assert oracle_row[10] == f"{expected:.0%}"
    no_change = pairs_table({r: np.zeros(10) for r in REGIONS}, {r: 100.0 for r in REGIONS}, outputs)
    assert np.isnan(compare.summarize(no_change, NO_SWEEP, "ventricles")["ventricles_carried"]).all()


# Measured on the code's own synthetic cohorts (16 subjects x 4 visits, seed 0, the demo's 4 mm preprocessing,
# 96 pairs): per region the mean volume in the earlier scans (mL), and the mean and spread over pairs of the true
# change in % of it. In the elderly, grey matter's change is the steadiest (|mean| / std 1.57 against the
# ventricles' 1.29) but the ventricles' the largest; in adolescents white matter's change mirrors grey matter's.
MEASURED = {"elderly": {"ventricles": (34.9, 19.63, 15.20), "grey_matter": (935.6, -8.14, 5.17),
                        "white_matter": (433.1, 2.80, 4.41), "hippocampus": (14.7, -10.35, 9.85),
                        "whole_brain": (1327.7, -3.05, 2.24)},
            "adolescent": {"ventricles": (20.1, 2.10, 3.52), "grey_matter": (1156.0, -4.58, 2.95),
                           "white_matter": (420.8, 10.05, 7.11), "hippocampus": (17.5, -3.48, 2.75),
                           "whole_brain": (1463.9, -0.18, 1.00)}}


def cohort_truth(cohort: str, pairs: int = 40) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """True changes (mL) per region with exactly the measured mean and spread, and the earlier volumes."""
    z = np.random.default_rng(1).standard_normal(pairs)
    z = (z - z.mean()) / z.std(ddof=1)
    true_RP = {r: volume * (mean + std * z) / 100 for r, (volume, mean, std) in MEASURED[cohort].items()}
    return true_RP, {r: volume for r, (volume, _, _) in MEASURED[cohort].items()}


def test_the_aging_region_is_the_ventricles_in_the_elderly_and_grey_matter_in_adolescents():
    chosen, scores = {}, {}
    for cohort in MEASURED:
        true_RP, earlier_R = cohort_truth(cohort)
        per_pair = pairs_table(true_RP, earlier_R, {Output("copy"): {"psnr": np.zeros(40), "ssim": np.zeros(40),
                                                                     "predicted": np.zeros(40)}})
        chosen[cohort], scores[cohort] = compare.aging_region(per_pair), compare.aging_region_scores(per_pair)
    assert chosen == {"elderly": "ventricles", "adolescent": "grey_matter"}
    for cohort in MEASURED:  # in % of the region's volume, as summary.md states them
        assert scores[cohort]["grey_matter"] == pytest.approx(MEASURED[cohort]["grey_matter"][1])


def test_an_adolescent_evaluation_headlines_and_sweeps_grey_matter_and_its_loss(tmp_path):
    """The headline columns are grey matter's, and the sweep counts a subject whose predicted grey matter falls at
    every step as monotonic (grey matter shrinks in adolescents), one whose grey matter grows as not."""
    true_RP, earlier_R = cohort_truth("adolescent", 10)
    zeros = np.zeros(10)
    outputs = {Output("copy"): {"psnr": zeros + 25, "ssim": zeros + 0.9, "predicted": zeros},
               Output("neuroar"): {"psnr": zeros + 24, "ssim": zeros + 0.9, "predicted": true_RP},
               Output("neuroar", "aging"): {"psnr": zeros + 24, "ssim": zeros + 0.9,
                                            "predicted": {r: -true_RP[r] for r in REGIONS}}}
    per_pair = pairs_table(true_RP, earlier_R, outputs)
    region = compare.aging_region(per_pair)
    assert region == "grey_matter"
    sweep = pd.DataFrame([{"label": label, "subject_id": f"s{s}", "target_age": 12 + y,
                           "volume": 1000 + sign * (y + s)} for label, sign in (("neuroar", -1), ("neuroar+aging", 1))
                          for s in range(3) for y in (1, 2, 4)])

    summary = compare.summarize(per_pair, sweep, region)
    compare.write_evaluation(tmp_path / "out", per_pair, sweep.assign(years=sweep["target_age"] - 12,
                                                                      volume_start=1000.0), summary, "test")

    rows = summary.set_index("label")
    assert rows.loc["neuroar", "sweep_monotonic"] == 1 and rows.loc["neuroar+aging", "sweep_monotonic"] == 0
    assert np.isnan(rows.loc["copy", "sweep_monotonic"])
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "| grey matter change r | grey matter change MAE (mL) | p vs copy | grey matter change (mL) |" in text
    assert "predicted grey matter shrinks at every step" in text
    assert "Aging region: grey matter, the region whose mean true change" in text and "white matter is no" in text
    neuroar = next(line for line in text.splitlines() if line.startswith("| neuroar |")).split(" | ")
    assert neuroar[6] == "1.00" and neuroar[7] == "0.00"  # grey matter's r and MAE: the truth itself
    assert {p.name for p in (tmp_path / "out" / "figures").iterdir()} == {"metrics.png", "change.png",
                                                                        "psnr_vs_years.png", "age_sweep.png",
                                                                        "change_all.png"}


def test_the_change_figure_keeps_every_panel_on_the_truths_range_with_copy_and_readable_names():
    """An LDM output 700 mL off widens no panel: every panel has the truth's range across and up to its largest
    magnitude either way up, the outlier sits on the border and its panel counts it; copy has a panel, every
    diagonal is labelled y = x, titles are readable names, a grid of at most four columns, diagnoses coloured."""
    true_P = np.linspace(1.0, 10.0, 8)
    ldm_P = true_P.copy()
    ldm_P[3] = -700.0
    zeros = np.zeros(8)
    outputs = {Output("copy"): {"psnr": zeros + 25, "ssim": zeros + 0.9, "predicted": zeros},
               Output("tokenizer-copy"): {"psnr": zeros + 21, "ssim": zeros + 0.9, "predicted": -true_P},
               Output("tokenizer-oracle"): {"psnr": zeros + 26, "ssim": zeros + 0.9, "predicted": 0.5 * true_P},
               **{Output(model, variant): {"psnr": zeros + 24, "ssim": zeros + 0.9, "predicted": predicted}
                  for model in ("run", "run/ldm") for variant, predicted in
                  (("plain", 2 * true_P), ("detail", ldm_P if model == "run/ldm" else true_P),
                   ("aging", 0.3 * true_P))}}
    per_pair = pairs_table({r: true_P for r in REGIONS}, dict.fromkeys(REGIONS, 30.0), outputs)
    per_pair["diagnosis"] = pd.Categorical(np.where(per_pair["pair"] % 2, "AD", "CN"), categories=["CN", "AD"])
    labels, names = compare.compared_labels(per_pair), compare.display_names(per_pair)
    assert labels == ["copy", "tokenizer-oracle", "run+aging", "run+detail", "run/ldm+aging", "run/ldm+detail"]

    figure = compare.change_figure(per_pair, "ventricles", labels, names)

    panels = [axis for axis in figure.axes if axis.get_visible()]
    assert len(panels) == 6 and panels[0].get_subplotspec().get_gridspec().ncols == 4
    titles = [axis.get_title().split("\n") for axis in panels]
    assert [t[0] for t in titles] == ["copy", "tokenizer-oracle", "NeuroAR (+aging)", "NeuroAR (+detail)",
                                      "LDM (+aging)", "LDM (+detail)"]
    pad = 0.08 * 10.0  # the truth spans 0 (included) to 10 mL
    for axis in panels:
        assert axis.get_xlim() == pytest.approx((-pad, 10 + pad))
        assert axis.get_ylim() == pytest.approx((-10 - pad, 10 + pad))
        assert "y = x" in [text.get_text() for text in axis.texts]
        assert all(np.abs(c.get_offsets()[:, 1]).max() <= 10 + pad for c in axis.collections if len(c.get_offsets()))
    assert titles[5][2] == "1 beyond the range, to -700 mL" and len(titles[3]) == 2
    assert titles[0][1] == f"no change, MAE {true_P.mean():.2f} mL"
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["CN", "AD", "no change"]


def test_readable_names_drop_the_runs_name_unless_several_runs_are_compared():
    outputs = [("copy", "plain"), ("tokenizer-oracle", "plain"), ("demo", "plain"), ("demo", "aging"),
               ("demo/ldm", "detail"), ("demo/stargan", "aging"), ("demo/no-earlier", "aging"), ("demo/mine", "plain")]
    frame = pd.DataFrame([{"label": Output(m, v).label, "model": m, "variant": v} for m, v in outputs])
    assert list(compare.display_names(frame).values()) == [
        "copy", "tokenizer-oracle", "NeuroAR", "NeuroAR (+aging)", "LDM (+detail)", "StarGAN (+aging)",
        "NeuroAR, no earlier scan (+aging)", "NeuroAR mine"]
    two = pd.DataFrame([{"label": Output(m, "aging").label, "model": m, "variant": "aging"} for m in ("a", "b/ldm")])
    assert list(compare.display_names(two).values()) == ["a: NeuroAR (+aging)", "b: LDM (+aging)"]


def test_no_change_is_judged_against_the_spread_of_the_true_change():
    """A hippocampus-sized truth (hundredths of a mL) with a prediction that follows it has an r; a prediction
    that moves under 1 % of a large truth's spread (decoding noise) has none, however many mL that is."""
    small_P = np.array([0.01, 0.03, 0.02, 0.05, 0.04])
    r = compare.pearson(pd.Series(small_P * 0.8 + 0.001), pd.Series(small_P))
    assert r == pytest.approx(1.0)
    large_P = np.array([0.0, 10.0, 20.0, 30.0, 40.0])
    noise_P = np.array([0.0, 0.12, 0.0, 0.12, 0.0])  # 0.4 % of the truth's spread
    assert np.std(noise_P) < compare.NO_CHANGE_SHARE * np.std(large_P)
    assert np.isnan(compare.pearson(pd.Series(noise_P), pd.Series(large_P)))
    assert not np.isnan(compare.pearson(pd.Series(noise_P * 5), pd.Series(large_P)))


class HalfTokenizer:
    """Stands in for TokenizerCopy: a follow-up's reconstruction (the earlier scan's without one) is half of it."""

    def reconstruct(self, earlier_DHW, later_DHW=None):
        return (earlier_DHW if later_DHW is None else later_DHW) / 2


def test_the_oracle_adds_the_later_scans_token_change_and_needs_the_later_scans():
    earlier_DHW, later_DHW = np.full((2, 3, 4), 0.4, np.float32), np.full((2, 3, 4), 0.8, np.float32)
    oracle = TokenizerOracle(HalfTokenizer())
    (output, volumes), = oracle.predict(earlier_DHW, 70.0, [72.0], 0, later_DHWs=[later_DHW]).items()
    assert output == Output("tokenizer-oracle")
    np.testing.assert_allclose(volumes[0], 0.4 + 0.4 - 0.2)
    with pytest.raises(NeuroARError, match="needs the true follow-up"):
        oracle.predict(earlier_DHW, 70.0, [72.0], 0)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run (its held-out split: val, one pair) with a tokenizer and a NeuroAR model trained for a few
    steps."""
    from neuroar.data.tokens import tokenize_run
    from neuroar.train.tokenizer import train_tokenizer
    from neuroar.train.transformer import train_transformer

    run = make_tiny_run(tmp_path_factory.mktemp("trained"))
    config = load_config(run / "config.yaml", ["train_tokenizer.steps=3", "train_tokenizer.val_every=100",
                                               "train_tokenizer.adversarial_weight=0", "train_transformer.steps=2"])
    train_tokenizer(run, config, progress=False)
    tokenize_run(run, config, progress=False)
    train_transformer(run, config, progress=False)
    return run


def test_a_trained_models_detail_output_and_the_oracle_match_an_independent_recomputation(trained_run, tmp_path):
    """"+detail" = the earlier scan + the model's prediction - the earlier scan through the model's tokenizer; the
    oracle = the earlier scan + decoded tokens of the later scan - decoded tokens of the earlier scan; both
    recomputed here with the tokenizer's own calls, on the held-out split (val: the run has no test split)."""
    config = load_config(trained_run / "config.yaml")
    compare.evaluate_models([str(trained_run)], tmp_path / "out", samples=2, progress=False, sweep_subjects=0)

    per_pair = pd.read_csv(tmp_path / "out" / "pairs.csv", dtype={"subject_id": str})
    pairs = pd.read_csv(trained_run / "pairs.csv", dtype={"subject_id": str})
    pair = pairs[pairs["split"] == "val"].iloc[0]
    assert len(per_pair) == 7 and (per_pair["subject_id"] == pair["subject_id"]).all()
    run = trained_run.name
    assert list(per_pair["label"]) == ["copy", "tokenizer-copy", "tokenizer-oracle", "volume-trend", run,
                                       f"{run}+detail", f"{run}+aging"]
    earlier_DHW, later_DHW = load_preprocessed(pair["earlier_path"])[0], load_preprocessed(pair["later_path"])[0]
    model = ModelForecaster.load(trained_run, samples=2)
    outputs = model.predict(earlier_DHW, pair["earlier_age"], [pair["later_age"]], seed=0)
    tokenizer = TokenizerCopy(trained_run, config).tokenizer

    def decoded(volume_DHW):
        return tokenizer.decode_scan(tokenizer.encode_scan(volume_DHW))[0]

    detail_DHW = np.clip(earlier_DHW + outputs[Output(run)][0] - decoded(earlier_DHW), 0, 1)
    np.testing.assert_allclose(outputs[Output(run, "detail")][0], detail_DHW, atol=1e-6)
    oracle_DHW = np.clip(earlier_DHW + decoded(later_DHW) - decoded(earlier_DHW), 0, 1)
    brain = template_brain_mask(config.data)
    scored = per_pair.set_index("label")["psnr"]
    assert scored[f"{run}+detail"] == pytest.approx(masked_psnr(detail_DHW, later_DHW, brain), rel=1e-5)
    assert scored["tokenizer-oracle"] == pytest.approx(masked_psnr(oracle_DHW, later_DHW, brain), rel=1e-5)

    # The volume trend: the training pairs' change per year (all start at 70 here, so no age term), no image.
    regions, training = template_regions(config.data), pairs[pairs["split"] == "train"]
    change = {r: np.array([regional_volumes(load_preprocessed(later)[0], regions)[r]
                           - regional_volumes(load_preprocessed(earlier)[0], regions)[r]
                           for earlier, later in zip(training["earlier_path"], training["later_path"])])
              for r in REGIONS}
    years = (training["later_age"] - training["earlier_age"]).to_numpy()
    trend = per_pair.set_index("label").loc["volume-trend"]
    for r in REGIONS:
        rate = (years @ change[r]) / (years @ years)
        assert trend[f"predicted_change_{r}"] == pytest.approx(rate * pair["years"], rel=1e-5, abs=1e-9)
    assert np.isnan(trend[["psnr", "ssim", "mae"]].to_numpy(dtype=float)).all()
    assert "| volume-trend | – | – | – |" in (tmp_path / "out" / "summary.md").read_text()


def test_the_volume_trend_recovers_a_rate_that_changes_with_age():
    """Volumes whose change is years x (a + b x (earlier age - mean earlier age)), pairs of several gaps and ages
    (one of zero years): the fit recovers a and b per region, and the rows predict with them."""
    from neuroar.evaluate.volume_trend import fit_volume_trend, trend_rows

    rates = {r: (1.0 + i, 0.1 * (i - 2)) for i, r in enumerate(REGIONS)}
    earlier_age, years = np.array([60.0, 70, 75, 80, 80]), np.array([1.0, 3, 0, 2, 5])
    mean_age = earlier_age.mean()
    pairs = pd.DataFrame({"earlier_path": [f"e{i}" for i in range(5)], "later_path": [f"l{i}" for i in range(5)],
                          "earlier_age": earlier_age, "later_age": earlier_age + years})
    volumes = {f"e{i}": dict.fromkeys(REGIONS, 100.0) for i in range(5)}
    volumes |= {f"l{i}": {r: 100 + years[i] * (a + b * (earlier_age[i] - mean_age)) for r, (a, b) in rates.items()}
                for i in range(5)}

    trend = fit_volume_trend(pairs, volumes)

    assert trend.mean_age == pytest.approx(mean_age)
    for region, rate in rates.items():
        assert trend.rates[region] == pytest.approx(rate)
    per_pair = pd.DataFrame({"pair": [0, 0, 1], "label": ["copy", "m", "copy"], "earlier_age": [62.0, 62, 90],
                             "years": [2.0, 2, 4], "psnr": 25.0, "ssim": 0.9, "mae": 0.1})
    rows = trend_rows(trend, per_pair)
    assert list(rows["pair"]) == [0, 1]
    a, b = rates["ventricles"]
    np.testing.assert_allclose(rows["predicted_change_ventricles"], [2 * (a + b * (62 - mean_age)),
                                                                    4 * (a + b * (90 - mean_age))])


def test_image_figures_draw_pairs_of_identical_scans(tmp_path):
    """A pair whose scans are identical has an infinite PSNR for copy: the figures leave it out, not fail."""
    zeros = np.zeros(4)
    outputs = {Output("copy"): {"psnr": np.array([np.inf, 25, 26, 27]), "ssim": zeros + 0.9, "predicted": zeros},
               Output("run", "aging"): {"psnr": np.array([30, 24, 25, 26]), "ssim": zeros + 0.8, "predicted": zeros}}
    per_pair = pairs_table({r: np.arange(4.0) for r in REGIONS}, dict.fromkeys(REGIONS, 30.0), outputs)
    labels, names = compare.compared_labels(per_pair), compare.display_names(per_pair)

    axis = compare.psnr_figure(per_pair, labels, names).axes[0]

    assert axis.get_ylim() == pytest.approx((24 - 0.3 - 0.1, 30 + 0.3 + 0.1))
    compare.metrics_figure(per_pair, labels, names).savefig(tmp_path / "metrics.png")
