"""Reader of the RSNA 2024 Lumbar Spine layout (the real Kaggle data and our phantom alike).

    train.csv                       study_id + the 25 label columns, in any order
    train_label_coordinates.csv     study_id,series_id,instance_number,condition,level,x,y
    train_series_descriptions.csv   study_id,series_id,series_description
    train_images/<study_id>/<series_id>/<instance_number>.dcm

Loading reads only the CSV files and the file names; ``read_instances`` opens a study's DICOM files.

The real competition folder is taken as it is: empty label cells (unlabelled), CSV rows for series
or studies that have no folder, folders no CSV names, stray files (``.DS_Store``, ``._1.dcm``),
zero-padded file names. Nothing here reads SOPClassUID, Modality or SOPInstanceUID (the Kaggle
files have no SOP Class in the data set and repeat SOP Instance UIDs across the series of a
study): an image is known by its path, i.e. by (study, series, instance number).
"""

from __future__ import annotations

import contextlib
import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import structlog
from pydicom.errors import InvalidDicomError

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


class LayoutError(ValueError):
    """The folder is not in the RSNA 2024 layout, or one of its CSV files cannot be read as such."""


_ROLE_BY_DESCRIPTION = {role.value.lower(): role for role in SeriesRole}


@dataclass
class SeriesInfo:
    """One series of a study: its description, role (None if unknown) and instance files."""

    series_id: int
    description: str
    role: SeriesRole | None
    path: Path
    instance_numbers: list[int] = field(default_factory=list)
    file_names: dict[int, str] = field(default_factory=dict, repr=False)  # instance number -> file name

    def file(self, number: int) -> Path:
        """The file of an instance number (``<n>.dcm``, or the zero-padded name found on disk)."""
        return self.path / self.file_names.get(number, f"{number}.dcm")


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
    if not path.is_file():
        raise LayoutError(f"{path.parent} is not in the RSNA 2024 layout: no {path.name}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return [c.strip() for c in reader.fieldnames or []], rows


def _instance_files(folder: Path) -> dict[int, str]:
    """Instance number -> file name from ``<n>.dcm`` names (not assumed contiguous), sorted by
    number; other files (``.DS_Store``, ``._1.dcm``, notes) are not images. Two names of one number
    (``1.dcm`` and ``001.dcm``): ``<n>.dcm`` wins, with a log line."""
    found: dict[int, str] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() != ".dcm" or not p.stem.isdigit() or not p.is_file():
            continue
        n = int(p.stem)
        if n in found:
            keep = f"{n}.dcm" if f"{n}.dcm" in (found[n], p.name) else found[n]
            log.warning("two files of one instance number: one kept", folder=str(folder), instance_number=n,
                        kept=keep, left_out=p.name if keep == found[n] else found[n])
            found[n] = keep
            continue
        found[n] = p.name
    return dict(sorted(found.items()))


def _int_cell(row: dict[str, str], key: str) -> int | None:
    """An integer id cell (``123``, ``123.0``), None when empty."""
    text = (row.get(key) or "").strip()
    if not text:
        return None
    return int(float(text)) if "." in text or "e" in text.lower() else int(text)


def _read_labels(path: Path) -> dict[int, dict[Label, Severity | None]]:
    header, rows = _rows(path)
    if "study_id" not in header:
        raise LayoutError(f"{path}: no study_id column")
    columns: dict[str, Label] = {}
    for name in header:
        with contextlib.suppress(ValueError):  # study_id, or an extra column: ignored
            columns[name] = parse_column(name)
    missing = [label.column for label in LABELS if label not in columns.values()]
    if missing:
        raise LayoutError(f"{path}: missing label column(s): {', '.join(missing)}")
    out: dict[int, dict[Label, Severity | None]] = {}
    blank = 0
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip(): v for k, v in row.items()}
        try:
            study_id = _int_cell(row, "study_id")
        except ValueError:
            raise LayoutError(f"{path}: row {line}: study_id {row['study_id']!r} is not a number") from None
        if study_id is None:
            blank += 1
            continue
        if study_id in out:
            raise LayoutError(f"{path}: study {study_id} appears twice")
        labels: dict[Label, Severity | None] = {}
        for name, label in columns.items():
            try:
                labels[label] = parse_severity(row.get(name))
            except ValueError:
                raise LayoutError(f"{path}: study {study_id}, column {name}: "
                                 f"bad severity {row[name]!r}") from None
        out[study_id] = {label: labels[label] for label in LABELS}
    if blank:
        log.warning("rows without a study_id: skipped", file=str(path), rows=blank)
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
            raise LayoutError(f"{path}: row {line}: {e}") from None
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

    described = _read_descriptions(root / SERIES_CSV)

    records: list[StudyRecord] = []
    for study_id in sorted(labels):
        study_dir = images / str(study_id)
        on_disk = {int(p.name): p for p in study_dir.iterdir() if p.is_dir() and p.name.isdigit()} \
            if study_dir.is_dir() else {}
        descriptions = described.get(study_id, {})
        series: list[SeriesInfo] = []
        for series_id in sorted(set(descriptions) | set(on_disk)):
            description = descriptions.get(series_id, "")
            folder = on_disk.get(series_id, study_dir / str(series_id))
            if series_id not in on_disk:
                if require_images:
                    log.warning("series has no folder: dropped", study=study_id, series=series_id,
                                description=description, folder=str(folder))
                    continue
                files: dict[int, str] = {}
            else:
                files = _instance_files(folder)
                if series_id not in descriptions:
                    log.warning("series not in the descriptions file: role unknown", study=study_id,
                                series=series_id, file=SERIES_CSV)
            series.append(SeriesInfo(series_id, description, role_of(description), folder, list(files), files))
        if require_images and not on_disk:
            log.warning("study has no images: dropped", study=study_id, images=str(images))
            continue
        records.append(StudyRecord(study_id, labels[study_id], series))

    unlabelled = sorted(p.name for p in images.iterdir() if p.is_dir() and p.name.isdigit()
                        and int(p.name) not in labels) if images.is_dir() else []
    if unlabelled:
        log.warning("image folders of studies not in train.csv: ignored", count=len(unlabelled),
                    example=unlabelled[0], file=TRAIN_CSV)
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


def _read_descriptions(path: Path) -> dict[int, dict[int, str]]:
    """study_id -> series_id -> description; rows without both ids are skipped (one log line)."""
    described: dict[int, dict[int, str]] = {}
    skipped = 0
    for line, row in enumerate(_rows(path)[1], start=2):
        try:
            study_id, series_id = _int_cell(row, "study_id"), _int_cell(row, "series_id")
        except ValueError:
            raise LayoutError(f"{path}: row {line}: study_id or series_id is not a number") from None
        if study_id is None or series_id is None:
            skipped += 1
            continue
        described.setdefault(study_id, {})[series_id] = (row.get("series_description") or "").strip()
    if skipped:
        log.warning("series description rows without study_id or series_id: skipped", file=str(path), rows=skipped)
    return described


def read_image(path: Path, pixels: bool = True) -> pydicom.Dataset | None:
    """One image file (header only without ``pixels``), None with a log line when it is not
    readable DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        log.warning("left out a file that is not readable DICOM", path=str(path), error=f"{type(exc).__name__}: {exc}")
        return None


def read_instances(record: StudyRecord) -> list[tuple[pydicom.Dataset, Path]]:
    """Every readable image of a study as (dataset with pixels, path), for ``inference.analyze_study``;
    an unreadable file is left out with a log line."""
    out = []
    for s in record.series:
        for n in s.instance_numbers:
            ds = read_image(s.file(n))
            if ds is not None:
                out.append((ds, s.file(n)))
    return out


def split_study_ids(study_ids: list[int], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split study ids into (train, val): deterministic for ``seed``, independent of input order,
    each part sorted and non-empty when there are at least two studies."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), not {val_fraction}")
    ordered = sorted(study_ids)
    if len(set(ordered)) != len(ordered):
        raise ValueError("records hold a study_id twice")
    n = len(ordered)
    n_val = min(max(round(n * val_fraction), 1), n - 1) if n >= 2 else 0
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    return ([s for i, s in enumerate(ordered) if i not in val_idx], [s for i, s in enumerate(ordered) if i in val_idx])


def fold_study_ids(study_ids: list[int], folds: int, fold: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split study ids into (train, val) for K-fold cross-validation: the studies, sorted and permuted
    by ``seed``, are dealt round-robin into ``folds`` folds, so every study is in exactly one
    validation fold; ``fold`` picks the validation one. Deterministic, independent of input order."""
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"fold {fold} of {folds}: need at least 2 folds and 0 <= fold < folds")
    ordered = sorted(study_ids)
    if len(set(ordered)) != len(ordered):
        raise ValueError("records hold a study_id twice")
    perm = np.random.default_rng(seed).permutation(len(ordered))
    val_idx = set(perm[fold::folds].tolist())
    return ([s for i, s in enumerate(ordered) if i not in val_idx], [s for i, s in enumerate(ordered) if i in val_idx])


def split_studies(records: list[StudyRecord], val_fraction: float = 0.2,
                  seed: int = 0) -> tuple[list[StudyRecord], list[StudyRecord]]:
    """Split by study into (train, val) as ``split_study_ids`` splits their ids (what training
    from a prepared cache does): each part sorted by study_id."""
    by_id = {r.study_id: r for r in records}
    if len(by_id) != len(records):
        raise ValueError("records hold a study_id twice")
    train, val = split_study_ids(list(by_id), val_fraction, seed)
    return [by_id[i] for i in train], [by_id[i] for i in val]
