"""A montage of one phantom study for a person to judge: mid-sagittal T1 and T2, parasagittal T1
through each foramen, and the axial slice of each level, with labelled points and grades drawn."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from inference.labels import LEVELS, ConditionGroup, SeriesRole, Severity, Side
from inference.rsna_layout import Coordinate
from phantom.acquisition import SeriesSpec
from phantom.generate import PhantomStudy

TILE = 320
GRADE_COLOURS = {  # BGR
    Severity.NORMAL_MILD: (80, 200, 80),
    Severity.MODERATE: (0, 170, 255),
    Severity.SEVERE: (40, 40, 230),
}
_SHORT = {Severity.NORMAL_MILD: "N", Severity.MODERATE: "M", Severity.SEVERE: "S"}


def _window(img: NDArray) -> NDArray[np.uint8]:
    lo, hi = np.percentile(img, [1, 99.5])
    return np.clip((img.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1.0)), 0, 255).astype(np.uint8)


def _tile(study: PhantomStudy, spec: SeriesSpec | None, index: int | None, title: str,
          marks: list[Coordinate]) -> NDArray[np.uint8]:
    tile = np.zeros((TILE, TILE, 3), np.uint8)
    if spec is not None and index is not None:
        img = study.pixels[spec.series_id][index]
        scale = TILE / max(img.shape)
        gray = cv2.resize(_window(img), (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                          interpolation=cv2.INTER_AREA)
        tile[: gray.shape[0], : gray.shape[1]] = gray[..., None]
        for c in marks:
            grade = study.labels[c.label]
            colour = GRADE_COLOURS[grade] if grade is not None else (200, 200, 200)
            centre = (round(c.x * scale), round(c.y * scale))
            cv2.circle(tile, centre, 6, colour, 1, cv2.LINE_AA)
            text = f"{c.label.level.value} {_SHORT[grade] if grade is not None else '?'}"
            cv2.putText(tile, text, (centre[0] + 8, centre[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                        colour, 1, cv2.LINE_AA)
    else:
        cv2.putText(tile, "series missing", (90, TILE // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                    (0, 0, 255), 1, cv2.LINE_AA)
    cv2.rectangle(tile, (0, 0), (TILE, 18), (0, 0, 0), -1)
    cv2.putText(tile, title, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def _find(study: PhantomStudy, role: SeriesRole) -> list[SeriesSpec]:
    return [s for s in study.series if s.role is role]


def _mid_slice(study: PhantomStudy, spec: SeriesSpec) -> int:
    midline = study.anatomy.canal_point(LEVELS[2])
    return int(np.argmin([abs(float((midline - p.position) @ p.normal)) for p in spec.planes]))


def _marked(study: PhantomStudy, spec: SeriesSpec, group: ConditionGroup,
            side: Side | None = None) -> tuple[int | None, list[Coordinate]]:
    """The slice most of this group's labels were marked on, and the marks on it."""
    coords = [c for c in study.coordinates if c.series_id == spec.series_id and c.label.condition.group is group
              and (side is None or c.label.condition.side is side)]
    if not coords:
        return None, []
    numbers = [c.instance_number for c in coords]
    instance = max(set(numbers), key=numbers.count)
    return spec.instance_numbers.index(instance), [c for c in coords if c.instance_number == instance]


def preview(study: PhantomStudy, path: Path) -> Path:
    """Write the montage PNG of a study (which must still hold its pixels)."""
    tiles = []
    sag_t1 = next(iter(_find(study, SeriesRole.SAG_T1)), None)
    sag_t2 = next(iter(_find(study, SeriesRole.SAG_T2)), None)
    tiles.append(_tile(study, sag_t1, _mid_slice(study, sag_t1) if sag_t1 else None, "Sagittal T1, midline", []))
    if sag_t2 is not None:
        idx, marks = _marked(study, sag_t2, ConditionGroup.SPINAL)
        idx = _mid_slice(study, sag_t2) if idx is None else idx
        tiles.append(_tile(study, sag_t2, idx, f"Sagittal {sag_t2.contrast.name}: spinal canal", marks))
    else:
        tiles.append(_tile(study, None, None, "Sagittal T2/STIR", []))
    for side in (Side.LEFT, Side.RIGHT):
        idx, marks = _marked(study, sag_t1, ConditionGroup.FORAMINAL, side) if sag_t1 else (None, [])
        tiles.append(_tile(study, sag_t1 if idx is not None else None, idx, f"Sagittal T1: {side.value} foramina",
                           marks))
    axials = _find(study, SeriesRole.AX_T2)
    for level in LEVELS:
        marks = [c for c in study.coordinates if c.label.level is level
                 and c.label.condition.group is ConditionGroup.SUBARTICULAR]
        spec = next((s for s in axials if marks and s.series_id == marks[0].series_id), None)
        idx = spec.instance_numbers.index(marks[0].instance_number) if spec is not None else None
        marks = [c for c in marks if spec is not None and c.series_id == spec.series_id
                 and c.instance_number == marks[0].instance_number]
        tiles.append(_tile(study, spec, idx, f"Axial T2 {level.value}: subarticular", marks))
    while len(tiles) % 3:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.hstack(tiles[i : i + 3]) for i in range(0, len(tiles), 3)]
    montage = np.vstack(rows)
    banner = np.zeros((24, montage.shape[1], 3), np.uint8)
    cv2.putText(banner, f"SYNTHETIC PHANTOM study {study.study_id} - not patient data   "
                "green N = Normal/Mild, orange M = Moderate, red S = Severe",
                (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.vstack([banner, montage]))
    return path
