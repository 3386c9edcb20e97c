"""Decoding the localiser's heatmaps: one point per level, in order, and the midline across slices."""

from __future__ import annotations

import numpy as np

from inference.levels import (
    LOCALISER_SPEC,
    decode_heatmaps,
    midline_shift,
    patient_to_crop,
)
from inference.preprocess import CropFrame

FRAME = CropFrame(center=np.zeros(3), u=np.array([0.0, 1.0, 0.0]), v=np.array([0.0, 0.0, -1.0]), spec=LOCALISER_SPEC)
N = LOCALISER_SPEC.pixels


def _blob(row: float, col: float, height: float = 1.0, sigma: float = 1.5) -> np.ndarray:
    rr, cc = np.mgrid[0:N, 0:N]
    return height * np.exp(-((rr - row) ** 2 + (cc - col) ** 2) / (2 * sigma**2))


ROWS = [30, 44, 58, 72, 86]  # five discs, head to feet, 14 px (35 mm) apart


def test_each_level_is_decoded_at_its_peak_with_subpixel_precision() -> None:
    heatmaps = np.stack([_blob(r + 0.3, 64.6) for r in ROWS])
    points, conf = decode_heatmaps(heatmaps, FRAME)
    for k, r in enumerate(ROWS):
        col, row = patient_to_crop(FRAME, points[k])
        assert abs(row - (r + 0.3)) < 0.2 and abs(col - 64.6) < 0.2
    assert np.all(conf > 0.9)


def test_a_channel_firing_on_the_neighbouring_disc_cannot_take_it() -> None:
    heatmaps = np.stack([_blob(r, 64) for r in ROWS])
    # the L2/L3 channel answers more strongly at L3/L4 than at its own disc
    heatmaps[1] = _blob(ROWS[2], 64, 0.9) + _blob(ROWS[1], 64, 0.6)
    points, _ = decode_heatmaps(heatmaps, FRAME)
    rows = [patient_to_crop(FRAME, p)[1] for p in points]
    assert abs(rows[1] - ROWS[1]) < 0.5
    assert np.all(np.diff(rows) > 0)


def test_midline_is_where_the_canal_answers_most_strongly() -> None:
    points, _ = decode_heatmaps(np.stack([_blob(r, 64) for r in ROWS]), FRAME)
    offsets = np.array([-8.0, -4.0, 0.0, 4.0, 8.0])  # five sagittal slices, 4 mm apart
    strength = np.array([0.1, 0.5, 0.7, 1.0, 0.5])  # strongest one slice to the right
    heatmaps = np.stack([np.stack([_blob(r, 64, s) for r in ROWS]) for s in strength])
    shift = midline_shift(heatmaps, FRAME, points, offsets)
    assert np.all(shift > 1.5) and np.all(shift < 4.0)
