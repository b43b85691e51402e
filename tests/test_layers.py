"""The import graph of ``ltdist`` has floors and no upward import: a module imports only from
floors below its own (or from its own package), so the base modules load in both environments
and a data or evaluation change never drags in training or generation."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.both_envs

PACKAGE = Path(__file__).resolve().parents[1] / "ltdist"
FLOORS = [
    {"entry"},
    {"config", "storage", "distributed", "provenance"},
    {"labels"},
    {"data", "eval", "losses"},
    {"models", "stag"},
    {"train", "reference_cnn"},
    {"rehearsal"},
    {"cli", "stag_gen"},  # the commands
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}


def _unit(module: str) -> str:
    """'ltdist.data.loader' -> 'data'; 'ltdist.labels' -> 'labels'."""
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ltdist":
                found |= {a.name for a in node.names}
            elif node.module.startswith("ltdist."):
                found.add(_unit(node.module))
        elif isinstance(node, ast.Import):
            found |= {_unit(a.name) for a in node.names if a.name.startswith("ltdist.")}
    return found


def test_every_unit_has_a_floor():
    units = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    units |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert units == set(FLOOR), "give the new module a floor in FLOORS"


def test_no_upward_import():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if own == "__init__":
            continue
        for target in _imports(path) - {own}:
            if FLOOR[target] >= FLOOR[own]:
                upward.append(f"{rel} imports ltdist.{target}")
    assert upward == []
