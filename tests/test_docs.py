"""The documentation builds with warnings as errors (a broken link or a stale reference fails), every number it
states about the study is the cell of the results file it names, and the README's claims stand: its status
box's numbers are in the files it cites, its commands parse, its Python imports exist."""

import csv
import dataclasses
import json
import re
import shlex
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from neuroar.cli import _parser
from neuroar.config.schema import Config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DECIMAL = re.compile(r"(?<![\w.])-?\d+\.\d+(?![\w.])")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    result = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                             str(ROOT / "docs"), str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


class Article(HTMLParser):
    """The main text of a built page (Furo's <article>), with the numbers the docs generated (<abbr title=...>)
    set apart: `values` holds (title, text) pairs, `text` everything else."""

    def __init__(self):
        super().__init__()
        self.depth, self.abbr, self.values, self.chunks = 0, None, [], []

    def handle_starttag(self, tag, attrs):
        if tag == "article" or self.depth:
            self.depth += tag not in ("br", "img", "hr", "col", "input", "meta", "link")
        if self.depth and tag == "abbr":
            self.abbr = [dict(attrs).get("title", ""), ""]

    def handle_endtag(self, tag):
        if self.depth and tag == "abbr" and self.abbr:
            self.values.append(tuple(self.abbr))
            self.abbr = None
        if self.depth and tag not in ("br", "img", "hr", "col", "input", "meta", "link"):
            self.depth -= 1

    def handle_data(self, data):
        if self.abbr is not None:
            self.abbr[1] += data
        elif self.depth:
            self.chunks.append(data)

    @property
    def text(self) -> str:
        return " ".join(self.chunks)


def article(page: Path) -> Article:
    parser = Article()
    parser.feed(page.read_text())
    return parser


def cell(file: str, cohort: str, row: str, column: str) -> float:
    """The results file's cell, read independently of the documentation's extension."""
    path = ROOT / "results" / "study" / file
    if file.endswith(".json"):
        return float(json.loads(path.read_text())["cohorts"][cohort][row][column])
    label = {"models.csv": "model", "brain_age.csv": "training", "seeds.csv": "output"}[file]
    with open(path, newline="") as handle:
        (match,) = [r for r in csv.DictReader(handle) if r["cohort"] == cohort and r[label] == row]
    return float(match[column])


def agrees(shown: str, value: float) -> bool:
    """`shown` is `value` rounded to the digits it shows."""
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return abs(float(shown) - value) <= 0.5 * 10**-decimals + 1e-9


def test_docs_build_with_every_config_setting_and_every_benchmark(built):
    for page in ("index", "usage", "data", "method", "configuration", "evaluation", "study", "study_evaluations",
                 "scaling", "synthetic_cohort", "api", "benchmarks/index", "benchmarks/results"):
        assert (built / f"{page}.html").is_file(), page
    benchmarks = (ROOT / "benchmarks").glob("*.md")
    assert [b.name for b in benchmarks if not (built / "benchmarks" / f"{b.stem.lower()}.html").is_file()] == []
    text = article(built / "configuration.html").text
    config = Config()
    for section in dataclasses.fields(Config):
        value = getattr(config, section.name)
        keys = [f"{section.name}.{f.name}" for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value) \
            else [section.name]
        assert all(key in text for key in keys), [key for key in keys if key not in text]


@pytest.mark.parametrize("page", ["study", "index"])
def test_every_study_number_in_the_docs_is_its_cell(built, page):
    found = article(built / f"{page}.html")
    assert len(found.values) >= (150 if page == "study" else 3)
    wrong = []
    for title, shown in found.values:
        file, cohort, row, column = title.split(" | ")
        value = cell(file, cohort, row, column)
        if not agrees(shown, value):
            wrong.append(f"{shown} is not {title} = {value}")
    assert wrong == []
    if page == "study":  # every model and cohort of models.csv is shown, and no number that is not read from a file
        with open(ROOT / "results" / "study" / "models.csv", newline="") as handle:
            rows = {(r["cohort"], r["model"]) for r in csv.DictReader(handle)}
        # change_mae: every output has one (the volume trend has no image, so no PSNR)
        shown = {tuple(t.split(" | ")[1:3]) for t, _ in found.values if t.startswith("models.csv") and
                 t.endswith(" | change_mae")}
        assert shown == rows
        assert DECIMAL.findall(found.text) == []


def status_items() -> list[str]:
    """The README status box's bullets and paragraphs that state numbers, each joined into one line."""
    box = README.split("<!-- status -->", 1)[1].split("<!-- /status -->", 1)[0]
    items: list[str] = []
    for line in box.splitlines():
        text = line.removeprefix(">").strip()
        if not text or text.startswith("- ") or not items:
            items.append("")
        items[-1] += " " + text
    return [item.strip() for item in items if DECIMAL.search(item)]


def test_readme_status_numbers_are_in_the_files_they_cite():
    lines = status_items()
    assert len(lines) >= 4
    for line in lines:
        cited = re.findall(r"`([\w./-]+\.(?:csv|md|json|py))`", line)
        assert cited, f"a status line states numbers without a file: {line}"
        text = (ROOT / cited[0]).read_text()
        numbers = [n for n in DECIMAL.findall(line) if not any(n in c for c in cited)]
        if cited[0].endswith(".csv"):
            cells = [float(v) for r in csv.reader(text.splitlines()[1:]) for v in r if re.fullmatch(r"-?[\d.e-]+", v)]
            missing = [n for n in numbers if not any(agrees(n, v) for v in cells)]
        else:
            missing = [n for n in numbers if not re.search(rf"(?<![\d.]){re.escape(n)}(?![\d])", text)]
        assert missing == [], f"{cited[0]} has no {missing}: {line}"


def test_readme_fits_three_screens():
    assert len(README.splitlines()) <= 200


def command_lines(markdown: str) -> list[list[str]]:
    """Every `neuroar ...` command of a Markdown text: each line of its code blocks (continuations joined, also after
    `torchrun ... -m`) and each inline command with an option; placeholders (`...`, `[...]`, `COMMAND`) skipped."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", markdown, flags=re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    lines += [c for c in re.findall(r"`(neuroar [^`]+)`", markdown) if " --" in c.replace("\n", " ")]
    commands = []
    for line in lines:
        words = shlex.split(line, comments=True)
        start = next((i for i, w in enumerate(words) if w == "neuroar" or w.endswith("/neuroar")), None)
        if start is None or "..." in line or "[" in line or not words[start + 1:]:
            continue
        if words[start + 1].isupper():
            continue
        commands.append(words[start:])
    return commands


@pytest.mark.parametrize("source", ["README.md", "docs/usage.md", "docs/scaling.md", "docs/synthetic_cohort.md"])
def test_every_command_shown_parses(source):
    commands = command_lines((ROOT / source).read_text())
    assert commands
    parser = _parser()
    for words in commands:
        args, extra = parser.parse_known_args(words[1:])
        assert all("=" in e and not e.startswith("-") for e in extra), (source, words, extra)


def test_readme_python_imports_exist():
    code = "\n".join(re.findall(r"```python\n(.*?)```", README, flags=re.S))
    imports = "\n".join(line for line in code.splitlines() if line.startswith(("from ", "import ")))
    assert imports
    exec(imports, {})
