"""The report: it opens with the verdict against copy, per region, with the evaluation's numbers; then one held-out
subject, the tables of the compared outputs (the rest a click away), and every figure with a caption."""

import base64
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from conftest import make_tiny_run
from neuroar import report
from neuroar.evaluate import compare
from neuroar.evaluate.volumes import REGIONS

PAIRS = 12
# Per output, the predicted change of each region as a multiple of the truth: +aging carries 60 % of the ventricles'
# change (closer than copy on every pair: better), none of grey matter's (copy itself: no test, no different) and
# three times white matter's (worse); +detail predicts the ventricles the wrong way (worse).
FACTORS = {"copy": dict.fromkeys(REGIONS, 0.0), "tokenizer-copy": dict.fromkeys(REGIONS, -0.5),
           "tokenizer-oracle": dict.fromkeys(REGIONS, 0.8), "volume-trend": dict.fromkeys(REGIONS, 0.9),
           "run": dict.fromkeys(REGIONS, -1.0), "run+base": dict.fromkeys(REGIONS, 0.4),
           "run+detail": {"ventricles": -1.5, "grey_matter": 0.5, "white_matter": 0.9, "hippocampus": 0.2,
                          "whole_brain": 2.5},
           "run+aging": {"ventricles": 0.6, "grey_matter": 0.0, "white_matter": 3.0, "hippocampus": 0.9,
                         "whole_brain": -0.2},
           "run/ldm": dict.fromkeys(REGIONS, -20.0), "run/ldm+detail": dict.fromkeys(REGIONS, 0.1),
           "run/ldm+aging": dict.fromkeys(REGIONS, 0.0)}


def true_changes() -> dict[str, np.ndarray]:
    """Ventricles grow most relative to their volume (the aging region); no two pairs alike."""
    rng = np.random.default_rng(0)
    return {r: scale * rng.uniform(0.5, 1.5, PAIRS) for r, scale in
            zip(REGIONS, (3.0, -20.0, 5.0, -0.2, -15.0))}


def per_pair_table(subjects: list[str]) -> pd.DataFrame:
    true = true_changes()
    rows = []
    for label, factors in FACTORS.items():
        model, _, variant = label.partition("+")
        for p in range(PAIRS):
            rows.append({"label": label, "model": model, "variant": variant or "plain", "pair": p,
                         "subject_id": subjects[p % len(subjects)], "earlier_age": 70.0, "later_age": 71.0 + p % 3,
                         "years": 1.0 + p % 3, "psnr": 25 + factors["ventricles"] + p / 10, "ssim": 0.9, "mae": 0.04,
                         **(dict.fromkeys(("psnr", "ssim", "mae"), np.nan) if label == "volume-trend" else {}),
                         **{f"earlier_volume_{r}": 30.0 if r == "ventricles" else 900.0 for r in REGIONS},
                         **{f"true_change_{r}": true[r][p] for r in REGIONS},
                         **{f"predicted_change_{r}": factors[r] * true[r][p] for r in REGIONS}})
    return pd.DataFrame(rows)


class StandIn:
    """Stands in for a trained NeuroAR model: every prediction is the scan itself."""

    @classmethod
    def from_checkpoint(cls, run_dir):
        return cls()

    def predict_preprocessed(self, volume_DHW, age, target_ages, samples=None, seed=0, diagnosis=None):
        return [(volume_DHW, np.zeros_like(volume_DHW), volume_DHW) for _ in target_ages]


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """A tiny run (named "run": its NeuroAR model's outputs are run, run+detail, run+aging) with two diagnoses and
    an evaluation of the outputs of FACTORS, and its report built with a stand-in model."""
    run = make_tiny_run(tmp_path_factory.mktemp("report"))
    scans = pd.read_csv(run / "scans.csv", dtype={"subject_id": str}, keep_default_na=False)
    scans["diagnosis"] = ["CN" if int(s[1:]) % 2 == 0 else "AD" for s in scans["subject_id"]]
    scans.to_csv(run / "scans.csv", index=False)
    per_pair = per_pair_table(sorted(scans["subject_id"].unique()))
    sweep = pd.DataFrame([{"label": label, "model": label.split("+")[0], "variant": "plain", "subject_id": subject,
                           "age": 70.0, "target_age": 70.0 + years, "years": years, "region": "ventricles",
                           "volume_start": 30.0, "volume": 30.0 + 0.5 * years}
                          for label in ("run", "run+detail", "run+aging") for subject in ("s0", "s1")
                          for years in (1, 2, 4)])
    summary = compare.summarize(per_pair, sweep, "ventricles")
    compare.write_evaluation(run / "evaluation", per_pair, sweep, summary, "val")
    mp = pytest.MonkeyPatch()
    mp.setattr(report, "Predictor", StandIn)
    try:
        page = report.build_report(run).read_text()
    finally:
        mp.undo()
    return run, page


def p_text(p: float) -> str:
    return "p –" if not np.isfinite(p) else "p < 0.001" if p < 0.001 else f"p {p:.3f}"


def test_the_report_opens_with_the_verdict_per_region_in_the_evaluations_numbers(evaluated_run):
    """Each of NeuroAR's change outputs gets one sentence: the aging region first, then every other region, each
    with its change error against copy's, p against copy and r, all recomputed here from the true and predicted
    changes."""
    _, page = evaluated_run
    body = page.split("</h1>", 1)[1].lstrip()
    assert body.startswith("<section id='verdict'>")
    paragraphs = [re.sub(r"<[^>]+>", "", p) for p in re.findall(r"<p[^>]*>(.*?)</p>", body.split("</section>")[0])]
    true = true_changes()
    copy_error = {r: np.abs(true[r]) for r in REGIONS}
    words = {"better": "beats copy", "worse": "is worse than copy", "no different": "does not differ from copy"}
    expected = {("+aging", "ventricles"): "better", ("+aging", "grey_matter"): "no different",
                ("+aging", "white_matter"): "worse", ("+detail", "ventricles"): "worse"}
    assert [p.split(" ")[1] for p in paragraphs[:2]] == ["(+aging)", "(+detail)"]
    for variant, sentence in zip(("+aging", "+detail"), paragraphs):
        assert sentence.count(". ") == 0 and sentence.endswith(").")  # one sentence
        for region in REGIONS:
            predicted = FACTORS[f"run{variant}"][region] * true[region]
            error = np.abs(predicted - true[region])
            differs = not np.array_equal(error, copy_error[region])
            p = stats.wilcoxon(error, copy_error[region]).pvalue if differs else np.nan
            judged = ("no different" if not p < 0.05 else "better" if error.mean() < copy_error[region].mean()
                      else "worse")
            assert expected.get((variant, region), judged) == judged
            r = np.corrcoef(predicted, true[region])[0, 1] if np.std(predicted) > 0 else np.nan
            numbers = (f"({error.mean():.2f} against {copy_error[region].mean():.2f} mL, {p_text(p)}, "
                       f"r {'–' if np.isnan(r) else f'{r:.2f}'}")
            if region == "ventricles":
                carried = predicted.mean() / true[region].mean()
                assert sentence.startswith(f"NeuroAR ({variant}) {words[judged]} on the ventricles change, the "
                                           f"cohort's aging region {numbers}, {carried:.0%} of the true mean change")
            else:
                assert f"{region.replace('_', ' ')} {judged} {numbers})" in sentence, (region, sentence)


def verdict_note(page: str) -> str:
    return re.sub(r"<[^>]+>", "", page.split("<p class='note'>", 1)[1].split("</p>", 1)[0])


def compared_tables(page: str) -> str:
    return page.split("<h2>Evaluation", 1)[1].split("<details>", 1)[0]


def ventricles_error_and_r(label: str) -> str:
    """The note's words for an output's ventricles change, recomputed from FACTORS."""
    true = true_changes()["ventricles"]
    predicted = FACTORS[label]["ventricles"] * true
    return (f"change error {np.abs(predicted - true).mean():.2f} mL, r "
            f"{np.corrcoef(predicted, true)[0, 1]:.2f}")


def test_the_verdict_gives_the_volume_trends_error_and_the_tables_no_image_metrics_for_it(evaluated_run):
    """The volume trend (no image) is judged on its change alone: the verdict's note has its error and r, recomputed
    here; the compared table shows it without image metrics."""
    _, page = evaluated_run
    assert (f"The ages alone (the training pairs' linear trend of each region's volume with the years and the earlier "
            f"age, no image) have ventricles {ventricles_error_and_r('volume-trend')}") in verdict_note(page)
    assert re.search(r"<td>volume-trend</td><td>–</td><td>–</td><td>–</td>", compared_tables(page))


def test_the_verdict_gives_neuroars_change_base_alone_and_the_tables_compare_it(evaluated_run):
    _, page = evaluated_run
    assert (f"This NeuroAR's change base alone (the earlier scan advanced by its change regressor's prediction from "
            f"the scan and its age, before any token) has ventricles {ventricles_error_and_r('run+base')}"
            ) in verdict_note(page)
    rows = re.findall(r"<tr><td>([^<]+)</td>", compared_tables(page))
    assert rows.index("NeuroAR (+base)") + 1 == rows.index("NeuroAR (+aging)")  # the base first, then what adds


def test_the_report_shows_one_subject_then_the_compared_tables_then_captioned_figures(evaluated_run):
    _, page = evaluated_run
    order = [page.index(h) for h in ("id='verdict'", "<h2>A held-out subject", "<h2>Evaluation", "<h2>Figures",
                                     "<h2>Age sweep", "<h2>Training")]
    assert order == sorted(order)
    compared, everything = page.split("<h2>Evaluation", 1)[1].split("<details>", 1)
    # The compared outputs under readable names; the decoded predictions and tokenizer-copy a click away.
    for name in ("copy", "tokenizer-oracle", "NeuroAR (+aging)", "NeuroAR (+detail)", "LDM (+aging)",
                 "LDM (+detail)"):
        assert f"<td>{name}</td>" in compared
    assert "<td>run</td>" not in compared and "<td>tokenizer-copy</td>" not in compared
    assert "<td>run</td>" in everything and "<td>run/ldm</td>" in everything
    figures = re.findall(r"<figure>(.*?)</figure>", page, flags=re.S)
    # the held-out subject (the run's val split has one), 5 of the evaluation, the subject's sweep, training
    assert len(figures) == page.count("<img") == 8
    assert all(re.search(r"<figcaption>[^<]{40,}</figcaption>", figure) for figure in figures)


def test_the_report_shows_the_evaluations_own_figure_files_and_draws_those_an_older_evaluation_lacks(evaluated_run,
                                                                                                     monkeypatch):
    run, page = evaluated_run
    figures = run / "evaluation" / "figures"
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    for name in compare.FIGURES:  # drawn once, by the evaluation: the report inlines the files as they are
        assert base64.b64encode((figures / f"{name}.png").read_bytes()).decode() in images, name
    (figures / "change_all.png").unlink()
    monkeypatch.setattr(report, "Predictor", StandIn)
    again = report.build_report(run).read_text()
    assert (figures / "change_all.png").is_file() and again.count("<img") == 8


def test_the_verdict_says_when_the_evaluation_holds_no_neuroar_model(evaluated_run):
    run, _ = evaluated_run
    summary = pd.read_csv(run / "evaluation" / "summary.csv")
    trivial = summary[summary["model"].isin(["copy", "tokenizer-copy", "tokenizer-oracle"])]
    assert "holds no change output of this run's NeuroAR model" in report.verdict(trivial, "run", {}, "val")
