"""The floor plan in docs/api.md ("Code layout") is the import graph: no module imports from a floor above its own."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "neuroar"


def floors() -> dict[str, int]:
    """Top-level module or folder of the package -> its floor, from the code layout's numbered list."""
    layout = (ROOT / "docs" / "api.md").read_text().split("## Code layout", 1)[1].split("\n## ", 1)[0]
    result = {}
    for number, names in re.findall(r"^(\d+)\. (.*)$", layout, flags=re.M):
        for name in re.findall(r"`([\w.]+)`", names.split(":")[0]):
            result[name] = int(number)
    return result


def top_level(module: str) -> str:
    """`neuroar.models.quantizer` -> `models`; `neuroar` -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[int, str]]:
    """Every neuroar module a file imports (at any depth), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "neuroar":
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "neuroar"]
    return found


def violations(floor: dict[str, int]) -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        own = relative.parts[0].removesuffix(".py")
        if own not in floor:
            problems.append(f"{relative}: not on any floor of docs/api.md's code layout")
            continue
        for line, module in imports(path):
            other = top_level(module)
            if other not in floor:
                problems.append(f"{relative}:{line} imports {module}, which is on no floor")
            elif floor[other] > floor[own]:
                problems.append(f"{relative}:{line} ({own}, floor {floor[own]}) imports {module} "
                                f"({other}, floor {floor[other]})")
    return problems


def test_no_module_imports_from_a_floor_above_its_own():
    floor = floors()
    assert {"errors", "config", "models", "runs", "data", "train", "predict", "evaluate", "cli"} <= set(floor)
    assert violations(floor) == []


def test_the_check_sees_an_upward_import():
    # The trainers import data and never the reverse: with the two floors swapped, their imports break the plan.
    floor = floors()
    floor["data"], floor["train"] = floor["train"], floor["data"]
    assert any(problem.startswith("train/") for problem in violations(floor))

