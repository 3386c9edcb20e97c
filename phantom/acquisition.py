"""MR acquisitions of the phantom: series protocols, slice geometry, contrast, noise and bias.

Each series is a list of image planes (inference.geometry.ImagePlane) placed around the anatomy the
way a technologist plans them: a sagittal slab centred on the spine, axial stacks angled along each
disc or one axial block. Pixels come from the anatomy's shapes, contrast from the spin-echo signal
equation with the series' TR/TE/TI, then a coil bias field and Rician noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import cv2
import numpy as np
from numpy.typing import NDArray

from inference.geometry import ImagePlane
from inference.labels import LEVELS, SeriesRole
from phantom.anatomy import (
    FORAMEN_X_OFFSET,
    RELAXATION,
    Anatomy,
    Tissue,
    disc_index,
    render,
)


class MatrixSize(StrEnum):
    """The phantom's image sizes."""

    SMALL = "small"  # sagittal 256-384 px, axial 224-320 px, about 0.5-1.25 mm: quick to make and train on
    REAL = "real"  # as the RSNA 2024 files: sagittal 384-768 px, axial 256-320 px, 0.4-0.7 mm, more slices


# The real set's sizes, as issue 19 gives them; the mix of matrices within them is an assumption.
REAL_SPACING = (0.4, 0.7)  # mm per pixel
REAL_SAGITTAL_MATRICES = ((384, 448, 512, 640, 768), (0.35, 0.15, 0.3, 0.1, 0.1))
REAL_SAGITTAL_SLICES = (15, 20)
REAL_AXIAL_MATRICES = ((256, 288, 320), (0.5, 0.2, 0.3))
REAL_AXIAL_SLICES = (40, 60)  # per axial acquisition (split in two series now and then)
REAL_MIN_GAP = 2.5  # mm between axial slices at least


def _real_matrix(rng: np.random.Generator, matrices: tuple[tuple[int, ...], tuple[float, ...]],
                 fov: tuple[float, float]) -> tuple[float, int]:
    """A matrix of the real set and a field of view within ``fov`` whose pixel spacing lies in REAL_SPACING."""
    matrix = int(rng.choice(matrices[0], p=matrices[1]))
    low, high = max(fov[0], REAL_SPACING[0] * matrix), min(fov[1], REAL_SPACING[1] * matrix)
    return float(rng.uniform(low, high)), matrix


@dataclass(frozen=True)
class Contrast:
    """Sequence parameters that set the image contrast and the MR module's attributes."""

    name: str  # T1 | T2 | STIR
    tr: float
    te: float
    ti: float | None = None
    echo_train: int = 4
    flip_angle: float = 90.0

    def tissue_values(self) -> NDArray[np.float32]:
        """Signal per Tissue from the spin-echo (or inversion-recovery) signal equation."""
        out = np.zeros(len(Tissue), np.float32)
        for tissue, (pd, t1, t2) in RELAXATION.items():
            if self.ti is None:
                recovery = 1.0 - np.exp(-self.tr / t1)
            else:
                recovery = abs(1.0 - 2.0 * np.exp(-self.ti / t1) + np.exp(-self.tr / t1))
            out[tissue] = pd * recovery * np.exp(-self.te / t2)
        return out


@dataclass
class SeriesSpec:
    """One series to acquire: its planes in position order and how it is numbered and written."""

    role: SeriesRole
    contrast: Contrast
    planes: list[ImagePlane]
    thickness: float
    spacing: float
    series_number: int
    series_id: int = 0
    instance_numbers: list[int] = field(default_factory=list)
    gain: float = 1000.0
    noise: float = 0.03
    bias: NDArray[np.float64] = field(default_factory=lambda: np.zeros(4))
    field_strength: float = 1.5

    @property
    def description(self) -> str:
        return self.role.value


def _rot(axis: NDArray[np.float64], angle: float) -> NDArray[np.float64]:
    """Rotation matrix about a unit axis (Rodrigues)."""
    a = axis / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _plane(center: NDArray, row: NDArray, col: NDArray, fov: float, matrix: int) -> ImagePlane:
    spacing = fov / matrix
    pos = center - (matrix - 1) / 2 * spacing * (row + col)
    return ImagePlane(pos, row, col, spacing, spacing, matrix, matrix)


def _stack(center: NDArray, row: NDArray, col: NDArray, n: int, gap: float, fov: float, matrix: int,
           rng: np.random.Generator, jitter: float = 0.0) -> list[ImagePlane]:
    """n parallel planes centred on ``center``, ordered along the normal row x col."""
    normal = np.cross(row, col)
    offsets = (np.arange(n) - (n - 1) / 2) * gap + rng.normal(0.0, jitter)
    return [_plane(center + o * normal, row, col, fov, matrix) for o in offsets]


def sagittal_series(anat: Anatomy, rng: np.random.Generator, role: SeriesRole, number: int,
                    field_strength: float, real: np.random.Generator | None = None) -> SeriesSpec:
    """A sagittal slab: 13-19 slices across the spine, columns running posterior, rows inferior.

    With ``real`` (a stream of its own), the real set's sizes (MatrixSize.REAL) are drawn from it:
    the study's own stream ``rng`` is drawn from exactly as for the small sizes, so that a study
    keeps its anatomy, series and labels at either size."""
    thickness = float(rng.choice([3.0, 3.5, 4.0]))
    gap = thickness + float(rng.choice([0.3, 0.4, 0.5, 0.8]))
    # Enough slices to cover both foramina with a margin, as a technologist plans it.
    half_width = float(anat.canal_w.max()) + FORAMEN_X_OFFSET + 9.0
    n = small_n = max(int(rng.integers(13, 20)), 2 * int(np.ceil(half_width / gap)) + 1)
    fov = float(rng.uniform(240, 320))
    matrix = int(rng.choice([256, 320, 384], p=[0.4, 0.4, 0.2]))
    if real is not None:
        low, high = REAL_SAGITTAL_SLICES
        n = min(max(int(real.integers(low, high + 1)), 2 * int(np.ceil(half_width / gap)) + 1), high)
        fov, matrix = _real_matrix(real, REAL_SAGITTAL_MATRICES, (240.0, 320.0))
    s_mid = float(anat.disc_center[disc_index(LEVELS[2])]) + rng.normal(0, 10)
    center = anat.to_patient(rng.normal(0, 2.0), s_mid, rng.uniform(-30, 5))
    tilt = _rot(np.array([0.0, 0.0, 1.0]), np.radians(rng.normal(0, 2.5))) @ _rot(
        np.array([0.0, 1.0, 0.0]), np.radians(rng.normal(0, 2.5)))
    row, col = tilt @ np.array([0.0, 1.0, 0.0]), tilt @ np.array([0.0, 0.0, -1.0])
    if role is SeriesRole.SAG_T1:
        contrast = Contrast("T1", tr=rng.uniform(450, 750), te=rng.uniform(8, 14),
                            echo_train=int(rng.integers(2, 5)), flip_angle=float(rng.choice([90, 150])))
    elif rng.random() < 0.25:
        ti = 150.0 if field_strength < 2 else 210.0
        contrast = Contrast("STIR", tr=rng.uniform(3500, 5000), te=rng.uniform(40, 70),
                            ti=ti + rng.normal(0, 8), echo_train=int(rng.integers(8, 16)))
    else:
        contrast = Contrast("T2", tr=rng.uniform(2800, 4500), te=rng.uniform(85, 120),
                            echo_train=int(rng.integers(12, 25)), flip_angle=float(rng.choice([90, 150])))
    planes = _stack(center, row, col, n, gap, fov, matrix, rng)
    return _finish(SeriesSpec(role, contrast, planes, thickness, gap, number), rng, field_strength, real, small_n)


def axial_series(anat: Anatomy, rng: np.random.Generator, number: int, field_strength: float,
                 continuous: bool, real: np.random.Generator | None = None) -> SeriesSpec:
    """Axial T2: either one stack angled along each disc (3-6 slices each) or one straight block.

    With ``real`` (see sagittal_series): 40-60 slices in all, the stacks along the discs about as
    long as the discs lie apart (8-12 slices each), the block's slices closer together."""
    fov = float(rng.uniform(160, 220))
    matrix = int(rng.choice([224, 256, 320], p=[0.3, 0.5, 0.2]))
    thickness = float(rng.choice([3.5, 4.0, 4.5]))
    if real is not None:
        fov, matrix = _real_matrix(real, REAL_AXIAL_MATRICES, (160.0, 220.0))
        total = int(real.integers(REAL_AXIAL_SLICES[0], REAL_AXIAL_SLICES[1] + 1))
        per_level = [total // len(LEVELS) + (k < total % len(LEVELS)) for k in real.permutation(len(LEVELS))]
    slice_thickness = thickness
    right = anat.rotation @ np.array([1.0, 0.0, 0.0])  # spine frame's +x: the patient's left
    planes: list[ImagePlane] = []
    small_n = 0  # the slices of the small sizes (see _finish)
    if continuous:
        gap = thickness + float(rng.choice([0.0, 0.4, 0.8]))
        top = anat.canal_point(LEVELS[0]) - 14.0 * anat.tangent(float(anat.disc_center[disc_index(LEVELS[0])]))
        bottom = anat.canal_point(LEVELS[-1]) + 12.0 * anat.tangent(float(anat.disc_center[disc_index(LEVELS[-1])]))
        normal = top - bottom
        span = float(np.linalg.norm(normal))
        normal /= span
        normal = _rot(right, np.radians(rng.normal(0, 3))) @ normal
        row = right - (right @ normal) * normal
        row /= np.linalg.norm(row)
        col = np.cross(normal, row)
        n = small_n = int(np.ceil(span / gap)) + 1
        if real is not None:  # the slices closer together (or the block longer) to make ``total``
            n = total
            gap = max(span / (n - 1), REAL_MIN_GAP)
            slice_thickness = min(thickness, gap)
        center = (top + bottom) / 2 + rng.normal(0, 3, 3)
        planes = _stack(center, row, col, n, gap, fov, matrix, rng)[::-1]  # head first
    else:
        gap = thickness + float(rng.choice([0.0, 0.3, 0.5]))
        if real is not None:  # stacks about as long as the discs lie apart (one spacing for all)
            apart = float(np.min(np.diff(anat.disc_center[disc_index(LEVELS[0]) - 1: disc_index(LEVELS[-1]) + 1])))
            gap = float(np.clip(apart / max(per_level), REAL_MIN_GAP, gap))
            slice_thickness = min(thickness, gap)
        for k, level in enumerate(LEVELS):
            s = float(anat.disc_center[disc_index(level)])
            normal = -anat.tangent(s)
            normal = _rot(right, np.radians(rng.normal(0, 4))) @ normal
            row = right - (right @ normal) * normal
            row /= np.linalg.norm(row)
            col = np.cross(normal, row)
            center = anat.to_patient(rng.normal(0, 4), s, rng.uniform(-18, 0))
            n = int(rng.integers(3, 7))
            small_n += n
            if real is not None:
                n = per_level[k]
            planes += _stack(center, row, col, n, gap, fov, matrix, rng, jitter=1.0)[::-1]
    contrast = Contrast("T2", tr=rng.uniform(3000, 5500), te=rng.uniform(85, 115),
                        echo_train=int(rng.integers(10, 22)))
    spec = SeriesSpec(SeriesRole.AX_T2, contrast, planes, slice_thickness, gap, number)
    return _finish(spec, rng, field_strength, real, small_n)


def _finish(spec: SeriesSpec, rng: np.random.Generator, field_strength: float,
            real: np.random.Generator | None = None, small_n: int = 0) -> SeriesSpec:
    """Scanner-dependent gain, noise and bias; instance numbering (sometimes not in position order).
    With ``real``, a permutation of the slices is drawn from it, and ``rng`` is drawn from as for
    the ``small_n`` slices of the small sizes (a permutation's draws depend on the count)."""
    spec.gain = float(rng.uniform(700, 2400))
    spec.noise = float(rng.uniform(0.015, 0.045))
    spec.bias = np.concatenate([[rng.uniform(0.25, 0.8)], rng.normal(0, 0.12, 3)])
    spec.field_strength = field_strength
    n = len(spec.planes)
    order = np.arange(1, n + 1)
    quirk = rng.random()
    if quirk < 0.15:
        order = order[::-1]  # numbered from the other end
    elif quirk < 0.2:  # numbered in acquisition (interleaved) order
        if real is None:
            order = rng.permutation(order)
        else:
            rng.permutation(small_n)  # the study's own stream drawn from as for the small sizes
            order = real.permutation(order)
    spec.instance_numbers = [int(i) for i in order]
    return spec


def render_series(anat: Anatomy, spec: SeriesSpec, rng: np.random.Generator,
                  render_mm: float = 1.1, max_render: int = 256) -> list[NDArray[np.uint16]]:
    """Pixel data for each plane of a series (uint16, 12 bits stored).

    The anatomy is rendered on a grid of about ``render_mm`` (the acquired resolution), with the
    coil's bias field, then interpolated to the series' matrix, where Rician noise is added.
    """
    values = spec.contrast.tissue_values()
    scale = np.float32(spec.gain / max(float(values.max()), 1e-6))
    posterior = anat.rotation @ np.array([0.0, 1.0, 0.0])
    skin = anat.to_patient(0.0, 0.0, anat.skin_p)
    first = spec.planes[0]
    r = int(min(first.rows, max_render, np.ceil(first.rows * first.row_spacing / render_mm)))
    grids = np.stack([plane.pixel_grid(r, r) for plane in spec.planes]).reshape(-1, 3).astype(np.float32)
    img, _ = render(anat, grids, values)
    # Coil sensitivity: falls off with depth from the posterior skin, plus a gentle gradient.
    gradient = np.concatenate([spec.bias[:1] * posterior, spec.bias[1:]]).reshape(2, 3).sum(0)
    offset = float(spec.bias[0] * (skin @ posterior) + first.center @ spec.bias[1:])
    bias = np.exp((grids @ (gradient / 100.0).astype(np.float32)) - np.float32(offset / 100.0))
    signal = (np.clip(img, 0.0, None) * bias * scale).reshape(len(spec.planes), r, r)
    sigma = np.float32(spec.noise * spec.gain)
    images = []
    for plane, low in zip(spec.planes, signal, strict=True):
        full = cv2.resize(low, (plane.columns, plane.rows), interpolation=cv2.INTER_CUBIC) if r != plane.rows else low
        noise_re = rng.standard_normal(full.shape, dtype=np.float32) * sigma
        noise_im = rng.standard_normal(full.shape, dtype=np.float32) * sigma
        magnitude = np.sqrt((np.clip(full, 0.0, None) + noise_re) ** 2 + noise_im**2)
        images.append(np.clip(magnitude, 0, 4095).astype(np.uint16))
    return images
