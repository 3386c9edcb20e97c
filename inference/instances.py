"""The one reader of DICOM headers, for a folder (``predict``) and for a spooled study (the node),
and what the analysis asks of every header whatever its source: its SOP class and whether it is MR.

Real files are untidy: the RSNA 2024 Kaggle files carry their SOP class only in the file meta
(which says Enhanced MR although each file is a classic single-frame MR image) and have no Modality.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
)

log = structlog.stdlib.get_logger(__name__)

#: An instance as the analysis takes it: its header (pixels read from the path when needed).
Instance = tuple[Dataset, Path]

#: The SOP classes of MR images: the only ones graded (``is_mr``); the Modality highdicom needs for
#: an Image Library entry (see dicom_node.results.sources).
MR_SOP_CLASSES: frozenset[UID] = frozenset(
    {MRImageStorage, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage}
)


def sop_class_uid(ds: Dataset) -> str:
    """The SOP class: the data set's SOPClassUID, else the file meta's MediaStorageSOPClassUID, else ""."""
    value = ds.get("SOPClassUID")
    if not value:
        meta = getattr(ds, "file_meta", None)
        value = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    return str(value or "")


def is_mr(ds: Dataset) -> bool:
    """An MR image the node may grade: of an MR image storage class (MR, Enhanced MR, Legacy
    Converted Enhanced MR; the data set's SOPClassUID, else the file meta's), with Modality MR
    where a Modality is given (the Kaggle files have none). A Secondary Capture holding an MR image
    (Modality MR) is not one, nor is a file that names no SOP class."""
    if sop_class_uid(ds) not in MR_SOP_CLASSES:
        return False
    modality = ds.get("Modality")
    return not modality or str(modality) == "MR"


def is_single_frame_image(ds: Dataset) -> bool:
    """A classic image, known by its shape, not by its class UID: one frame, its plane and position
    at the top level (no functional groups). Files labelled Enhanced MR are often such images."""
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return False
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return False
    return frames == 1 and "ImageOrientationPatient" in ds and "ImagePositionPatient" in ds


def read_headers(paths: Iterable[Path | str]) -> list[Instance]:
    """The headers of these files, pixels left on disk; an unreadable file is logged and left out.
    A header without SOPClassUID gets the file meta's (a log line says how many)."""
    headers: list[Instance] = []
    from_meta = 0
    for name in paths:
        path = Path(name)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as exc:
            log.warning("left out a file that is not readable DICOM", path=str(path), error=str(exc))
            continue
        if "SOPClassUID" not in ds and sop_class_uid(ds):
            ds.SOPClassUID = sop_class_uid(ds)
            from_meta += 1
        headers.append((ds, path))
    if from_meta:
        log.info("SOP class taken from the file meta: the data sets have none", instances=from_meta)
    return headers


def read_folder(folder: Path) -> dict[str, list[Instance]]:
    """The images with geometry under ``folder`` (recursively), grouped by StudyInstanceUID."""
    studies: dict[str, list[Instance]] = defaultdict(list)
    for ds, path in read_headers(sorted(p for p in folder.rglob("*") if p.is_file())):
        if "StudyInstanceUID" in ds and "ImageOrientationPatient" in ds:
            studies[str(ds.StudyInstanceUID)].append((ds, path))
    return dict(studies)
