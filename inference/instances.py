"""The one reader of DICOM headers, for a folder (``predict``) and for a spooled study (the node)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

log = structlog.stdlib.get_logger(__name__)

#: An instance as the analysis takes it: its header (pixels read from the path when needed).
Instance = tuple[Dataset, Path]


def read_headers(paths: Iterable[Path | str]) -> list[Instance]:
    """The headers of these files, pixels left on disk; an unreadable file is logged and left out."""
    headers = []
    for name in paths:
        path = Path(name)
        try:
            headers.append((pydicom.dcmread(path, stop_before_pixels=True), path))
        except (InvalidDicomError, OSError, ValueError) as exc:
            log.warning("left out a file that is not readable DICOM", path=str(path), error=str(exc))
    return headers


def read_folder(folder: Path) -> dict[str, list[Instance]]:
    """The images with geometry under ``folder`` (recursively), grouped by StudyInstanceUID."""
    studies: dict[str, list[Instance]] = defaultdict(list)
    for ds, path in read_headers(sorted(p for p in folder.rglob("*") if p.is_file())):
        if "StudyInstanceUID" in ds and "ImageOrientationPatient" in ds:
            studies[str(ds.StudyInstanceUID)].append((ds, path))
    return dict(studies)
