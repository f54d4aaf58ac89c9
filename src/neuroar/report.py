"""`neuroar report RUN`: one self-contained HTML file (figures inlined, viewer script inlined, opens offline).

Sections: the evaluation table (every model and baseline) and its figures; for a few test pairs, three
orthogonal slices of the earlier scan, NeuroAR's prediction, the true follow-up, the predicted and the true
change, and the uncertainty; an age sweep of one subject with the volume curve of the evaluation's aging
region beside the volumes of its real scans; the brain-age table (when RUN/brain_age exists); training curves;
and an interactive viewer (nilearn's `view_img`) of one predicted volume.
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
from neuroar.evaluate.volumes import regional_volumes, template_regions
from neuroar.files import write_text
from neuroar.predict import Predictor

SWEEP_YEARS = (0, 2, 4, 6, 8)
FIGURES = ("metrics", "change", "psnr_vs_years", "age_sweep")  # written by `neuroar evaluate`


def build_report(run_dir: str | Path, pairs_shown: int = 3, seed: int = 0) -> Path:
    run_dir = Path(run_dir)
    evaluation = run_dir / "evaluation"
    if not (evaluation / "summary.md").is_file():
        raise NeuroARError(f"{evaluation}/summary.md not found; run `neuroar evaluate --models {run_dir} --out "
                           f"{evaluation}` (or `neuroar demo`) first.")
    config = load_config(run_dir / "config.yaml")
    predictor = Predictor.from_checkpoint(run_dir)
    pairs = pd.read_csv(run_dir / "pairs.csv", dtype={"subject_id": str}, keep_default_na=False)
    split = held_out_split(pairs)
    shown = (pairs[pairs["split"] == split].sort_values("years", ascending=False)
             .drop_duplicates("subject_id").head(pairs_shown))
    sections = [f"<h1>neuroar report: {html.escape(run_dir.name)}</h1>",
                f"<p>Data {config.data.shape} at {config.data.spacing:g} mm; tokenizer {config.tokenizer.scales[-1]} "
                f"latent grid, {len(config.tokenizer.scales)} scales, codebook {config.tokenizer.codebook_size}; "
                f"NeuroAR depth {config.transformer.depth}. Held-out split: {split}.</p>",
                "<h2>Evaluation</h2>", markdown_tables((evaluation / "summary.md").read_text())]
    figures = [evaluation / "figures" / f"{name}.png" for name in FIGURES]
    sections += [_image(path.read_bytes(), path.stem) for path in figures if path.is_file()]
    sections.append("<h2>Held-out subjects</h2>")
    first_prediction = None
    for pair in shown.to_dict("records"):
        earlier_DHW, later_DHW = load_preprocessed(pair["earlier_path"])[0], load_preprocessed(pair["later_path"])[0]
        (mean, std, detail), = predictor.predict_preprocessed(earlier_DHW, pair["earlier_age"], [pair["later_age"]],
                                                         seed=seed, diagnosis=pair.get("diagnosis"))
        first_prediction = mean if first_prediction is None else first_prediction
        title = (f"{pair['subject_id']}: {pair['earlier_age']:.1f} -> {pair['later_age']:.1f} years "
                 f"({pair['years']:.1f} years)")
        figure = pair_figure(earlier_DHW, mean, later_DHW, std, detail)
        sections += [f"<h3>{html.escape(title)}</h3>", _image(_png(figure), title)]
    if len(shown):
        region = pd.read_csv(evaluation / "summary.csv")["region"].iloc[0]
        sections += ["<h2>Age sweep</h2>", sweep_section(predictor, run_dir, shown.iloc[0]["subject_id"], split,
                                                         config, region, seed)]
    if (run_dir / "brain_age" / "summary.md").is_file():
        sections += ["<h2>Brain age</h2>", markdown_tables((run_dir / "brain_age" / "summary.md").read_text())]
    sections += ["<h2>Training</h2>", _image(_png(training_figure(run_dir)), "training curves")]
    if first_prediction is not None:
        affine = load_preprocessed(shown.iloc[0]["earlier_path"])[1].affine
        sections += ["<h2>Interactive viewer (first subject's prediction)</h2>", viewer(first_prediction, affine)]
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>neuroar report</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}table{border-collapse:collapse;"
            "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}img{max-width:100%}"
            "</style></head><body>" + "\n".join(sections) + "</body></html>")
    out = run_dir / "report.html"
    write_text(out, page)
    return out


def pair_figure(earlier_DHW, predicted_DHW, later_DHW, std_DHW, detail_DHW) -> Figure:
    """The predicted change is the model's own (decoded prediction - decoded earlier scan, i.e. the
    detail-preserving output - the earlier scan), so the tokenizer's reconstruction error does not show as change."""
    rows = [("earlier scan", earlier_DHW, "gray", (0, 1)), ("prediction", predicted_DHW, "gray", (0, 1)),
            ("true follow-up", later_DHW, "gray", (0, 1)),
            ("predicted change", detail_DHW - earlier_DHW, "RdBu_r", (-0.15, 0.15)),
            ("true change", later_DHW - earlier_DHW, "RdBu_r", (-0.15, 0.15)),
            ("uncertainty (std)", std_DHW, "magma", (0, max(float(std_DHW.max()), 1e-3)))]
    figure = Figure(figsize=(3 * len(rows), 8), layout="constrained")
    axes = figure.subplots(3, len(rows))
    centre = np.array(earlier_DHW.shape) // 2
    for column, (name, volume, cmap, (low, high)) in enumerate(rows):
        for axis in range(3):
            axes[axis, column].imshow(np.rot90(np.take(volume, centre[axis], axis=axis)), cmap=cmap, vmin=low,
                                      vmax=high)
            axes[axis, column].axis("off")
        axes[0, column].set_title(name)
    return figure


def sweep_section(predictor: Predictor, run_dir: Path, subject: str, split: str, config, region: str,
                  seed: int) -> str:
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
    figure = Figure(figsize=(3 * len(predictions) + 4, 3.2), layout="constrained")
    axes = figure.subplots(1, len(predictions) + 1)
    axial = first_DHW.shape[2] // 2 + 4  # just above the centre: the lateral ventricles
    for axis, volume, years in zip(axes, predictions, SWEEP_YEARS):
        axis.imshow(np.rot90(volume[:, :, axial]), cmap="gray", vmin=0, vmax=1)
        axis.set_title("earlier scan" if years == 0 else f"+{years} years")
        axis.axis("off")
    axes[-1].plot([age, *targets], predicted, marker="o", label="predicted")
    axes[-1].plot(visits["age"], real, marker="s", linestyle="--", label="real scans")
    axes[-1].set_xlabel("age (years)")
    axes[-1].set_ylabel(f"{region.replace('_', ' ')} volume (mL)")
    axes[-1].legend(fontsize=8)
    return f"<p>Subject {html.escape(subject)}, first scan at {age:.1f} years.</p>" + _image(_png(figure), "sweep")


def training_figure(run_dir: Path) -> Figure:
    panels = [("tokenizer_train.csv", "l1", "tokenizer L1"), ("tokenizer_val.csv", "psnr_brain",
                                                              "tokenizer val PSNR in the brain"),
              ("neuroar_train.csv", "loss", "NeuroAR loss"), ("neuroar_val.csv", None, "NeuroAR val accuracy vs copy"),
              ("autoencoder_train.csv", "l1", "autoencoder L1"), ("ldm_train.csv", "mse", "LDM noise MSE"),
              ("stargan_train.csv", "generator", "StarGAN generator loss"),
              ("stargan_train.csv", "discriminator", "StarGAN discriminator loss")]
    figure = Figure(figsize=(16, 6.4), layout="constrained")
    for axis, (name, column, title) in zip(figure.subplots(2, len(panels) // 2).flat, panels):
        path = run_dir / name
        if path.is_file():
            log = pd.read_csv(path)
            marker = "." if len(log) < 20 else None
            if column is not None:
                axis.plot(log["step"], log[column], marker=marker)
            else:  # per scale: the model's teacher-forced accuracy (solid) against copying the earlier tokens
                for k in range(sum(c.endswith("_copy_accuracy") for c in log.columns)):
                    line, = axis.plot(log["step"], log[f"scale{k}_accuracy"], marker=marker, label=f"scale {k}")
                    axis.plot(log["step"], log[f"scale{k}_copy_accuracy"], ls="--", color=line.get_color())
                if axis.lines:
                    axis.legend(fontsize=7, title="dashed: copy", title_fontsize=7)
        axis.set_title(title)
        axis.set_xlabel("step")
    return figure


def viewer(volume_DHW: np.ndarray, affine: np.ndarray) -> str:
    from nilearn import plotting

    view = plotting.view_img(nib.Nifti1Image(volume_DHW.astype(np.float32), affine), bg_img=False, cmap="gray",
                             symmetric_cmap=False, threshold=None, black_bg=True, colorbar=False, vmin=0, vmax=1)
    page = view.get_standalone()
    page = "\n".join(line for line in page.splitlines() if "favicon" not in line)  # no fetch when offline
    return (f"<iframe srcdoc=\"{html.escape(page, quote=True)}\" width='100%' height='420' "
            "style='border:none'></iframe>")


def markdown_tables(text: str) -> str:
    """The evaluation summary (paragraphs and pipe tables) as HTML."""
    out, table = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                tag = "th" if not table else "td"
                table.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if table:
            out.append("<table>" + "".join(table) + "</table>")
            table = []
        if line.startswith("#"):
            continue
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    return "\n".join(out)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def _image(png: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
