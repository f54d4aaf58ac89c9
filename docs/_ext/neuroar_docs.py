"""Sphinx pieces that write the documentation's tables from their one source, at build time:

- ``neuroar-config``: the configuration reference, from the dataclasses of ``neuroar/config/schema.py`` (fields,
  types, defaults, the comments beside them) and the values each shipped config (``neuroar/configs/*.yaml``) sets;
- ``neuroar-cohorts``: the synthetic cohorts' aging rates, from ``neuroar.data.synth.aging.COHORTS``;
- ``study-table``: the study's tables, from ``results/study/{models,brain_age}.csv`` and ``machine.json``;
- the ``study`` role: one cell of those files in running text, e.g. {study}`models:elderly:copy:change_mae`;
- ``plain_docstring``: the package's docstrings, written as plain text with `code` in backticks, made into valid
  reStructuredText for autodoc (indented blocks become literal blocks, `*` and `|` are text).

Every number taken from a results file is written as ``<abbr title="FILE | COHORT | ROW | COLUMN">`` so that a
reader sees where it comes from, and tests/test_docs.py checks each against its cell.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import functools
import inspect
import io
import json
import math
import re
import tokenize
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective, SphinxRole

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "results" / "study"
FILES = {"models": "models.csv", "brain_age": "brain_age.csv", "seeds": "seeds.csv", "machine": "machine.json"}
ROW_KEYS = {"models": "model", "brain_age": "training", "seeds": "output"}  # the column that names a row

# -- tables -----------------------------------------------------------------------------------------------------


def _cell(content) -> nodes.entry:
    entry = nodes.entry()
    if isinstance(content, nodes.Node):
        entry += nodes.paragraph("", "", content)
    elif isinstance(content, list):
        entry += nodes.paragraph("", "", *content)
    else:
        entry += nodes.paragraph(text=str(content))
    return entry


def table(header: list, rows: list[list], classes: tuple[str, ...] = ()) -> nodes.table:
    """A docutils table (so it renders the same from Markdown and reStructuredText), marked as generated."""
    result = nodes.table(classes=["neuroar-generated", *classes])
    group = nodes.tgroup(cols=len(header))
    result += group
    group.extend(nodes.colspec(colwidth=1) for _ in header)
    head, body = nodes.thead(), nodes.tbody()
    head += nodes.row("", *(_cell(h) for h in header))
    body.extend(nodes.row("", *(_cell(c) for c in row)) for row in rows)
    group += head
    group += body
    return result


def inline_code(text: str) -> list[nodes.Node]:
    """Plain text in which `backticked` parts become literals (the schema's comments are written that way)."""
    parts = text.split("`")
    return [nodes.literal(text=p) if i % 2 else nodes.Text(p) for i, p in enumerate(parts) if p]


# -- the configuration reference --------------------------------------------------------------------------------


@functools.cache
def _schema_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment lines directly above the field and the comment on its line."""
    from neuroar.config import schema

    source = inspect.getsource(schema)
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    lines = source.splitlines()
    found = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            above, line = [], item.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            text = " ".join([*above, comments.get(item.lineno, "")]).strip()
            found[node.name, item.target.id] = text
    return found


@functools.cache
def _annotations() -> dict[tuple[str, str], str]:
    from neuroar.config import schema

    tree = ast.parse(inspect.getsource(schema))
    aliases = {n.targets[0].id: ast.unparse(n.value) for n in tree.body
               if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and n.targets[0].id == "Shape3"}
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    text = ast.unparse(item.annotation)
                    for alias, meaning in aliases.items():
                        text = re.sub(rf"\b{alias}\b", meaning, text)
                    found[node.name, item.target.id] = text
    return found


def _inherited(cls: type, name: str, table: dict[tuple[str, str], str]) -> str:
    """The entry of the nearest class in `cls`'s MRO that says something about `name`."""
    for klass in cls.__mro__:
        if table.get((klass.__name__, name)):
            return table[klass.__name__, name]
    return ""


def _docstring(cls: type) -> str:
    for klass in cls.__mro__[:-1]:  # not `object`'s
        doc = klass.__dict__.get("__doc__") or ""
        if doc and not doc.startswith(f"{klass.__name__}("):  # dataclasses write a signature when there is none
            return inspect.cleandoc(doc)
    return ""


def show(value) -> str:
    """A config value as one writes it on the command line (YAML flow style)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def shipped_configs() -> dict:
    from neuroar.config import load_config

    names = sorted(p.stem for p in (ROOT / "src" / "neuroar" / "configs").glob("*.yaml"))
    return {name: load_config(name) for name in names}


class ConfigReference(SphinxDirective):
    """Every config section and setting: its type, default, the values the shipped configs set, and its comment."""

    def run(self) -> list[nodes.Node]:
        from neuroar.config.schema import Config

        self.env.note_dependency(str(ROOT / "src" / "neuroar" / "config" / "schema.py"))
        shipped = shipped_configs()
        for name in shipped:
            self.env.note_dependency(str(ROOT / "src" / "neuroar" / "configs" / f"{name}.yaml"))
        default = Config()
        comments, annotations = _schema_comments(), _annotations()

        def settings(owner: type, fields, prefix: str, current, values: dict) -> nodes.definition_list:
            result = nodes.definition_list(classes=["neuroar-config"])
            for f in fields:
                value = getattr(current, f.name)
                term = nodes.term("", "", nodes.literal(text=prefix + f.name),
                                  nodes.Text(f"  {_inherited(owner, f.name, annotations)}, default "),
                                  nodes.literal(text=show(value)))
                comment = _inherited(owner, f.name, comments)
                if comment and comment[-1] not in ".)":
                    comment += "."
                body = nodes.paragraph("", "", *inline_code(comment))
                differ = [(n, getattr(v, f.name)) for n, v in values.items() if getattr(v, f.name) != value]
                if differ:
                    if body.children:
                        body += nodes.Text(" ")
                    body += nodes.emphasis(text="Shipped: ")
                    for i, (n, v) in enumerate(differ):
                        body += nodes.Text(f"{'; ' if i else ''}{n} ")
                        body += nodes.literal(text=show(v))
                    body += nodes.Text(".")
                definition = nodes.definition()
                if body.children:
                    definition += body
                result += nodes.definition_list_item("", term, definition)
            return result

        top = [f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(getattr(default, f.name))]
        output: list[nodes.Node] = [nodes.rubric(text="top level", ids=["config-top-level"]),
                                    settings(Config, top, "", default, shipped)]
        for f in dataclasses.fields(Config):
            section = getattr(default, f.name)
            if not dataclasses.is_dataclass(section):
                continue
            output.append(nodes.rubric("", "", nodes.literal(text=f.name), ids=[f"config-{f.name}"]))
            doc = _docstring(type(section))
            if doc:
                output.append(nodes.paragraph("", "", *inline_code(" ".join(doc.split()))))
            values = {n: getattr(c, f.name) for n, c in shipped.items()}
            output.append(settings(type(section), dataclasses.fields(section), f"{f.name}.", section, values))
        return output


# -- the synthetic cohorts --------------------------------------------------------------------------------------


class CohortRates(SphinxDirective):
    """The groups of every synthetic cohort with their share of subjects and annual rates at the pivot age."""

    def run(self) -> list[nodes.Node]:
        from neuroar.data.synth import aging

        self.env.note_dependency(aging.__file__)
        rates = [f.name for f in dataclasses.fields(aging.GroupRates)]
        header = ["cohort", "ages", "group", "share of subjects", *(f"{r.replace('_', ' ')} (%/year)" for r in rates),
                  "rates given at age", "acceleration (per year of age)", "subject's factor SD"]
        rows = []
        for cohort, spec in aging.COHORTS.items():
            for group, (share, group_rates) in spec.groups.items():
                rows.append([cohort, f"{spec.ages[0]:g}-{spec.ages[1]:g}", group, f"{share:g}",
                             *(f"{getattr(group_rates, r):+g}" for r in rates), f"{spec.pivot_age:g}",
                             f"{spec.acceleration:g}", f"{spec.subject_rate_sd:g}"])
        return [table(header, rows)]


# -- the study's results ----------------------------------------------------------------------------------------


@functools.cache
def study_rows(name: str) -> list[dict[str, str]]:
    with open(STUDY / FILES[name], newline="") as handle:
        return list(csv.DictReader(handle))


@functools.cache
def machine() -> dict:
    return json.loads((STUDY / FILES["machine"]).read_text())["cohorts"]


def lookup(name: str, cohort: str, row: str, column: str) -> float:
    """One cell: FILE (models, brain_age, seeds, machine), COHORT, ROW (model, training set, output of the main
    model, or `stage_seconds` for machine.json) and COLUMN (a CSV column, or a stage)."""
    if name == "machine":
        return float(machine()[cohort][row][column])
    matches = [r for r in study_rows(name) if r["cohort"] == cohort and r[ROW_KEYS[name]] == row]
    if len(matches) != 1 or column not in matches[0]:
        raise KeyError(f"{FILES[name]} has no single row {cohort!r} / {row!r} with a column {column!r}")
    cell = matches[0][column]
    return float(cell) if cell != "" else math.nan


def formatted(column: str, value: float) -> str:
    """How a results column is shown: p-values to two significant digits, SSIM and R2 to three and two
    decimals, seconds whole, the rest (dB, mL, r, years) to two decimals."""
    if math.isnan(value):
        return "–"
    if "_p_" in column or column.endswith("_holm"):
        text = f"{value:.2g}"
        return text if "." in text or "e" in text else f"{text}.0"
    if column.startswith("ssim"):
        return f"{value:.3f}"
    if column == "change_mean" or column == "true_change_mean":
        return f"{value:+.2f}"
    if column in ("pairs", "seeds"):
        return f"{value:.0f}"
    return f"{value:.2f}"


def value_node(name: str, cohort: str, row: str, column: str) -> nodes.Node:
    value = lookup(name, cohort, row, column)
    text = f"{value:.0f}" if name == "machine" else formatted(column, value)
    if text == "–":
        return nodes.Text(text)
    return nodes.abbreviation(text, text, explanation=f"{FILES[name]} | {cohort} | {row} | {column}")


BASE_NAMES = {"neuroar": "NeuroAR", "no-earlier": "NeuroAR without the earlier scan (ablation)",
              "diagnosis": "NeuroAR with diagnosis", "ldm": "LDM", "stargan": "latent StarGAN"}


def model_name(label: str) -> str:
    """`diagnosis+detail` -> `NeuroAR with diagnosis +detail`, `seed-1` -> `NeuroAR, seed 1`; copy and the
    tokenizer baselines as they are."""
    base, _, variant = label.partition("+")
    name = f"NeuroAR, seed {base.removeprefix('seed-')}" if re.fullmatch(r"seed-\d+", base) else BASE_NAMES.get(base, base)
    return name + (f" +{variant}" if variant else "")


def _cohorts(name: str) -> list[str]:
    return list(dict.fromkeys(r["cohort"] for r in study_rows(name)))


def _labels(name: str, key: str) -> list[str]:
    return list(dict.fromkeys(r[key] for r in study_rows(name)))


def _has(name: str, cohort: str, key: str, label: str) -> bool:
    return any(r["cohort"] == cohort and r[key] == label for r in study_rows(name))


class StudyTable(SphinxDirective):
    """A table of the study's results: ``:table: images`` (PSNR and SSIM), ``change`` (the aging region's change),
    ``seeds`` (the main model over its training seeds), ``brain_age`` or ``stages`` (seconds per stage)."""

    option_spec = {"table": directives.unchanged_required}

    def run(self) -> list[nodes.Node]:
        for name in FILES.values():
            self.env.note_dependency(str(STUDY / name))
        return [getattr(self, f"_{self.options['table']}")()]

    def _images(self) -> nodes.table:
        cohorts = _cohorts("models")
        header = ["output", *(f"{c}: {m}" for c in cohorts for m in ("PSNR (dB)", "SSIM"))]
        rows = [[model_name(label), *(value_node("models", c, label, m) if _has("models", c, "model", label) else "–"
                                      for c in cohorts for m in ("psnr", "ssim"))]
                for label in _labels("models", "model")]
        return table(header, rows)

    def _change(self) -> nodes.table:
        from neuroar.study import CHANGE_REGION

        cohorts = _cohorts("models")
        header = ["output", *(f"{c} ({CHANGE_REGION[c].replace('_', ' ')}): {m}" for c in cohorts
                              for m in ("r", "MAE (mL)", "mean change (mL)"))]
        rows = [[model_name(label), *(value_node("models", c, label, m) if _has("models", c, "model", label) else "–"
                                      for c in cohorts for m in ("change_r", "change_mae", "change_mean"))]
                for label in _labels("models", "model")]
        rows.append(["truth", *(x for c in cohorts for x in ("", "", value_node("models", c, "copy",
                                                                                 "true_change_mean")))])
        return table(header, rows)

    def _brain_age(self) -> nodes.table:
        def cell(cohort, training, metric):
            parts = [value_node("brain_age", cohort, training, metric), nodes.Text(" ± "),
                     value_node("brain_age", cohort, training, f"{metric}_std")]
            if training != "real":
                parts += [nodes.Text(" (p "), value_node("brain_age", cohort, training, f"{metric}_p_vs_real"),
                          nodes.Text(", Holm "),
                          value_node("brain_age", cohort, training, f"{metric}_p_vs_real_holm"), nodes.Text(")")]
            return parts

        rows = [[r["cohort"], r["training"], value_node("brain_age", r["cohort"], r["training"], "seeds"),
                 cell(r["cohort"], r["training"], "mae"), cell(r["cohort"], r["training"], "r2")]
                for r in study_rows("brain_age")]
        return table(["cohort", "training set", "seeds", "MAE (years)", "R2"], rows)

    def _seeds(self) -> nodes.table:
        def spread(cohort, output, metric):
            return [value_node("seeds", cohort, output, f"{metric}_mean"), nodes.Text(" ± "),
                    value_node("seeds", cohort, output, f"{metric}_std")]

        rows = [[r["cohort"], r["output"], value_node("seeds", r["cohort"], r["output"], "seeds"),
                 *(spread(r["cohort"], r["output"], m) for m in ("psnr", "change_r", "change_mae", "carried")),
                 value_node("seeds", r["cohort"], r["output"], "copy_change_mae")]
                for r in study_rows("seeds")]
        return table(["cohort", "output", "seeds", "PSNR (dB)", "change r", "change MAE (mL)", "carried",
                      "copy's MAE (mL)"], rows)

    def _stages(self) -> nodes.table:
        cohorts = list(machine())
        stages = sorted({s for c in cohorts for s in machine()[c]["stage_seconds"]},
                        key=lambda s: -max(machine()[c]["stage_seconds"].get(s, 0) for c in cohorts))
        rows = [[s, *(value_node("machine", c, "stage_seconds", s) if s in machine()[c]["stage_seconds"] else "–"
                      for c in cohorts)] for s in stages]
        return table(["stage", *(f"{c} (s)" for c in cohorts)], rows)


class StudyRole(SphinxRole):
    """{study}`FILE:COHORT:ROW:COLUMN`: one cell of the study's results, e.g. models:elderly:copy:change_mae."""

    def run(self) -> tuple[list[nodes.Node], list[nodes.system_message]]:
        parts = self.text.split(":")
        if len(parts) != 4 or parts[0] not in FILES:
            message = self.inliner.reporter.error(f"study role: expected FILE:COHORT:ROW:COLUMN with FILE one of "
                                                  f"{', '.join(FILES)}, got {self.text!r}", line=self.lineno)
            return [], [message]
        try:
            return [value_node(*parts)], []
        except KeyError as err:
            return [], [self.inliner.reporter.error(f"study role: {err}", line=self.lineno)]


# -- docstrings ------------------------------------------------------------------------------------------------

def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _escape(text: str) -> str:
    """Plain prose as reStructuredText: `code` spans stay code (whatever touches them), `*`, `|` and a
    trailing `_` are text."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick is a character, not markup
        return re.sub(r"([*|`])", r"\\\1", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"\\ `{part}`\\ ")
        else:
            part = re.sub(r"([*|])", r"\\\1", part)
            out.append(re.sub(r"(\w)_(?=\W|$)", r"\1\\_", part))
    return "".join(out)


def plain_docstring(lines: list[str]) -> list[str]:
    """A docstring's lines (already dedented by autodoc) as reStructuredText: a block indented after a blank line
    becomes a literal block (a file listing, pseudo-code), a line indented deeper than its paragraph without a
    blank line joins the paragraph, a bullet's continuation lines line up with its text."""
    out: list[str] = []
    paragraph: list[str] = []
    literal = False

    def flush():
        if paragraph:
            out.extend(_escape("\n".join(paragraph)).split("\n"))
            paragraph.clear()

    for line in lines:
        if not line.strip():
            flush()
            out.append("")
            continue
        indent = _indent(line)
        if literal and indent > 0:
            out.append(line)
            continue
        literal = False
        if indent > 0 and not paragraph and out and not out[-1].strip():
            previous = next((x for x in reversed(out) if x.strip()), None)
            if previous is not None and not previous.lstrip().startswith("- "):
                if previous.endswith(":") and not previous.endswith("::"):
                    index = len(out) - 1 - out[::-1].index(previous)
                    out[index] = previous + ":"
                else:
                    out.extend(["::", ""])
                literal = True
                out.append(line)
                continue
        if paragraph:
            first = paragraph[0]
            content = _indent(first) + (2 if first.lstrip().startswith("- ") else 0)
            if line.lstrip().startswith("- ") and indent <= _indent(first):
                flush()
            elif indent != content:
                line = " " * content + line.lstrip()
        paragraph.append(line)
    flush()
    return out


def _process_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    lines[:] = plain_docstring(lines)


def setup(app):
    app.connect("autodoc-process-docstring", _process_docstring)
    app.add_directive("neuroar-config", ConfigReference)
    app.add_directive("neuroar-cohorts", CohortRates)
    app.add_directive("study-table", StudyTable)
    app.add_role("study", StudyRole())
    return {"parallel_read_safe": True, "parallel_write_safe": True}
