"""The project's own command and the external tools its setup installs, as the tests run them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PHANTOM_SEED = 20240
PHANTOM_STUDIES = 8


def require_tool(name: str) -> str:
    """Path of an external tool that the project's setup installs; fail (not skip) without it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/setup.sh (it installs the Debian packages)")
    return path


def lumbar_node(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the installed ``lumbar-node`` console command."""
    exe = Path(sys.executable).with_name("lumbar-node")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=check, timeout=600)


def complete_study(phantom_dir: Path) -> list[Path]:
    """The files of the first phantom study that has Sagittal T1, Sagittal T2/STIR and Axial T2."""
    import pydicom

    for folder in sorted((phantom_dir / "train_images").iterdir()):
        descriptions = {pydicom.dcmread(next(s.glob("*.dcm")), stop_before_pixels=True).SeriesDescription
                        for s in folder.iterdir()}
        if {"Sagittal T1", "Sagittal T2/STIR", "Axial T2"} <= descriptions:
            return sorted(folder.rglob("*.dcm"))
    raise AssertionError("no complete phantom study")


#: A phantom study (seed, index) whose truth is Normal/Mild at every label and that the bundled
#: model grades Normal/Mild everywhere (checked with `lumbar-node predict`).
NORMAL_STUDY = (20240, 60)


def normal_study(out: Path) -> list[Path]:
    """Write the all-Normal/Mild phantom study under ``out`` (RSNA layout); its files."""
    from phantom.generate import make_study, write_study

    study = make_study(*NORMAL_STUDY)
    write_study(study, out)
    return sorted((out / "train_images" / str(study.study_id)).rglob("*.dcm"))
