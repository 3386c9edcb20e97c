"""Reader of the RSNA 2024 Lumbar Spine layout (the real Kaggle data and our phantom alike).

    train.csv                       study_id + the 25 label columns, in any order
    train_label_coordinates.csv     study_id,series_id,instance_number,condition,level,x,y
    train_series_descriptions.csv   study_id,series_id,series_description
    train_images/<study_id>/<series_id>/<instance_number>.dcm

Loading reads only the CSV files and the file names; ``read_instances`` opens a study's DICOM files.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import structlog

from inference.labels import (
    LABELS,
    Label,
    SeriesRole,
    Severity,
    parse_column,
    parse_condition,
    parse_level,
    parse_severity,
)
from inference.rsna_layout import (
    COORDINATES_CSV,
    IMAGES_DIR,
    SERIES_CSV,
    TRAIN_CSV,
    Coordinate,
)

log = structlog.stdlib.get_logger(__name__)


_ROLE_BY_DESCRIPTION = {role.value.lower(): role for role in SeriesRole}


@dataclass
class SeriesInfo:
    """One series of a study: its description, role (None if unknown) and instance files."""

    series_id: int
    description: str
    role: SeriesRole | None
    path: Path
    instance_numbers: list[int] = field(default_factory=list)


@dataclass
class StudyRecord:
    """A study's 25 labels (None = unlabelled), its series and its label coordinates."""

    study_id: int
    labels: dict[Label, Severity | None]
    series: list[SeriesInfo] = field(default_factory=list)
    coordinates: list[Coordinate] = field(default_factory=list)

    def series_with_role(self, role: SeriesRole) -> list[SeriesInfo]:
        """All series of this role (a study may have several Axial T2 series, or none)."""
        return [s for s in self.series if s.role is role]

    def targets(self) -> list[int]:
        """The 25 class indices in LABELS order, -1 where unlabelled."""
        return [-1 if (sev := self.labels[label]) is None else int(sev) for label in LABELS]

    def coordinates_for(self, label: Label) -> list[Coordinate]:
        return [c for c in self.coordinates if c.label == label]


def role_of(description: str) -> SeriesRole | None:
    """``Sagittal T2/STIR`` (any case/spacing) -> SeriesRole; None for anything else."""
    return _ROLE_BY_DESCRIPTION.get(" ".join(description.split()).lower())


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return [c.strip() for c in reader.fieldnames or []], rows


def _instance_numbers(folder: Path) -> list[int]:
    """Instance numbers from ``<n>.dcm`` file names (not assumed contiguous), sorted."""
    return sorted(int(p.stem) for p in folder.iterdir()
                  if p.suffix.lower() == ".dcm" and p.stem.isdigit() and p.is_file())


def _read_labels(path: Path) -> dict[int, dict[Label, Severity | None]]:
    header, rows = _rows(path)
    if "study_id" not in header:
        raise ValueError(f"{path}: no study_id column")
    columns: dict[str, Label] = {}
    for name in header:
        try:
            columns[name] = parse_column(name)
        except ValueError:
            pass  # study_id, or an extra column: ignored
    missing = [label.column for label in LABELS if label not in columns.values()]
    if missing:
        raise ValueError(f"{path}: missing label column(s): {', '.join(missing)}")
    out: dict[int, dict[Label, Severity | None]] = {}
    for row in rows:
        row = {(k or "").strip(): v for k, v in row.items()}
        study_id = int(row["study_id"])
        if study_id in out:
            raise ValueError(f"{path}: study {study_id} appears twice")
        labels: dict[Label, Severity | None] = {}
        for name, label in columns.items():
            try:
                labels[label] = parse_severity(row[name])
            except ValueError:
                raise ValueError(f"{path}: study {study_id}, column {name}: "
                                 f"bad severity {row[name]!r}") from None
        out[study_id] = {label: labels[label] for label in LABELS}
    return out


def _read_coordinates(path: Path, studies: set[int]) -> dict[int, list[Coordinate]]:
    out: dict[int, list[Coordinate]] = {}
    if not path.exists():
        log.warning("label coordinates file not found: studies have no label coordinates", path=str(path))
        return out
    for line, row in enumerate(_rows(path)[1], start=2):
        try:
            study_id = int(row["study_id"])
            coord = Coordinate(Label(parse_condition(row["condition"]), parse_level(row["level"])),
                               int(row["series_id"]), int(float(row["instance_number"])),
                               float(row["x"]), float(row["y"]))
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}: row {line}: {e}") from None
        if study_id in studies:
            out.setdefault(study_id, []).append(coord)
    return out


def load_rsna(root: Path, images_dir: str = IMAGES_DIR, require_images: bool = True) -> list[StudyRecord]:
    """Read the RSNA 2024 layout under ``root``: one StudyRecord per study of train.csv, sorted.

    With ``require_images`` (the default) series whose folder is missing are dropped, and so are
    studies without any image; otherwise both are kept (series then have no instance numbers).
    Series folders on disk that the descriptions CSV lacks are included with role None.
    """
    root = Path(root)
    labels = _read_labels(root / TRAIN_CSV)
    images = root / images_dir

    described: dict[int, dict[int, str]] = {}
    for row in _rows(root / SERIES_CSV)[1]:
        described.setdefault(int(row["study_id"]), {})[int(row["series_id"])] = row["series_description"].strip()

    records: list[StudyRecord] = []
    for study_id in sorted(labels):
        study_dir = images / str(study_id)
        on_disk = {int(p.name) for p in study_dir.iterdir() if p.is_dir() and p.name.isdigit()} \
            if study_dir.is_dir() else set()
        descriptions = described.get(study_id, {})
        series: list[SeriesInfo] = []
        for series_id in sorted(set(descriptions) | on_disk):
            description = descriptions.get(series_id, "")
            folder = study_dir / str(series_id)
            if series_id not in on_disk:
                if require_images:
                    log.warning("series has no folder: dropped", study=study_id, series=series_id,
                                description=description, folder=str(folder))
                    continue
                numbers: list[int] = []
            else:
                numbers = _instance_numbers(folder)
                if series_id not in descriptions:
                    log.warning("series not in the descriptions file: role unknown", study=study_id,
                                series=series_id, file=SERIES_CSV)
            series.append(SeriesInfo(series_id, description, role_of(description), folder, numbers))
        if require_images and not on_disk:
            log.warning("study has no images: dropped", study=study_id, images=str(images))
            continue
        records.append(StudyRecord(study_id, labels[study_id], series))

    coordinates = _read_coordinates(root / COORDINATES_CSV, {r.study_id for r in records})
    stray = []
    for record in records:
        record.coordinates = coordinates.get(record.study_id, [])
        known = {s.series_id for s in record.series}
        stray += [(record.study_id, c.series_id) for c in record.coordinates if c.series_id not in known]
    if stray:
        log.warning("label coordinates point to a series not in their study (kept)", count=len(stray),
                    example_study=stray[0][0], example_series=stray[0][1])
    return records


def read_instances(record: StudyRecord) -> list[tuple[pydicom.Dataset, Path]]:
    """Every image of a study as (dataset with pixels, path), for ``inference.analyze_study``."""
    return [(pydicom.dcmread(s.path / f"{n}.dcm"), s.path / f"{n}.dcm")
            for s in record.series for n in s.instance_numbers]


def split_studies(records: list[StudyRecord], val_fraction: float = 0.2,
                  seed: int = 0) -> tuple[list[StudyRecord], list[StudyRecord]]:
    """Split by study into (train, val): deterministic for ``seed``, independent of input order,
    each part sorted by study_id and non-empty when there are at least two studies."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), not {val_fraction}")
    ordered = sorted(records, key=lambda r: r.study_id)
    if len({r.study_id for r in ordered}) != len(ordered):
        raise ValueError("records hold a study_id twice")
    n = len(ordered)
    n_val = min(max(round(n * val_fraction), 1), n - 1) if n >= 2 else 0
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    train = [r for i, r in enumerate(ordered) if i not in val_idx]
    val = [r for i, r in enumerate(ordered) if i in val_idx]
    return train, val
