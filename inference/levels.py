"""Level localisation and per-label crop placement (shared by training and serving).

The localiser sees the central slices of a sagittal series on a fixed physical grid and returns
one heatmap per disc level; the peak of each, refined by a local soft-argmax, is the centre of the
canal at that disc in patient coordinates. Each label's crop is placed from that point with a
learned offset (foramina lie lateral and above the disc centre, recesses lateral), in a frame
mirrored for the right side so that one grader serves both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray

from inference.geometry import FloatArray
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
    sample_slice,
)
from inference.specs import GRADER_SPEC as GRADER_SPEC  # the small preset's crops, importable from here too
from inference.specs import LOCALISER_SPEC as LOCALISER_SPEC
from inference.volume import Volume

SAGITTAL_AXES = (POSTERIOR, -HEAD)  # crop columns run posterior, rows run towards the feet


def side_sign(condition: Condition) -> float:
    """+1 for the patient's left (and for the unsided spinal canal), -1 for the right."""
    return -1.0 if condition.side is Side.RIGHT else 1.0


def crop_axes(condition: Condition) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(u, v, across) for a condition's crop: columns, rows, and the order of the 2.5D channels.
    Right-sided crops are mirrored, so that lateral is always +u (axial) or +across (sagittal)."""
    s = side_sign(condition)
    if condition.group is ConditionGroup.SUBARTICULAR:
        return s * LEFT, POSTERIOR, HEAD
    return POSTERIOR, -HEAD, s * LEFT


# Crops of these groups are centred on the canal point itself (both recesses in view, the
# labelled side always on +u): robust to a localiser point a few mm off the midline.
CANAL_CENTRED = frozenset({ConditionGroup.SPINAL, ConditionGroup.SUBARTICULAR})


def local_offset(condition: Condition, offset: tuple[float, float, float]) -> FloatArray:
    """A (lateral, posterior, head) offset in mm -> a patient vector, mirrored for the right;
    zero for canal-centred groups."""
    if condition.group in CANAL_CENTRED:
        return np.zeros(3)
    lateral, posterior, head = offset
    return lateral * side_sign(condition) * LEFT + posterior * POSTERIOR + head * HEAD


# ---- localiser input and output ------------------------------------------------------------------


@dataclass(frozen=True)
class LocaliserInput:
    """The localiser's image (n_slices, pixels, pixels) and where it lies in patient space."""

    image: NDArray[np.float32]
    frame: CropFrame


def localiser_input(volume: Volume, intensity: Intensity, center: FloatArray | None = None,
                    index: int | None = None, spec: CropSpec = LOCALISER_SPEC) -> LocaliserInput:
    """Adjacent sagittal slices around the central one (or ``index``) on the localiser's fixed
    physical grid (``spec``), centred on the middle of the central slice (or on ``center``)."""
    mid = len(volume.slices) // 2
    index = mid if index is None else index
    center = volume.slices[mid].plane.center if center is None else center
    u, v = SAGITTAL_AXES
    image = crop_25d(volume, center, u, v, LEFT, spec, intensity, index=index)
    return LocaliserInput(image, crop_frame(volume.slices[index], center, u, v, spec))


def localiser_inputs(volume: Volume, intensity: Intensity, spec: CropSpec = LOCALISER_SPEC) -> list[LocaliserInput]:
    """``localiser_input`` for every slice of a sagittal volume, sampling each slice only once:
    the same images as calling it per index, for the per-slice midline estimate."""
    mid = len(volume.slices) // 2
    center = volume.slices[mid].plane.center
    u, v = SAGITTAL_AXES
    samples = [sample_slice(sl, center, u, v, spec, intensity) for sl in volume.slices]
    step = 1 if float(volume.slices[mid].plane.normal @ LEFT) >= 0 else -1
    half, last = spec.n_slices // 2, len(samples) - 1
    out = []
    for i, sl in enumerate(volume.slices):
        picks = [min(max(i + step * k, 0), last) for k in range(-half, half + 1)]
        out.append(LocaliserInput(np.stack([samples[j] for j in picks]), crop_frame(sl, center, u, v, spec)))
    return out


def midline_shift(heatmaps: NDArray[np.float32], frame: CropFrame, points: FloatArray, offsets_mm: FloatArray,
                  window: int = 3, power: float = 4.0) -> FloatArray:
    """Per level, how far (mm, along the slice normal) the canal lies from the central slice.

    ``heatmaps`` (n_slices, 5, H, W) are the localiser's answers on every sagittal slice,
    ``offsets_mm`` each slice's position along the normal relative to the central one. The canal
    answers most strongly on the slices through it: the confidence-weighted mean position of the
    peak at each level's decoded point estimates the midline, which the foramen crops start from."""
    out = np.zeros(len(points))
    n = frame.spec.pixels
    for k, point in enumerate(points):
        col, row = patient_to_crop(frame, point)
        r, c = round(row), round(col)
        r0, r1, c0, c1 = max(r - window, 0), min(r + window + 1, n), max(c - window, 0), min(c + window + 1, n)
        w = np.clip(heatmaps[:, k, r0:r1, c0:c1].max(axis=(1, 2)), 0, None) ** power
        if w.sum() > 0:
            out[k] = float((w * offsets_mm).sum() / w.sum())
    return out


def heatmap_target(frame: CropFrame, points: dict[Level, FloatArray], sigma_px: float = 2.0) -> NDArray[np.float32]:
    """Gaussian heatmaps (5, pixels, pixels) for the disc points that are known (others stay 0)."""
    n = frame.spec.pixels
    out = np.zeros((len(LEVELS), n, n), np.float32)
    rows, cols = np.mgrid[0:n, 0:n]
    for level, point in points.items():
        col, row = patient_to_crop(frame, point)
        out[level.position] = np.exp(-((cols - col) ** 2 + (rows - row) ** 2) / (2 * sigma_px**2))
    return out


def patient_to_crop(frame: CropFrame, point: ArrayLike) -> tuple[float, float]:
    """Patient point -> (col, row) on a crop (projected onto the crop's plane)."""
    half = (frame.spec.pixels - 1) / 2
    d = np.asarray(point, np.float64) - frame.center
    step = frame.spec.mm_per_pixel
    return float(d @ frame.u / step + half), float(d @ frame.v / step + half)


def _peaks(hm: NDArray[np.float32], k: int = 5, floor: float = 0.05) -> list[tuple[int, int, float]]:
    """Up to k local maxima (row, col, value) of a heatmap, strongest first."""
    hm = hm.astype(np.float32)
    dilated = cv2.dilate(hm, np.ones((5, 5), np.uint8))
    rows, cols = np.nonzero((hm >= dilated) & (hm > max(floor, 0.1 * float(hm.max()))))
    order = np.argsort(-hm[rows, cols])[:k]
    peaks = [(int(rows[i]), int(cols[i]), float(hm[rows[i], cols[i]])) for i in order]
    if peaks:
        return peaks
    row, col = np.unravel_index(int(np.argmax(hm)), hm.shape)
    return [(int(row), int(col), float(hm.max()))]


def _ordered_choice(candidates: list[list[tuple[int, int, float]]], step_mm: float,
                    gap_mm: tuple[float, float] = (12.0, 70.0)) -> list[tuple[int, int, float]]:
    """One peak per level, head to feet, consecutive levels ``gap_mm`` apart along the rows,
    maximising the summed log-values (Viterbi); per-level maxima when no such sequence exists."""
    lo, hi = gap_mm[0] / step_mm, gap_mm[1] / step_mm
    scores = [np.log([c[2] + 1e-6 for c in candidates[0]])]
    back: list[list[int]] = []
    for k in range(1, len(candidates)):
        cur, ptr = [], []
        for r, _, v in candidates[k]:
            best, arg = -np.inf, -1
            for j, (pr, _, _) in enumerate(candidates[k - 1]):
                if lo <= r - pr <= hi and scores[-1][j] > best:
                    best, arg = scores[-1][j], j
            cur.append(best + np.log(v + 1e-6))
            ptr.append(arg)
        scores.append(np.array(cur))
        back.append(ptr)
    if not np.isfinite(scores[-1]).any():
        return [c[0] for c in candidates]
    idx = int(np.argmax(scores[-1]))
    chosen = [idx]
    for ptr in reversed(back):
        idx = ptr[idx]
        chosen.append(idx)
    chosen.reverse()
    return [candidates[k][i] for k, i in enumerate(chosen)]


def decode_heatmaps(heatmaps: NDArray[np.float32], frame: CropFrame,
                    window: int = 3) -> tuple[FloatArray, FloatArray]:
    """One point per disc level: heatmap peaks chosen jointly so that the levels run head to feet
    in order (a channel that also fires on a neighbouring disc cannot take it), each refined by a
    soft-argmax in a (2*window+1)^2 neighbourhood.

    Returns patient points (5, 3) and peak values (5,), the localiser's confidence per level."""
    n = heatmaps.shape[-1]
    chosen = _ordered_choice([_peaks(hm) for hm in heatmaps], frame.spec.mm_per_pixel)
    points, peaks = [], []
    for hm, (row, col, value) in zip(heatmaps, chosen, strict=True):
        r0, r1 = max(row - window, 0), min(row + window + 1, n)
        c0, c1 = max(col - window, 0), min(col + window + 1, n)
        patch = np.clip(hm[r0:r1, c0:c1], 0, None).astype(np.float64)
        total = float(patch.sum())
        fr, fc = float(row), float(col)
        if total > 0:
            rr, cc = np.mgrid[r0:r1, c0:c1]
            fr, fc = float((patch * rr).sum() / total), float((patch * cc).sum() / total)
        points.append(frame.to_patient(fc, fr))
        peaks.append(value)
    return np.array(points), np.array(peaks)
