"""`neuroar report RUN`: one self-contained HTML file (figures inlined, viewer script inlined, opens offline).

In the order a reader needs it: the verdict (does the run's NeuroAR model beat copy on the volume change, per
region, with the numbers of RUN/evaluation/summary.csv); one held-out subject's images (three orthogonal slices
of the earlier scan, NeuroAR's prediction, the true follow-up, the predicted and the true change, and the
uncertainty); the evaluation's table of the outputs a reader compares (copy, the tokenizer-oracle, each
model's +aging and +detail), every output and region a click away; the evaluation's figures, drawn from its
per-pair tables by the evaluation's own figure functions, each with a caption; more held-out subjects; an age
sweep of one subject with the volume curve of the evaluation's aging region beside the volumes of its real
scans; the brain-age table (when RUN/brain_age exists); training curves; an interactive viewer (nilearn's
`view_img`) of one predicted volume; and the run's settings.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from neuroar.config import load_config
from neuroar.data.pairs import held_out_split
from neuroar.data.preprocess import load_preprocessed
from neuroar.errors import NeuroARError
from neuroar.evaluate import compare
from neuroar.evaluate.volumes import REGIONS, regional_volumes, template_regions
from neuroar.files import write_text
from neuroar.predict import Predictor

SWEEP_YEARS = (0, 2, 4, 6, 8)
SIGNIFICANCE = 0.05  # the verdict calls an output better or worse than copy below this p
HEADLINE = {"better": "beats copy", "worse": "is worse than copy", "no different": "does not differ from copy"}
STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em;line-height:1.4}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}"
         "img{max-width:100%}figure{margin:1.5em 0}figcaption{font-size:14px;color:#333;max-width:1100px}"
         "#verdict{background:#f4f6fa;border-left:4px solid #0072B2;padding:0.2em 1em;font-size:17px}"
         "details{margin:1em 0}summary{cursor:pointer;font-weight:bold}#verdict .note{font-size:14px;color:#333}")


def build_report(run_dir: str | Path, pairs_shown: int = 3, seed: int = 0) -> Path:
    run_dir = Path(run_dir)
    evaluation = run_dir / "evaluation"
    if not all((evaluation / name).is_file() for name in ("summary.md", "summary.csv", "pairs.csv", "sweep.csv")):
        raise NeuroARError(f"{evaluation} lacks summary.md, summary.csv, pairs.csv or sweep.csv; run `neuroar "
                           f"evaluate --models {run_dir} --out {evaluation}` (or `neuroar demo`) first.")
    config = load_config(run_dir / "config.yaml")
    predictor = Predictor.from_checkpoint(run_dir)
    pairs = pd.read_csv(run_dir / "pairs.csv", dtype={"subject_id": str}, keep_default_na=False)
    split = held_out_split(pairs)
    shown = (pairs[pairs["split"] == split].sort_values("years", ascending=False)
             .drop_duplicates("subject_id").head(pairs_shown))
    summary = pd.read_csv(evaluation / "summary.csv")
    per_pair = compare.with_diagnosis(pd.read_csv(evaluation / "pairs.csv", dtype={"subject_id": str}), run_dir)
    sweep = compare.with_diagnosis(pd.read_csv(evaluation / "sweep.csv", dtype={"subject_id": str}), run_dir)
    names = compare.display_names(per_pair)
    region = str(summary["region"].iloc[0])
    figures = evaluation / "figures"
    if not all((figures / f"{name}.png").is_file() for name in compare.FIGURES if name != "age_sweep" or len(sweep)):
        compare.plot_all(per_pair, sweep, region, figures)  # an evaluation written before one of them existed

    subjects = []
    for pair in shown.to_dict("records"):
        earlier_DHW, later_DHW = load_preprocessed(pair["earlier_path"])[0], load_preprocessed(pair["later_path"])[0]
        (mean, std, detail), = predictor.predict_preprocessed(earlier_DHW, pair["earlier_age"], [pair["later_age"]],
                                                         seed=seed, diagnosis=pair.get("diagnosis"))
        subjects.append((pair, mean, pair_figure(earlier_DHW, mean, later_DHW, std, detail)))

    sections = [f"<h1>neuroar report: {html.escape(run_dir.name)}</h1>",
                verdict(summary, run_dir.name, names, split)]
    if subjects:
        sections += ["<h2>A held-out subject</h2>", _subject(*subjects[0][::2])]
    sections += ["<h2>Evaluation</h2>", evaluation_tables((evaluation / "summary.md").read_text(), summary, names,
                                                          per_pair, split),
                 "<h2>Figures</h2>", evaluation_figures(figures, per_pair, sweep, region)]
    if len(subjects) > 1:
        sections += ["<h2>More held-out subjects</h2>", *(_subject(pair, figure) for pair, _, figure in subjects[1:])]
    if subjects:
        sections += ["<h2>Age sweep of one subject</h2>", sweep_section(predictor, run_dir, shown.iloc[0]["subject_id"],
                                                                         config, region, seed)]
    if (run_dir / "brain_age" / "summary.md").is_file():
        sections += ["<h2>Brain age</h2>", markdown_html((run_dir / "brain_age" / "summary.md").read_text())]
    sections += ["<h2>Training</h2>", _figure(training_figure(run_dir), "Training curves against the step: the "
                 "tokenizer's L1 loss and validation PSNR in the brain (dB); NeuroAR's loss and its teacher-forced "
                 "token accuracy per scale on validation pairs (solid) against copying the earlier scan's tokens "
                 "(dashed); where trained, the baselines' autoencoder L1, the LDM's noise MSE and the StarGAN's "
                 "losses.")]
    if subjects:
        affine = load_preprocessed(shown.iloc[0]["earlier_path"])[1].affine
        sections += ["<h2>Interactive viewer (the first subject's prediction)</h2>", viewer(subjects[0][1], affine)]
    sections += ["<h2>The run</h2>",
                 f"<p>Data {config.data.shape} at {config.data.spacing:g} mm; tokenizer {config.tokenizer.scales[-1]} "
                 f"latent grid, {len(config.tokenizer.scales)} scales, codebook {config.tokenizer.codebook_size}; "
                 f"NeuroAR depth {config.transformer.depth}. Held-out split: {split}.</p>"]
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>neuroar report</title><style>" + STYLE
            + "</style></head><body>" + "\n".join(sections) + "</body></html>")
    out = run_dir / "report.html"
    write_text(out, page)
    return out


def verdict(summary: pd.DataFrame, model: str, names: dict[str, str], split: str) -> str:
    """The report's first section: for each change output of the run's NeuroAR model `model` (+aging, +detail),
    one sentence: does it beat copy on the change of each region (the aging region first), with its change error
    against copy's, the p of the paired test against copy and r, all from the evaluation's summary."""
    rows = summary.set_index("label")
    copy, region = rows.loc[compare.COPY.label], str(summary["region"].iloc[0])
    order = [region, *(r for r in REGIONS if r != region)]
    mine = summary[(summary["model"] == model) & summary["variant"].isin(compare.CHANGE_VARIANTS)]
    mine = mine.sort_values("variant", key=lambda v: v.map(compare.CHANGE_VARIANTS.index), kind="stable")
    title = "<h2>Verdict: does NeuroAR beat copy on the volume change?</h2>"
    if mine.empty:
        return (f"<section id='verdict'>{title}<p>The evaluation holds no change output of this run's NeuroAR model "
                f"({html.escape(model)}): nothing to judge against copy.</p></section>")

    def numbers(row: pd.Series, r: str) -> str:
        return (f"{row[f'{r}_change_mae']:.2f} against {copy[f'{r}_change_mae']:.2f} mL, "
                f"{_p(row[f'{r}_change_mae_p_vs_copy'])}, r {_number(row[f'{r}_change_r'])}")

    sentences = []
    for label, row in mine.set_index("label").iterrows():
        judged = {r: _judgement(row[f"{r}_change_mae"], copy[f"{r}_change_mae"], row[f"{r}_change_mae_p_vs_copy"])
                  for r in order}
        sentences.append(
            f"<p><b>{html.escape(names.get(label, label))} {HEADLINE[judged[region]]} on the {_words(region)} "
            f"change</b>, the cohort's aging region ({numbers(row, region)}, "
            f"{_percent(row[f'{region}_carried'])} of the true mean change carried); elsewhere: "
            + "; ".join(f"{_words(r)} {judged[r]} ({numbers(row, r)})" for r in order[1:]) + ".</p>")
    lead = (f"Change error: the mean absolute error of the predicted against the true volume change over the "
            f"{int(copy['pairs'])} {html.escape(split)} pairs, against copy's (the earlier scan as the forecast, "
            f"which predicts no change); p: paired Wilcoxon test of the errors against copy's, better or worse at "
            f"p < {SIGNIFICANCE:g}, each test on its own (not adjusted for the others); r: Pearson correlation of "
            "predicted and true change.")
    if "tokenizer-oracle" in rows.index:
        oracle = rows.loc["tokenizer-oracle"]
        lead += (f" For scale: the tokenizer-oracle (which reads the true follow-up) has {_words(region)} change error "
                 f"{oracle[f'{region}_change_mae']:.2f} mL, r {_number(oracle[f'{region}_change_r'])}, "
                 f"{_percent(oracle[f'{region}_carried'])} of the true mean change carried: what the token space "
                 "carries.")
    if "mean-change" in rows.index:
        mean = rows.loc["mean-change"]
        lead += (f" The cohort's mean change (the earlier scan advanced by the training pairs' mean aging per year, "
                 f"no model of the subject) has {_words(region)} change error {mean[f'{region}_change_mae']:.2f} mL, "
                 f"r {_number(mean[f'{region}_change_r'])}: a model that does not beat it has learnt nothing of the "
                 "subject's own aging.")
    if f"{model}+{compare.BASE}" in rows.index:
        base = rows.loc[f"{model}+{compare.BASE}"]
        lead += (f" This NeuroAR's change base alone (the earlier scan advanced by its change regressor's prediction "
                 f"from the scan and its age, before any token) has {_words(region)} change error "
                 f"{base[f'{region}_change_mae']:.2f} mL, r {_number(base[f'{region}_change_r'])}: what its tokens "
                 "add to.")
    if compare.VOLUME_TREND.label in rows.index:
        trend = rows.loc[compare.VOLUME_TREND.label]
        lead += (f" The ages alone (the training pairs' linear trend of each region's volume with the years and the "
                 f"earlier age, no image) have {_words(region)} change error {trend[f'{region}_change_mae']:.2f} mL, "
                 f"r {_number(trend[f'{region}_change_r'])}: a model with a larger error predicts that change less "
                 "well than two numbers fitted on the training pairs.")
    return f"<section id='verdict'>{title}{''.join(sentences)}<p class='note'>{lead}</p></section>"


def _judgement(error: float, copy_error: float, p: float) -> str:
    if not (np.isfinite(p) and p < SIGNIFICANCE):
        return "no different"
    return "better" if error < copy_error else "worse"


def _p(value: float) -> str:
    if not np.isfinite(value):
        return "p –"
    return "p < 0.001" if value < 0.001 else f"p {value:.3f}"


def _number(value: float) -> str:
    return "–" if not np.isfinite(value) else f"{value:.2f}"


def _percent(value: float) -> str:
    return "–" if not np.isfinite(value) else f"{value:.0%}"


def _words(region: str) -> str:
    return region.replace("_", " ")


def evaluation_tables(text: str, summary: pd.DataFrame, names: dict[str, str], per_pair: pd.DataFrame,
                      split: str) -> str:
    """The evaluation's first table (summary.md) for the outputs a reader compares, under readable names; every
    output, every region and the definitions (summary.md whole) in a block a click away."""
    compared = {label: names[label] for label in compare.compared_labels(per_pair)}
    first = next(block for block in _markdown_blocks(text) if isinstance(block, list))
    rows = {row[0]: row for row in first[1:]}
    table = [first[0], *([name, *rows[label][1:]] for label, name in compared.items() if label in rows)]
    lead = (f"<p>{per_pair['subject_id'].nunique()} subjects and {int(summary['pairs'].iloc[0])} pairs of the "
            f"{html.escape(split)} split; the outputs a reader compares (NeuroAR is the run's model; +aging: the "
            "earlier scan plus what the model says the years change; +detail: the earlier scan plus the predicted "
            "change against the model's own reconstruction). Definitions, every output and every region below.</p>")
    return (lead + _table_html(table) + "<details><summary>Every output and region, with the definitions "
            f"({summary['label'].nunique()} outputs)</summary>{markdown_html(text)}</details>")


def evaluation_figures(folder: Path, per_pair: pd.DataFrame, sweep: pd.DataFrame, region: str) -> str:
    """The evaluation's figures of the compared outputs (FOLDER/*.png, as `compare.plot_all` drew them), each with
    its caption; the change of every output a click away."""
    words = _words(region)
    diagnosis = " Colour: the subject's diagnosis." if "diagnosis" in per_pair else ""
    out = [_image(folder / "change.png",
                  f"Predicted against true {words} change (mL) per held-out pair, one panel per output. The black "
                  "diagonal (y = x) is a perfect forecast, the dotted line copy's (no change). Every panel has the "
                  "same ranges: the true changes' across, and up to the largest true change in either direction up, "
                  "so a change in the wrong direction shows and no output's outliers squeeze the others; a "
                  "prediction beyond the range sits on the border as a triangle and the panel's title counts them. "
                  f"r: Pearson correlation; MAE: mean absolute error of the change.{diagnosis}")]
    if len(sweep):
        out.append(_image(folder / "age_sweep.png",
                          f"Age sweep: each swept subject's first scan predicted {sweep['years'].min():g} to "
                          f"{sweep['years'].max():g} years "
                          f"ahead, the predicted {words} change since that scan (mL) against the years, one panel per "
                          "model output; dashed: the true change's mean rate over the held-out pairs. The title "
                          f"counts the subjects whose predicted {words} moves the truth's way at every step. Every "
                          "panel shows up to 1.5 times the truth's change at the last step in either direction; "
                          f"a curve beyond it leaves the panel.{diagnosis}"))
    out += [_image(folder / "psnr_vs_years.png",
                   "PSNR (dB) inside the brain mask of each held-out pair's prediction against its true follow-up, "
                   "against the years between the scans, one panel per output on one range; grey: copy's pairs. "
                   "Every forecast worsens with the years; a model that has learned aging should fall less than "
                   "copy."),
            _image(folder / "metrics.png",
                   "Image metrics inside the brain mask per output over the held-out pairs (box: quartiles, "
                   "whiskers: 1.5 times the interquartile range, circles: pairs beyond); dashed: copy's median."),
            "<details><summary>The change of every output</summary>"
            + _image(folder / "change_all.png",
                     "As the first figure, for every output the evaluation scored (the models' decoded predictions "
                     "and tokenizer-copy as well): these carry the tokenizer's or the autoencoder's reconstruction "
                     "error as change, which is why +aging and +detail exist.") + "</details>"]
    return "\n".join(out)


def _subject(pair: dict, figure: Figure) -> str:
    diagnosis = f", {pair['diagnosis']}" if pair.get("diagnosis") else ""
    return _figure(figure, f"Subject {pair['subject_id']}{diagnosis}, {pair['earlier_age']:.1f} to "
                   f"{pair['later_age']:.1f} years ({pair['years']:.1f} years apart): sagittal, coronal and axial "
                   "slices through the centre of the earlier scan, NeuroAR's prediction (the mean of its samples), "
                   "the true follow-up, the predicted change (NeuroAR's +detail output minus the earlier scan) and "
                   "the true change (later minus earlier intensity: red brighter, blue darker), and the spread of the "
                   "samples (std).")


def pair_figure(earlier_DHW, predicted_DHW, later_DHW, std_DHW, detail_DHW) -> Figure:
    """The predicted change is the model's own (decoded prediction - decoded earlier scan, i.e. the
    detail-preserving output - the earlier scan), so the tokenizer's reconstruction error does not show as change."""
    columns = [("earlier scan", earlier_DHW, "gray", (0, 1)), ("prediction", predicted_DHW, "gray", (0, 1)),
               ("true follow-up", later_DHW, "gray", (0, 1)),
               ("predicted change", detail_DHW - earlier_DHW, "RdBu_r", (-0.15, 0.15)),
               ("true change", later_DHW - earlier_DHW, "RdBu_r", (-0.15, 0.15)),
               ("uncertainty (std)", std_DHW, "magma", (0, max(float(std_DHW.max()), 1e-3)))]
    figure = Figure(figsize=(2 * len(columns), 6.6), layout="constrained")
    axes = figure.subplots(3, len(columns))
    centre = np.array(earlier_DHW.shape) // 2
    for column, (name, volume, cmap, (low, high)) in enumerate(columns):
        for axis in range(3):
            axes[axis, column].imshow(np.rot90(np.take(volume, centre[axis], axis=axis)), cmap=cmap, vmin=low,
                                      vmax=high)
            axes[axis, column].axis("off")
        axes[0, column].set_title(name, fontsize=compare.FONT)
    return figure


def sweep_section(predictor: Predictor, run_dir: Path, subject: str, config, region: str, seed: int) -> str:
    """The subject's first scan predicted over the years, and the volume of `region` (the evaluation's aging
    region) predicted beside that of its real scans."""
    scans = pd.read_csv(run_dir / "scans.csv", dtype={"subject_id": str}, keep_default_na=False)
    visits = scans[scans["subject_id"] == subject].sort_values("age")
    first_DHW = load_preprocessed(visits.iloc[0]["preprocessed"])[0]
    age = float(visits.iloc[0]["age"])
    targets = [age + y for y in SWEEP_YEARS[1:]]
    predictions = [first_DHW] + [mean for mean, _, _ in predictor.predict_preprocessed(
        first_DHW, age, targets, seed=seed, diagnosis=visits.iloc[0].get("diagnosis"))]
    regions = template_regions(config.data)
    predicted = [regional_volumes(p, regions)[region] for p in predictions]
    real = [regional_volumes(load_preprocessed(p)[0], regions)[region] for p in visits["preprocessed"]]
    figure = Figure(figsize=(12, 6), layout="constrained")
    axes = figure.subplot_mosaic([[str(y) for y in SWEEP_YEARS], ["volume"] * len(SWEEP_YEARS)],
                                 height_ratios=[1, 1.1])
    axial = int(regions.ventricles.sum(axis=(0, 1)).argmax())  # the axial slice through most of the ventricles
    for volume, years in zip(predictions, SWEEP_YEARS):
        axes[str(years)].imshow(np.rot90(volume[:, :, axial]), cmap="gray", vmin=0, vmax=1)
        axes[str(years)].set_title("earlier scan" if years == 0 else f"+{years} years", fontsize=compare.FONT)
        axes[str(years)].axis("off")
    curve = axes["volume"]
    curve.plot([age, *targets], predicted, marker="o", label="NeuroAR's prediction from the first scan")
    curve.plot(visits["age"], real, marker="s", linestyle="--", label="the subject's real scans")
    curve.set_xlabel("age (years)", fontsize=compare.FONT)
    curve.set_ylabel(f"{_words(region)} volume (mL)", fontsize=compare.FONT)
    curve.tick_params(labelsize=compare.FONT - 1)
    curve.legend(fontsize=compare.FONT)
    ahead = ", ".join(f"+{y}" for y in SWEEP_YEARS[1:])
    return _figure(figure, f"Subject {subject}'s first scan ({age:.1f} years) and NeuroAR's predictions (the mean "
                   f"of its samples) {ahead} years ahead, on the axial slice through most of the template's "
                   f"ventricles; below, the {_words(region)} volume (mL) of the predictions against age beside that of "
                   "the subject's real scans.")


def training_figure(run_dir: Path) -> Figure:
    panels = [("tokenizer_train.csv", "l1", "tokenizer L1"), ("tokenizer_val.csv", "psnr_brain",
                                                              "tokenizer val PSNR (dB)"),
              ("neuroar_train.csv", "loss", "NeuroAR loss"), ("neuroar_val.csv", None, "NeuroAR val accuracy"),
              ("autoencoder_train.csv", "l1", "autoencoder L1"), ("ldm_train.csv", "mse", "LDM noise MSE"),
              ("stargan_train.csv", "generator", "StarGAN generator loss"),
              ("stargan_train.csv", "discriminator", "StarGAN discriminator loss")]
    panels = [panel for panel in panels if (run_dir / panel[0]).is_file()]  # the baselines' where trained
    rows = max(1, -(-len(panels) // 4))
    figure = Figure(figsize=(12, 3.2 * rows), layout="constrained")
    for axis, (name, column, title) in zip(figure.subplots(rows, 4, squeeze=False).flat, panels):
        log = pd.read_csv(run_dir / name)
        marker = "." if len(log) < 20 else None
        if column is not None:
            axis.plot(log["step"], log[column], marker=marker)
        else:  # per scale: the model's teacher-forced accuracy (solid) against copying the earlier tokens
            for k in range(sum(c.endswith("_copy_accuracy") for c in log.columns)):
                line, = axis.plot(log["step"], log[f"scale{k}_accuracy"], marker=marker, label=f"scale {k}")
                axis.plot(log["step"], log[f"scale{k}_copy_accuracy"], ls="--", color=line.get_color())
            if axis.lines:
                axis.legend(fontsize=8, title="dashed: copy", title_fontsize=8)
        axis.set_title(title, fontsize=compare.FONT)
        axis.set_xlabel("step", fontsize=compare.FONT - 1)
    return figure


def viewer(volume_DHW: np.ndarray, affine: np.ndarray) -> str:
    from nilearn import plotting

    view = plotting.view_img(nib.Nifti1Image(volume_DHW.astype(np.float32), affine), bg_img=False, cmap="gray",
                             symmetric_cmap=False, threshold=None, black_bg=True, colorbar=False, vmin=0, vmax=1)
    page = view.get_standalone()
    page = "\n".join(line for line in page.splitlines() if "favicon" not in line)  # no fetch when offline
    return (f"<iframe srcdoc=\"{html.escape(page, quote=True)}\" width='100%' height='420' "
            "style='border:none'></iframe>")


def _markdown_blocks(text: str) -> list[str | list[list[str]]]:
    """A summary.md's paragraphs (str) and pipe tables (rows of cells, the header first), headings dropped."""
    blocks: list[str | list[list[str]]] = []
    table: list[list[str]] = []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                table.append(cells)
            continue
        if table:
            blocks.append(table)
            table = []
        if line.strip() and not line.startswith("#"):
            blocks.append(line)
    return blocks


def markdown_html(text: str) -> str:
    """A summary.md (paragraphs and pipe tables) as HTML."""
    return "\n".join(_table_html(block) if isinstance(block, list) else f"<p>{html.escape(block)}</p>"
                     for block in _markdown_blocks(text))


def _table_html(rows: list[list[str]]) -> str:
    """Rows of cells as an HTML table, the first row its header."""
    lines = ["<tr>" + "".join(f"<{tag}>{html.escape(cell)}</{tag}>" for cell in row) + "</tr>"
             for tag, row in zip(["th"] + ["td"] * (len(rows) - 1), rows)]
    return "<table>" + "".join(lines) + "</table>"


def _figure(figure: Figure, caption: str) -> str:
    """A figure inlined as PNG, at a page's width, with its caption."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=compare.FIGURE_DPI)
    return _png(buffer.getvalue(), caption)


def _image(path: Path, caption: str) -> str:
    """A PNG file inlined as `_figure` inlines a figure."""
    return _png(path.read_bytes(), caption)


def _png(png: bytes, caption: str) -> str:
    return (f"<figure><img alt='{html.escape(caption, quote=True)}' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
