"""Kaggle-style phantom studies (``lumbar-node phantom --style kaggle``: encoded as the RSNA 2024
competition files are) and their "PACS-style copy": what a PACS holds after importing such files,
with the SOP Class UID (taken from the file meta, as a PACS does) and the Modality added to the data
set, everything else as in the Kaggle files (the Enhanced MR class of single-frame images, the SOP
Instance UIDs repeated across series, a frame of reference per series, RLE Lossless)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom import dcmwrite

from dicom_node.results.sources import image_key
from inference.rsna_layout import IMAGES_DIR, SERIES_CSV
from tests.support.tools import PHANTOM_SEED, lumbar_node

KAGGLE_STUDIES = 2  # the first complete one is the study the tests use
ROLES = ("Sagittal T1", "Sagittal T2/STIR", "Axial T2")


def make_kaggle_phantom(out: Path, studies: int = KAGGLE_STUDIES, seed: int = PHANTOM_SEED,
                        matrix: str = "small", *extra: str) -> Path:
    """A Kaggle-style phantom data set made by the real command line, its images of the ``matrix``
    sizes (``real``: the RSNA 2024 set's)."""
    lumbar_node("phantom", "--style", "kaggle", "--studies", str(studies), "--seed", str(seed), "--out", str(out),
                "--workers", "2", "--matrix", matrix, *extra)
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


def assert_heatmaps_on_their_own_series(scs: list[pydicom.Dataset], results_json: Path, sources: list[Path]) -> None:
    """Each Secondary Capture's picture is the image its label was graded on (results.json names
    its series), not the image with the same SOP Instance UID in another series: its greyscale
    correlates best with that one. At least one heatmap is on an image whose UID repeats."""
    labels = {f"{item['level']} {item['condition']}": item for item in json.loads(results_json.read_text())["labels"]
              if item["assessed"]}
    by_key = {image_key(pydicom.dcmread(p, stop_before_pixels=True)): p for p in sources}
    repeated = 0
    assert scs, "no Secondary Capture"
    for sc in scs:
        item = labels[sc.ImageComments.split(". ")[0]]
        sop = sc.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert sop == item["sop_instance_uid"]
        candidates = {series: p for (series, uid), p in by_key.items() if uid == sop}
        assert item["series_uid"] in candidates
        repeated += len(candidates) > 1
        grey = sc.pixel_array.astype(np.float32).mean(axis=2)
        rows = grey.shape[0]
        band = slice(rows // 5, rows - rows // 5)  # away from the text bands

        def score(path: Path, grey: np.ndarray = grey, band: slice = band) -> float:
            image = pydicom.dcmread(path).pixel_array.astype(np.float32)
            resized = cv2.resize(image, (grey.shape[1], grey.shape[0]), interpolation=cv2.INTER_LINEAR)
            return float(np.corrcoef(resized[band].ravel(), grey[band].ravel())[0, 1])

        scores = {series: score(p) for series, p in candidates.items()}
        assert max(scores, key=lambda s: scores[s]) == item["series_uid"], (sc.ImageComments, scores)
    assert repeated > 0, "no heatmap on an image whose SOP Instance UID another series repeats"
