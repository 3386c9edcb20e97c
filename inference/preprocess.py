"""Preprocessing shared by training and serving: intensity normalisation and 2.5D crops at
physical scale (millimetres), in a canonical orientation, around a point in patient space.

A crop is a square of ``size_mm`` sampled on ``pixels`` x ``pixels``, centred on a patient point,
with its x axis along ``u`` and its y axis along ``v`` (both projected into each slice's plane),
on ``n_slices`` adjacent slices ordered along ``across``. Training imports these functions;
nothing re-implements them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray

from inference.geometry import FloatArray
from inference.volume import Slice, Volume

# Patient directions (LPS).
LEFT = np.array([1.0, 0.0, 0.0])
POSTERIOR = np.array([0.0, 1.0, 0.0])
HEAD = np.array([0.0, 0.0, 1.0])


@dataclass(frozen=True)
class CropSpec:
    """Geometry of a 2.5D crop."""

    size_mm: float
    pixels: int
    n_slices: int = 3

    @property
    def mm_per_pixel(self) -> float:
        return self.size_mm / self.pixels


@dataclass(frozen=True)
class Intensity:
    """Per-volume linear normalisation: (value - low) / (high - low)."""

    low: float
    high: float

    def apply(self, pixels: NDArray[np.number[Any]]) -> NDArray[np.float32]:
        return ((pixels - self.low) / max(self.high - self.low, 1e-6)).astype(np.float32)


def intensity_of(volume: Volume, low_pct: float = 1.0, high_pct: float = 99.5) -> Intensity:
    """Robust intensity range of a volume from percentiles of a subsample of its pixels."""
    sample = np.concatenate([s.pixels[::4, ::4].ravel() for s in volume.slices])
    low, high = np.percentile(sample, [low_pct, high_pct])
    return Intensity(float(low), float(high))


def _in_plane(direction: FloatArray, normal: FloatArray) -> FloatArray:
    d: FloatArray = direction - (direction @ normal) * normal
    n = float(np.linalg.norm(d))
    if n < 1e-6:
        raise ValueError("crop axis is perpendicular to the slice")
    return d / n


@dataclass(frozen=True)
class CropFrame:
    """Where a crop lies on a slice: the patient point of its centre and its in-plane axes."""

    center: FloatArray  # patient point of the crop's centre, on the slice plane
    u: FloatArray  # unit vector along crop columns
    v: FloatArray  # unit vector along crop rows
    spec: CropSpec

    def to_patient(self, col: ArrayLike, row: ArrayLike) -> FloatArray:
        """Crop pixel (col, row), scalars or arrays -> patient coordinates (..., 3)."""
        half = (self.spec.pixels - 1) / 2
        cols = np.asarray(col, np.float64)[..., None]
        rows = np.asarray(row, np.float64)[..., None]
        step = self.spec.mm_per_pixel
        return self.center + (cols - half) * step * self.u + (rows - half) * step * self.v


def crop_frame(sl: Slice, center: FloatArray, u: FloatArray, v: FloatArray, spec: CropSpec) -> CropFrame:
    """The frame of a crop around ``center``'s projection onto a slice, axes projected in-plane."""
    plane = sl.plane
    normal = plane.normal
    c = center - ((center - plane.position) @ normal) * normal
    uu = _in_plane(u, normal)
    vv = _in_plane(v - (v @ uu) * uu, normal)
    return CropFrame(c, uu, vv, spec)


def sample_slice(sl: Slice, center: FloatArray, u: FloatArray, v: FloatArray, spec: CropSpec,
                 intensity: Intensity) -> NDArray[np.float32]:
    """One slice of a crop: bilinear samples on a square grid around ``center``'s projection."""
    frame = crop_frame(sl, center, u, v, spec)
    idx = np.arange(spec.pixels, dtype=np.float64)
    grid = frame.to_patient(idx[None, :], idx[:, None])  # (rows, cols, 3)
    x, y, _ = sl.plane.to_pixel(grid)
    out = cv2.remap(sl.pixels, x.astype(np.float32), y.astype(np.float32), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT, borderValue=float(intensity.low))
    return intensity.apply(out)


def crop_25d(volume: Volume, center: FloatArray, u: FloatArray, v: FloatArray, across: FloatArray, spec: CropSpec,
             intensity: Intensity, index: int | None = None) -> NDArray[np.float32]:
    """A (n_slices, pixels, pixels) crop: the slice nearest ``center`` (or ``index``) and its
    neighbours, channels ordered along ``across`` (so mirrored sides share one channel order)."""
    if index is None:
        index, _ = volume.nearest(center)
    half = spec.n_slices // 2
    normal = volume.slices[index].plane.normal
    step = 1 if float(normal @ across) >= 0 else -1
    picks = [min(max(index + step * k, 0), len(volume.slices) - 1) for k in range(-half, half + 1)]
    return np.stack([sample_slice(volume.slices[i], center, u, v, spec, intensity) for i in picks])
