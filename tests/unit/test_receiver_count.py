"""The default number of receiver processes: the CPU count, at least one; ``node.receivers`` wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import load_settings
from dicom_node.dicom import receiver_count


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 2), (3, 3), (16, 16), (None, 1)])
def test_the_cpu_count_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpus: int | None,
                                  expected: int) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    settings = load_settings(environ={"LUMBAR_NODE__STORAGE__SPOOL_DIR": str(tmp_path / "spool")})
    assert settings.node.receivers is None
    assert receiver_count(settings) == expected


def test_the_setting_wins(tmp_path: Path) -> None:
    settings = load_settings(environ={"LUMBAR_NODE__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
                                      "LUMBAR_NODE__NODE__RECEIVERS": "3"})
    assert receiver_count(settings) == 3
