"""Level localisation and per-label crop placement (shared by training and serving).

The localiser sees the central slices of a sagittal series on a fixed physical grid and returns
one heatmap per disc level; the peak of each, refined by a local soft-argmax, is the centre of the
canal at that disc in patient coordinates. Each label's crop is placed from that point with a
learned offset (foramina lie lateral and above the disc centre, recesses lateral), in a frame
mirrored for the right side so that one grader serves both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from inference.labels import LEVELS, Condition, ConditionGroup, Level, Side
from inference.preprocess import (
    HEAD,
    LEFT,
    POSTERIOR,
    CropFrame,
    CropSpec,
    Intensity,
    crop_25d,
    crop_frame,
)
from inference.volume import Volume

LOCALISER_SPEC = CropSpec(size_mm=320.0, pixels=128, n_slices=3)  # the whole sagittal field of view
GRADER_SPEC = CropSpec(size_mm=44.0, pixels=48, n_slices=3)

SAGITTAL_AXES = (POSTERIOR, -HEAD)  # crop columns run posterior, rows run towards the feet


def side_sign(condition: Condition) -> float:
    """+1 for the patient's left (and for the unsided spinal canal), -1 for the right."""
    return -1.0 if condition.side is Side.RIGHT else 1.0


def crop_axes(condition: Condition) -> tuple[NDArray, NDArray, NDArray]:
    """(u, v, across) for a condition's crop: columns, rows, and the order of the 2.5D channels.
    Right-sided crops are mirrored, so that lateral is always +u (axial) or +across (sagittal)."""
    s = side_sign(condition)
    if condition.group is ConditionGroup.SUBARTICULAR:
        return s * LEFT, POSTERIOR, HEAD
    return POSTERIOR, -HEAD, s * LEFT


def local_offset(condition: Condition, offset: tuple[float, float, float]) -> NDArray:
    """A (lateral, posterior, head) offset in mm -> a patient vector, mirrored for the right."""
    lateral, posterior, head = offset
    return lateral * side_sign(condition) * LEFT + posterior * POSTERIOR + head * HEAD


# ---- localiser input and output ------------------------------------------------------------------


@dataclass(frozen=True)
class LocaliserInput:
    """The localiser's image (n_slices, pixels, pixels) and where it lies in patient space."""

    image: NDArray[np.float32]
    frame: CropFrame


def localiser_input(volume: Volume, intensity: Intensity, center: NDArray | None = None) -> LocaliserInput:
    """The central slices of a sagittal volume on the localiser's fixed physical grid, centred on
    the middle of the central slice (or on ``center``, for training's jitter)."""
    mid = len(volume.slices) // 2
    center = volume.slices[mid].plane.center if center is None else center
    u, v = SAGITTAL_AXES
    image = crop_25d(volume, center, u, v, LEFT, LOCALISER_SPEC, intensity, index=mid)
    return LocaliserInput(image, crop_frame(volume.slices[mid], center, u, v, LOCALISER_SPEC))


def heatmap_target(frame: CropFrame, points: dict[Level, NDArray], sigma_px: float = 2.0) -> NDArray[np.float32]:
    """Gaussian heatmaps (5, pixels, pixels) for the disc points that are known (others stay 0)."""
    n = frame.spec.pixels
    out = np.zeros((len(LEVELS), n, n), np.float32)
    rows, cols = np.mgrid[0:n, 0:n]
    for level, point in points.items():
        col, row = patient_to_crop(frame, point)
        out[level.index] = np.exp(-((cols - col) ** 2 + (rows - row) ** 2) / (2 * sigma_px**2))
    return out


def patient_to_crop(frame: CropFrame, point: NDArray) -> tuple[float, float]:
    """Patient point -> (col, row) on a crop (projected onto the crop's plane)."""
    half = (frame.spec.pixels - 1) / 2
    d = np.asarray(point, np.float64) - frame.center
    step = frame.spec.mm_per_pixel
    return float(d @ frame.u / step + half), float(d @ frame.v / step + half)


def decode_heatmaps(heatmaps: NDArray, frame: CropFrame, window: int = 3) -> tuple[NDArray, NDArray]:
    """Peak of each heatmap refined by a soft-argmax in a (2*window+1)^2 neighbourhood.

    Returns patient points (5, 3) and peak values (5,), the localiser's confidence per level."""
    n = heatmaps.shape[-1]
    points, peaks = [], []
    for hm in heatmaps:
        row, col = np.unravel_index(int(np.argmax(hm)), hm.shape)
        r0, r1 = max(row - window, 0), min(row + window + 1, n)
        c0, c1 = max(col - window, 0), min(col + window + 1, n)
        patch = np.clip(hm[r0:r1, c0:c1], 0, None).astype(np.float64)
        total = float(patch.sum())
        if total > 0:
            rr, cc = np.mgrid[r0:r1, c0:c1]
            row, col = float((patch * rr).sum() / total), float((patch * cc).sum() / total)
        points.append(frame.to_patient(col, row))
        peaks.append(float(hm.max()))
    return np.array(points), np.array(peaks)
