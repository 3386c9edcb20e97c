"""Shared fixtures, and markers by kind: every test is marked by the folder it lives in.

    tests/unit/         unit tests (small test doubles at most)            -m unit
    tests/integration/  real DCMTK, dicom3tools, PixelMed, Orthanc peers   -m integration
    tests/e2e/          the node as a process, the demo                    -m e2e

``pytest -m "not e2e"`` is the fast loop.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.kaggle import make_kaggle_phantom
from tests.support.tools import PHANTOM_SEED, PHANTOM_STUDIES, lumbar_node

KINDS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        kind = Path(item.fspath).relative_to(root).parts[0]
        if kind in KINDS:  # tests/unit/test_layout.py checks that every test file is in one of them
            item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom data set made once per test session by the real command line."""
    out = tmp_path_factory.mktemp("phantom")
    lumbar_node("phantom", "--studies", str(PHANTOM_STUDIES), "--seed", str(PHANTOM_SEED), "--out", str(out),
                "--workers", "2", "--preview", str(out / "preview.png"))
    return out


@pytest.fixture(scope="session")
def kaggle_real_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Kaggle-style phantom studies at the RSNA 2024 set's sizes (``--matrix real``), with a preview,
    made once per test session by the real command line."""
    out = tmp_path_factory.mktemp("kaggle-real")
    return make_kaggle_phantom(out, 2, PHANTOM_SEED, "real", "--preview", str(out / "preview.png"))
