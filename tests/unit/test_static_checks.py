"""The static checks configured in pyproject.toml, run as tests (so CI's pytest runs them): ruff finds nothing
in the repository, mypy nothing in the typed packages (strict on the serving ones, dicom_node and inference),
and every `noqa` or `type: ignore` names its check and says why."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tokenize
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Packages mypy finds nothing in: strict on dicom_node and inference, the lenient config on the rest.
TYPED = ("dicom_node", "inference", "export", "demo", "phantom", "training")
#: Folders that hold no code of the project's own (the suppression review skips them).
_NOT_OURS = {"node_modules", "__pycache__", "build", "dist"}

#: A suppression names its codes, then gives a reason after " - " or "  # ".
_NOQA = re.compile(r"#\s*noqa\b(?P<codes>:\s*[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*)?(?P<rest>.*)", re.IGNORECASE)
_TYPE_IGNORE = re.compile(r"#\s*type:\s*ignore\b(?P<codes>\[[a-z0-9_,\s-]+\])?(?P<rest>.*)")
_REASON = re.compile(r"\s*(?:-|#)\s*(?!noqa\b|type:)\w")


def _tool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <tool> ...`` from the repository root; a missing tool is a clear failure."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if "No module named" in proc.stderr:
        pytest.fail(f"{args[0]} is not installed in this environment: pip install -e '.[dev]'\n{proc.stderr}")
    return proc


def _by_package(lines: list[str]) -> dict[str, list[str]]:
    """Finding lines (``path:line:...``) grouped by the top-level folder of their path."""
    found: dict[str, list[str]] = defaultdict(list)
    for line in lines:
        path = line.split(":", 1)[0].replace("\\", "/")
        found[path.split("/", 1)[0]].append(line)
    return found


@pytest.fixture(scope="module")
def mypy_findings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """One mypy run over the typed packages (the modules they import are checked too, and
    reported under their own package)."""
    cache = tmp_path_factory.mktemp("mypy") / ".mypy_cache"
    proc = _tool("mypy", "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(cache),
                 "--no-error-summary", "--no-pretty", *TYPED)
    assert proc.returncode in (0, 1), f"mypy failed to run (exit {proc.returncode}):\n{proc.stderr}{proc.stdout}"
    return _by_package([line for line in proc.stdout.splitlines() if ": error:" in line or ": note:" in line])


def test_ruff_finds_nothing_in_the_repository() -> None:
    """Every Python file of the repository (ruff's own exclusions aside: .venv, node_modules, ...)."""
    proc = _tool("ruff", "check", "--no-cache", "--quiet", "--output-format", "concise", ".")
    assert proc.returncode in (0, 1), f"ruff failed to run (exit {proc.returncode}):\n{proc.stderr}{proc.stdout}"
    found = _by_package(proc.stdout.splitlines())
    assert not found, f"ruff: {sum(map(len, found.values()))} findings in {', '.join(sorted(found))}:\n" + \
        "\n".join(line for lines in found.values() for line in lines)


@pytest.mark.parametrize("package", TYPED)
def test_mypy_finds_nothing(mypy_findings: dict[str, list[str]], package: str) -> None:
    found = mypy_findings.get(package, [])
    errors = sum(": error:" in line for line in found)
    assert not found, f"mypy: {errors} errors in {package}/:\n" + "\n".join(found)


def python_files(root: Path) -> list[Path]:
    """The repository's own Python files: hidden folders (.venv, .git), node_modules and build output left out."""
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d not in _NOT_OURS
                               and not d.endswith(".egg-info"))
        files += [Path(folder) / name for name in sorted(names) if name.endswith(".py")]
    return files


def suppressions_without_reason(path: Path) -> list[str]:
    """``path:line: comment`` for each ``noqa`` or ``type: ignore`` comment that lacks its codes or a reason."""
    bad = []
    with tokenize.open(path) as f:
        for token in tokenize.generate_tokens(f.readline):
            if token.type != tokenize.COMMENT:
                continue
            matches = [m for m in (_NOQA.search(token.string), _TYPE_IGNORE.search(token.string)) if m]
            if any(not (m["codes"] and _REASON.match(m["rest"])) for m in matches):
                shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                bad.append(f"{shown}:{token.start[0]}: {token.string}")
    return bad


def test_every_suppression_in_the_repository_names_its_check_and_says_why() -> None:
    files = python_files(ROOT)
    assert ROOT / "dicom_node" / "cli.py" in files and ROOT / "tests" / "unit" / "test_static_checks.py" in files
    bad = [line for path in files for line in suppressions_without_reason(path)]
    assert not bad, "suppressions without a code or a reason:\n" + "\n".join(bad)


def test_the_suppression_check_reads_comments_only(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "a = 1  # noqa: E501 - a table row\n"
        "b = 2  # type: ignore[attr-defined]  # pydicom's dynamic attribute\n"
        "c = 3  # noqa\n"
        "d = 4  # noqa: BLE001\n"
        "e = 5  # type: ignore\n"
        "f = 6  # type: ignore[override]  # noqa: E501\n"
        "g = '# noqa'\n"
    )
    found = [line.split(":")[1] for line in suppressions_without_reason(module)]
    assert found == ["3", "4", "5", "6"]


def test_the_file_walk_leaves_out_what_is_not_the_projects(tmp_path: Path) -> None:
    for name in ("pkg/a.py", "pkg/node_modules/x/b.py", ".venv/lib/c.py", "pkg/__pycache__/d.py", "x.egg-info/e.py",
                 "f.py", "pkg/g.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert [p.relative_to(tmp_path).as_posix() for p in python_files(tmp_path)] == ["f.py", "pkg/a.py"]
