"""A study's newest run as the web page shows it: the result JSON, the grades grid, the Grad-CAM
Secondary Captures rendered as PNG, the SR and the PDF summary (from the run folder the ledger names)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image

from dicom_node.results import RunFolder
from inference.labels import CONDITIONS, LEVELS, SEVERITY_NAMES

NORMAL = SEVERITY_NAMES[0]


@dataclass(frozen=True)
class RunView:
    """What the pages show of one run: its folder (``RunFolder``), its number and its results.json."""

    folder: RunFolder
    run: int
    result: dict[str, Any]

    @property
    def labels(self) -> list[dict[str, Any]]:
        return list(self.result.get("labels", []))

    @property
    def assessed(self) -> list[dict[str, Any]]:
        return [label for label in self.labels if label.get("assessed")]

    @property
    def not_assessed(self) -> list[dict[str, Any]]:
        return [label for label in self.labels if not label.get("assessed")]

    @property
    def findings(self) -> list[dict[str, Any]]:
        """Assessed labels graded above Normal/Mild, the most severe first."""
        above = [label for label in self.assessed if label.get("grade") != NORMAL]
        return sorted(above, key=lambda r: (-SEVERITY_NAMES.index(r["grade"]), -max(r["probabilities"].values())))

    def grid(self) -> list[tuple[str, list[dict[str, Any] | None]]]:
        """(condition, one cell per level L1/L2..L5/S1) for the grades table."""
        by_key = {(label["condition"], label["level"]): label for label in self.labels}
        return [(c.display, [by_key.get((c.display, lv.value)) for lv in LEVELS]) for c in CONDITIONS]

    @property
    def missing_roles(self) -> list[str]:
        found = {role for role, uids in self.result.get("series_roles", {}).items() if uids}
        return [role for role in ("Sagittal T1", "Sagittal T2/STIR", "Axial T2") if role not in found]

    def sc_files(self) -> list[Path]:
        return self.folder.sc_files()

    def heatmaps(self) -> list[tuple[int, dict[str, Any]]]:
        """(SC index, its label): the SCs are written in the order of the assessed labels."""
        return list(enumerate(self.assessed[: len(self.sc_files())]))

    def sr_file(self) -> Path | None:
        return self.folder.newest_sr()

    def pdf_file(self) -> Path | None:
        return next(iter(self.folder.pdf_files()), None)

    @property
    def json_file(self) -> Path:
        return self.folder.json_path


def run_view(sr_path: str, run: int) -> RunView | None:
    """The run whose SR is ``sr_path``, or None when its files are gone (purged) or its
    results.json cannot be read."""
    folder = RunFolder.of_sr(sr_path)
    try:
        return RunView(folder, run, folder.result())
    except (OSError, ValueError):
        return None


def levels() -> list[str]:
    return [lv.value for lv in LEVELS]


def sc_png(path: Path, max_side: int = 512) -> bytes:
    """A Grad-CAM Secondary Capture (RGB) as a PNG, at most ``max_side`` pixels wide or high."""
    pixels = pydicom.dcmread(path).pixel_array
    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    image.thumbnail((max_side, max_side))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def patient_of(path: Path) -> tuple[str, str]:
    """(Patient's Name, Patient ID) of one instance, for a signed-in user's eyes only (never logged)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID"])
    except Exception:  # noqa: BLE001 - a purged or unreadable file: nothing to show
        return "", ""
    return str(ds.get("PatientName", "") or ""), str(ds.get("PatientID", "") or "")
