"""DICOM image-plane geometry: pixel <-> patient coordinates (LPS, millimetres), slice ordering.

Conventions follow PS3.3 C.7.6.2: ImageOrientationPatient holds the row direction (the direction of
increasing column index) then the column direction (increasing row index); PixelSpacing holds the
spacing between rows, then between columns. Pixel coordinates are (column, row), i.e. (x, y).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class ImagePlane:
    """The plane of one image: where its first pixel is and how its rows and columns run."""

    position: FloatArray  # ImagePositionPatient: centre of the first transmitted pixel
    row_dir: FloatArray  # unit vector along a row (column index increases)
    col_dir: FloatArray  # unit vector along a column (row index increases)
    row_spacing: float  # mm between adjacent rows (PixelSpacing[0])
    col_spacing: float  # mm between adjacent columns (PixelSpacing[1])
    rows: int
    columns: int

    @classmethod
    def from_attributes(
        cls,
        position: Sequence[float],
        orientation: Sequence[float],
        spacing: Sequence[float],
        rows: int,
        columns: int,
    ) -> ImagePlane:
        """Build from ImagePositionPatient, ImageOrientationPatient, PixelSpacing, Rows, Columns."""
        iop = np.asarray(orientation, dtype=np.float64)
        if iop.shape != (6,):
            raise ValueError(f"ImageOrientationPatient needs 6 values, got {len(iop)}")
        if not np.isfinite(iop).all():
            raise ValueError("ImageOrientationPatient holds a value that is not a finite number")
        for name, v in (("row", iop[:3]), ("column", iop[3:])):
            if abs(float(np.linalg.norm(v)) - 1.0) > UNIT_TOLERANCE:
                raise ValueError(f"ImageOrientationPatient {name} direction is not a unit vector")
        pos = np.asarray(position, dtype=np.float64).reshape(-1)
        if pos.shape != (3,) or not np.isfinite(pos).all() or float(np.abs(pos).max()) > MAX_POSITION_MM:
            raise ValueError(f"ImagePositionPatient must be 3 finite values within {MAX_POSITION_MM:g} mm")
        row_dir, col_dir = _unit(iop[:3]), _unit(iop[3:])
        if abs(float(row_dir @ col_dir)) > 1e-3:
            raise ValueError("ImageOrientationPatient row and column directions are not orthogonal")
        if len(spacing) != 2 or not np.isfinite(np.asarray(spacing, np.float64)).all() \
                or min(float(spacing[0]), float(spacing[1])) <= 0:
            raise ValueError(f"PixelSpacing must be two positive values, got {list(spacing)}")
        if int(rows) < 1 or int(columns) < 1:
            raise ValueError(f"Rows and Columns must be positive, got {rows} x {columns}")
        return cls(
            position=pos,
            row_dir=row_dir,
            col_dir=col_dir,
            row_spacing=float(spacing[0]),
            col_spacing=float(spacing[1]),
            rows=int(rows),
            columns=int(columns),
        )

    @classmethod
    def from_dataset(cls, ds: Dataset) -> ImagePlane:
        """Build from a pydicom Dataset carrying the Image Plane and Image Pixel modules."""
        return cls.from_attributes(ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, ds.Rows,
                                   ds.Columns)

    @property
    def normal(self) -> FloatArray:
        """Slice normal, row_dir x col_dir."""
        return np.cross(self.row_dir, self.col_dir)

    @property
    def center(self) -> FloatArray:
        """Patient coordinates of the centre of the image."""
        return self.to_patient((self.columns - 1) / 2.0, (self.rows - 1) / 2.0)

    def to_patient(self, x: ArrayLike, y: ArrayLike) -> FloatArray:
        """Pixel (column x, row y), scalars or arrays, -> patient coordinates, shape (..., 3)."""
        x = np.asarray(x, dtype=np.float64)[..., None]
        y = np.asarray(y, dtype=np.float64)[..., None]
        return self.position + x * self.col_spacing * self.row_dir + y * self.row_spacing * self.col_dir

    def to_pixel(self, points: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Patient points (..., 3) -> (x, y, signed distance from the plane along the normal)."""
        d = np.asarray(points, dtype=np.float64) - self.position
        x = d @ self.row_dir / self.col_spacing
        y = d @ self.col_dir / self.row_spacing
        return x, y, d @ self.normal

    def contains(self, points: ArrayLike, margin_px: float = 0.0) -> NDArray[np.bool_]:
        """Whether points project inside the image (ignoring their distance from the plane)."""
        x, y, _ = self.to_pixel(points)
        return (
            (x >= -0.5 - margin_px)
            & (x <= self.columns - 0.5 + margin_px)
            & (y >= -0.5 - margin_px)
            & (y <= self.rows - 0.5 + margin_px)
        )

    def pixel_grid(self, rows: int | None = None, columns: int | None = None) -> FloatArray:
        """Patient coordinates of every pixel centre, shape (rows, columns, 3).

        With ``rows``/``columns`` given, the same field of view sampled on a coarser or finer grid
        (pixel centres placed so that the grid covers exactly the same area).
        """
        r = self.rows if rows is None else rows
        c = self.columns if columns is None else columns
        ys = (np.arange(r) + 0.5) * (self.rows / r) - 0.5
        xs = (np.arange(c) + 0.5) * (self.columns / c) - 0.5
        return self.to_patient(xs[None, :], ys[:, None])


UNIT_TOLERANCE = 0.01  # |direction| may differ from 1 by this much (rounded values in real files)
MAX_POSITION_MM = 1e5  # a patient fits in 100 m: farther is a broken header, not a position


def _unit(v: FloatArray) -> FloatArray:
    n = float(np.linalg.norm(v))
    if n < 1e-6:
        raise ValueError("zero-length direction in ImageOrientationPatient")
    return v / n


def orientation_normal(orientation: Sequence[float]) -> FloatArray:
    """Unit slice normal from ImageOrientationPatient."""
    iop = np.asarray(orientation, dtype=np.float64)
    n = np.cross(iop[:3], iop[3:])
    return n / np.linalg.norm(n)


def sort_along_normal(planes: Sequence[ImagePlane]) -> list[int]:
    """Indices ordering the planes by position along the (first plane's) normal; never by
    InstanceNumber, which does not always follow position."""
    if not planes:
        return []
    normal = planes[0].normal
    return sorted(range(len(planes)), key=lambda i: float(planes[i].position @ normal))


def nearest_plane(planes: Sequence[ImagePlane], point: ArrayLike) -> tuple[int, float]:
    """Index of the plane nearest to ``point`` among those it projects into, and the distance (mm).

    Planes may have different orientations (several angled axial stacks). Raises ValueError when
    the point projects into none of them.
    """
    p = np.asarray(point, dtype=np.float64)
    best, best_d = -1, float("inf")
    for i, plane in enumerate(planes):
        if not bool(plane.contains(p)):
            continue
        d = abs(float((p - plane.position) @ plane.normal))
        if d < best_d:
            best, best_d = i, d
    if best < 0:
        raise ValueError("the point projects into none of the planes")
    return best, best_d


# Patient-axis letters of PS3.3 C.7.6.1.1.1 (LPS: +x left, +y posterior, +z head).
_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))


def direction_letters(v: ArrayLike, tolerance: float = 0.1) -> str:
    """Patient Orientation letters of a direction, major axis first (e.g. ``P``, ``FL``)."""
    v = np.asarray(v, dtype=np.float64)
    order = np.argsort(-np.abs(v))
    letters = ""
    for axis in order:
        if abs(v[axis]) > tolerance:
            letters += _AXIS_LETTERS[axis][int(v[axis] > 0)]
    return letters or "?"


def classify_orientation(orientation: Sequence[float], max_oblique_deg: float = 30.0) -> str:
    """``sagittal`` | ``coronal`` | ``axial`` | ``oblique`` from the slice normal's major axis."""
    n = np.abs(orientation_normal(orientation))
    axis = int(np.argmax(n))
    if np.degrees(np.arccos(min(1.0, float(n[axis])))) > max_oblique_deg:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]
