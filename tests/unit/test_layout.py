"""The package arrows of the README, read from the code's imports, and one place for each concept."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dicom_node", "inference", "phantom", "training", "export", "demo")
#: package -> the packages of this project it may import (README, "Layout").
ALLOWED = {
    "inference": set(),
    "phantom": {"inference"},
    "dicom_node": {"inference"},
    "training": {"inference"},
    "export": {"training", "inference"},
    "demo": {"dicom_node", "phantom", "inference"},
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
    assert registered == {"demo": "demo", "phantom": "phantom", "prepare": "training", "train": "training",
                          "evaluate": "training",
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
    misplaced = [str(p.relative_to(tests)) for p in tests.rglob("test_*.py")
                 if p.relative_to(tests).parts[0] not in KINDS]
    assert misplaced == []
    assert not list(tests.rglob("bench_*.py")) or all(p.parent.name == "benchmarks" for p in tests.rglob("bench_*.py"))


# -- dicom_node's rooms ------------------------------------------------------------------------------

NODE = ROOT / "dicom_node"
#: The shared vocabulary at dicom_node's top level: every room may import it; it imports no room.
SHARED = frozenset({"config", "states", "errors", "tls"})
#: The composition root and the commands: they may import any room (and no room imports them).
TOP = frozenset({"service", "cli", "predict", "__init__"})
#: room -> the rooms it may import (besides itself and the shared modules); README, "Layout".
ROOM_ARROWS: dict[str, set[str]] = {
    "shared": set(),
    "observability": set(),
    "store": {"observability"},
    "ingest": {"store", "observability"},
    "dicom": {"ingest", "store", "observability"},
    "dicomweb": {"dicom", "ingest", "store", "observability"},  # dicom: the Q/R vocabulary (dicom.qr)
    "results": {"observability"},
    "pipeline": {"results", "store", "dicom", "dicomweb", "ingest", "observability"},  # ingest: what a fetch files
    "web": {"ingest", "store", "results", "dicomweb", "observability"},
}
ROOMS = frozenset(ROOM_ARROWS) - {"shared"}


def room_of(module: str) -> str:
    """The room of a dotted module name of dicom_node (``shared``, a room, or a top-level module)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    if parts[1] in ROOMS:
        return parts[1]
    return "shared" if parts[1] in SHARED else parts[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def node_imports(source: str) -> list[tuple[str, str | None]]:
    """(module, name) for every import of dicom_node in ``source`` (lazy and TYPE_CHECKING ones
    included); ``name`` is None for ``import dicom_node.x``. ``from dicom_node import x`` gives
    the module ``dicom_node.x``."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "dicom_node"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "dicom_node":
                found += [(f"dicom_node.{a.name}", None) for a in node.names]
            elif node.module.split(".")[0] == "dicom_node":
                found += [(node.module, a.name) for a in node.names]
    return found


def exported(room: str) -> set[str]:
    """A room's ``__all__``, read from its ``__init__.py``."""
    for node in ast.parse((NODE / room / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def room_problems(modules: dict[str, str]) -> tuple[list[str], dict[str, set[str]]]:
    """What breaks the rooms' rules among ``modules`` (dotted name -> source), and the room graph:
    an import against the arrows, a ``_private`` name taken from another room, a name taken from
    another room that the room does not export (its ``__all__``)."""
    problems, graph = [], {}
    for name, source in modules.items():
        mine = room_of(name)
        for module, imported in node_imports(source):
            theirs = room_of(module)
            if theirs == mine:
                continue
            graph.setdefault(mine, set()).add(theirs)
            if mine not in TOP and theirs != "shared" and theirs not in ROOM_ARROWS.get(mine, set()):
                problems.append(f"{name} imports {module} ({mine} -> {theirs})")
            if imported is not None and imported.startswith("_") and not imported.startswith("__"):
                problems.append(f"{name} imports the private {module}.{imported} of another room")
            elif imported is not None and theirs in ROOMS and imported not in exported(theirs):
                problems.append(f"{name} imports {module}.{imported}, which {theirs}/__init__.py does not export")
    return problems, graph


def node_modules() -> dict[str, str]:
    return {module_name(p): p.read_text() for p in sorted(NODE.rglob("*.py"))}


def test_the_rooms_follow_their_arrows_and_share_only_what_they_export() -> None:
    problems, _ = room_problems(node_modules())
    assert problems == []


def test_no_cycle_between_rooms() -> None:
    _, graph = room_problems(node_modules())

    def cycle_from(room: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in sorted(graph.get(room, ())):
            if nxt in path:
                return (*path, nxt)
            if (found := cycle_from(nxt, (*path, nxt))) is not None:
                return found
        return None

    cycles = [c for room in sorted(graph) if (c := cycle_from(room, (room,))) is not None]
    assert cycles == []
    assert not graph.get("shared"), "the shared modules import no room"


def test_the_room_checker_sees_wrong_arrows_private_names_and_unexported_names() -> None:
    modules = {
        "dicom_node.web.bad": "def f():\n    from dicom_node.service import Node\n",
        "dicom_node.results.bad": "from dicom_node.pipeline.worker import grade\n",
        "dicom_node.pipeline.bad": "from dicom_node.store.ledger import _private\n",
        "dicom_node.dicom.bad": "from dicom_node.store.ledger import SCHEMA\n",
        "dicom_node.config": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import dicom_node.web\n",
        "dicom_node.service": "from dicom_node.web.app import build_app\nfrom dicom_node.pipeline import Releaser\n",
    }
    problems, graph = room_problems(modules)
    assert len(problems) == 5, problems
    assert graph["shared"] == {"web"}


def test_every_room_says_what_it_is_for_and_exports_what_it_lists() -> None:
    import importlib

    for room in sorted(ROOMS):
        package = importlib.import_module(f"dicom_node.{room}")
        assert (package.__doc__ or "").strip(), f"dicom_node/{room}/__init__.py says what the room is for"
        assert exported(room), f"dicom_node/{room}/__init__.py lists its exports (__all__)"
        assert [n for n in exported(room) if not hasattr(package, n)] == []


def test_test_files_have_unique_names() -> None:
    """pytest imports test modules by their basename (tests/ folders are not packages): two files of
    one name in two folders stop the whole run at collection."""
    names = Counter(p.name for p in (ROOT / "tests").rglob("test_*.py") if "node_modules" not in p.parts)
    assert [name for name, n in names.items() if n > 1] == []
