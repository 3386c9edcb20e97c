"""The package arrows of the README, read from the code's imports, and one place for each concept."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dicom_node", "inference", "phantom", "training", "export")
#: package -> the packages of this project it may import (README, "Layout").
ALLOWED = {
    "inference": set(),
    "phantom": {"inference"},
    "dicom_node": {"inference", "phantom"},
    "training": {"inference"},
    "export": {"training", "inference"},
}


def imported_packages(path: Path) -> set[str]:
    """The project packages a module imports, at any depth of its code (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & set(PACKAGES)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_follow_the_arrows(package: str) -> None:
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported_packages(path) - ALLOWED[package] - {package}
        if bad:
            wrong[str(path.relative_to(ROOT))] = sorted(bad)
    assert not wrong, f"imports against the arrows: {wrong}"


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from training.train import train\n    import export.cli\n")
    assert imported_packages(module) == {"training", "export"}


def test_commands_of_other_packages_join_through_entry_points() -> None:
    from importlib.metadata import entry_points

    from dicom_node.cli import COMMAND_GROUP, main

    registered = {e.name: e.value.split(":")[0].split(".")[0] for e in entry_points(group=COMMAND_GROUP)}
    assert registered == {"phantom": "phantom", "prepare": "training", "train": "training", "evaluate": "training",
                          "calibrate-levels": "training", "export": "export"}
    assert set(registered) | {"serve", "predict", "demo", "status", "reprocess", "config"} <= set(main.commands)


def test_the_version_is_the_distributions() -> None:
    from importlib.metadata import version

    import dicom_node
    import inference

    assert dicom_node.__version__ == inference.__version__ == version("lumbar-node")


def test_every_test_file_lives_in_the_folder_of_its_kind() -> None:
    from tests.conftest import KINDS

    tests = ROOT / "tests"
    misplaced = [str(p.relative_to(tests)) for p in tests.rglob("test_*.py") if p.relative_to(tests).parts[0] not in KINDS]
    assert misplaced == []
    assert not list(tests.rglob("bench_*.py")) or all(p.parent.name == "benchmarks" for p in tests.rglob("bench_*.py"))
