"""Kaggle-style phantom studies (``lumbar-node phantom --style kaggle``: encoded as the RSNA 2024
competition files are) and their "PACS-style copy": what a PACS holds after importing such files,
with the SOP Class UID (taken from the file meta, as a PACS does) and the Modality added to the data
set, everything else as in the Kaggle files (the Enhanced MR class of single-frame images, the SOP
Instance UIDs repeated across series, a frame of reference per series, RLE Lossless)."""

from __future__ import annotations

import csv
from pathlib import Path

import pydicom
from pydicom import dcmwrite

from inference.rsna_layout import IMAGES_DIR, SERIES_CSV
from tests.support.tools import PHANTOM_SEED, lumbar_node

KAGGLE_STUDIES = 2  # the first complete one is the study the tests use
ROLES = ("Sagittal T1", "Sagittal T2/STIR", "Axial T2")


def make_kaggle_phantom(out: Path, studies: int = KAGGLE_STUDIES, seed: int = PHANTOM_SEED) -> Path:
    """A Kaggle-style phantom data set made by the real command line."""
    lumbar_node("phantom", "--style", "kaggle", "--studies", str(studies), "--seed", str(seed), "--out", str(out),
                "--workers", "2")
    return out


def kaggle_study(data: Path) -> list[Path]:
    """The files of the first study of a Kaggle-style data set with all three series. The roles
    come from train_series_descriptions.csv (the files say only "T1" or "T2")."""
    roles: dict[str, set[str]] = {}
    with open(data / SERIES_CSV, newline="") as f:
        for row in csv.DictReader(f):
            roles.setdefault(row["study_id"], set()).add(row["series_description"])
    for study_id in sorted(roles):
        if set(ROLES) <= roles[study_id]:
            return sorted((data / IMAGES_DIR / study_id).rglob("*.dcm"))
    raise AssertionError("no complete Kaggle-style phantom study")


def pacs_style_copy(files: list[Path], out: Path) -> list[Path]:
    """Copies of Kaggle-style files as a PACS would hold them: SOPClassUID (from the file meta's
    MediaStorageSOPClassUID) and Modality "MR" added, nothing else changed; written under ``out`` as
    <study_id>/<series_id>/<n>.dcm."""
    written = []
    root = Path(*_common_parts(files)).parent
    for path in files:
        ds = pydicom.dcmread(path)
        assert "SOPClassUID" not in ds and "Modality" not in ds, f"{path} is not a Kaggle-style file"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.Modality = "MR"
        target = out / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        dcmwrite(target, ds, enforce_file_format=False)  # the file meta as it was (no group length)
        written.append(target)
    return written


def _common_parts(files: list[Path]) -> tuple[str, ...]:
    parts = files[0].parent.parts
    for path in files[1:]:
        other = path.parent.parts
        n = 0
        while n < min(len(parts), len(other)) and parts[n] == other[n]:
            n += 1
        parts = parts[:n]
    return parts
