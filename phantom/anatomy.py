"""Anatomy of the synthetic lumbar spine: random parameters, tissue rendering, ground-truth points.

The spine lives in a *spine frame* (millimetres, LPS axes: +x patient left, +y posterior, +z head)
that a small rigid transform puts into patient coordinates. In the sagittal plane the posterior
wall of the vertebral bodies follows a circular arc (the lordosis). Every point is described by

* ``x``: left-right offset from the midline,
* ``s``: arc length along the curve, increasing downwards, 0 at the upper endplate of L1,
* ``p``: offset from the curve along its normal, positive towards posterior (the canal starts at 0).

All structures are simple shapes in (x, s, p), so rendering any set of points (a slice of any
orientation) is a few vectorised numpy operations. Severity is a latent narrowing ``f`` in [0, 1]
per label, drawn per grade from overlapping ranges, which shrinks the CSF column (spinal), the
foraminal fat (foraminal) or the lateral recess (subarticular).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any

import numpy as np
from numpy.typing import NDArray

from inference.labels import (
    CONDITIONS,
    LABELS,
    LEVELS,
    Condition,
    ConditionGroup,
    Label,
    Level,
    Severity,
    Side,
)

#: float32 throughout the shapes. numpy's stubs type ``float32_array / 2`` as float64 and ``np.abs(array)`` as of
#: any dtype, so the code writes ``/ 2.0`` and ``abs()`` (the same float32 values: a Python number takes the array's
#: dtype, NEP 50).
F32 = NDArray[np.float32]
#: A signed distance or a membership: float32 from float32 operands and Python floats (numpy keeps the array's
#: precision), float64 where a float64 array or scalar joins in (the sizes of some shapes: np.minimum of two Python
#: floats is a float64 scalar; np.where(mask, 0.0, 1.0) a float64 array).
Field = NDArray[np.floating[Any]]

VERTEBRAE = ("T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1", "S2", "S3")
L1_INDEX = 2  # index of L1 in VERTEBRAE; disc i lies between VERTEBRAE[i] and VERTEBRAE[i + 1]
N_LUMBAR_DISCS_ABOVE_SACRUM = 7  # T11/T12 ... L5/S1 are real discs; the rest are fused (sacrum)


def disc_index(level: Level) -> int:
    """Index of a lumbar level's disc in the anatomy's disc arrays."""
    return L1_INDEX + level.position


class Tissue(IntEnum):
    AIR = 0
    FAT = 1
    SOFT = 2  # abdominal contents
    MUSCLE = 3
    FLOW = 4  # flow void in large vessels
    CORTEX = 5
    MARROW = 6
    ANNULUS = 7
    NUCLEUS = 8
    CSF = 9
    NERVE = 10
    CORD = 11
    LIGAMENT = 12
    FLUID = 13  # facet joint fluid


# Proton density (relative), T1 (ms), T2 (ms) at about 1.5 T. Fat's T2 is the apparent one of fast
# spin echo (J-coupling makes fat bright on FSE T2).
RELAXATION: dict[Tissue, tuple[float, float, float]] = {
    Tissue.AIR: (0.0, 1000.0, 1.0),
    Tissue.FAT: (1.0, 260.0, 140.0),
    Tissue.SOFT: (0.85, 800.0, 65.0),
    Tissue.MUSCLE: (0.8, 870.0, 45.0),
    Tissue.FLOW: (0.03, 1200.0, 50.0),
    Tissue.CORTEX: (0.06, 1000.0, 5.0),
    Tissue.MARROW: (0.9, 500.0, 70.0),
    Tissue.ANNULUS: (0.6, 900.0, 35.0),
    Tissue.NUCLEUS: (0.92, 1150.0, 130.0),
    Tissue.CSF: (1.0, 4000.0, 2000.0),
    Tissue.NERVE: (0.75, 1000.0, 70.0),
    Tissue.CORD: (0.8, 900.0, 85.0),
    Tissue.LIGAMENT: (0.45, 700.0, 25.0),
    Tissue.FLUID: (1.0, 3000.0, 1200.0),
}

# RSNA-like grade frequencies per level (Normal/Mild, Moderate, Severe), before the study's own
# degeneration shifts them. Approximations of the public training labels' proportions.
GRADE_PRIORS: dict[ConditionGroup, tuple[tuple[float, float, float], ...]] = {
    ConditionGroup.SPINAL: ((0.93, 0.05, 0.02), (0.88, 0.08, 0.04), (0.80, 0.13, 0.07),
                            (0.66, 0.21, 0.13), (0.91, 0.06, 0.03)),
    ConditionGroup.FORAMINAL: ((0.93, 0.06, 0.01), (0.86, 0.12, 0.02), (0.74, 0.22, 0.04),
                               (0.58, 0.33, 0.09), (0.55, 0.33, 0.12)),
    ConditionGroup.SUBARTICULAR: ((0.88, 0.09, 0.03), (0.76, 0.17, 0.07), (0.63, 0.25, 0.12),
                                  (0.43, 0.33, 0.24), (0.68, 0.23, 0.09)),
}
# Latent narrowing drawn uniformly per grade; neighbouring grades overlap, as readers disagree.
NARROWING_RANGES: dict[Severity, tuple[float, float]] = {
    Severity.NORMAL_MILD: (0.0, 0.42),
    Severity.MODERATE: (0.34, 0.7),
    Severity.SEVERE: (0.62, 0.95),
}


@dataclass
class Anatomy:
    """One synthetic subject: geometry, latent narrowing per label, and its placement in patient space."""

    radius: float  # lordosis arc radius (mm)
    phi_top: float  # arc angle at s = 0 (radians); the apex (most anterior point) is at phi = 0
    body_h: F32  # vertebral body heights, one per VERTEBRAE entry
    disc_h: F32  # disc heights, one per gap between VERTEBRAE entries
    body_w: F32  # half widths of the bodies (left-right)
    body_d: F32  # antero-posterior depths of the bodies
    canal_w: F32  # half widths of the bony canal, per vertebra
    canal_ap: F32  # antero-posterior depths of the bony canal, per vertebra
    torso_w: float  # half width of the torso
    skin_p: float  # p of the posterior skin
    front_p: float  # p of the anterior abdominal wall
    fat_t: float  # subcutaneous fat thickness
    conus_s: float  # s where the spinal cord ends
    degeneration: F32  # disc degeneration per disc, 0..1 (darker nucleus on T2, lower height)
    narrowing: dict[Label, float]  # latent narrowing per label, 0..1
    grades: dict[Label, Severity]  # ground-truth grade per label
    rotation: NDArray[np.float64]  # spine frame -> patient rotation (3x3)
    translation: NDArray[np.float64]  # spine frame origin in patient coordinates
    texture: NDArray[np.float64] = field(default_factory=lambda: np.zeros((4, 4)))

    # ---- derived positions along the curve -------------------------------------------------
    @property
    def body_top(self) -> F32:
        """s of the upper endplate of each vertebra."""
        steps = self.body_h[:-1] + self.disc_h
        tops = np.concatenate([[0.0], np.cumsum(steps)]).astype(np.float32)
        return tops - tops[L1_INDEX]

    @property
    def disc_center(self) -> F32:
        """s of the centre of each disc."""
        return self.body_top[:-1] + self.body_h[:-1] + self.disc_h / 2.0

    def narrowing_array(self, condition: Condition) -> F32:
        """Latent narrowing per disc (zeros outside L1/L2..L5/S1)."""
        out = np.zeros(len(self.disc_h), np.float32)
        for level in LEVELS:
            out[disc_index(level)] = self.narrowing[Label(condition, level)]
        return out

    # ---- coordinates ---------------------------------------------------------------------
    def to_spine(self, points: NDArray, with_y: bool = False) -> tuple[F32, ...]:
        """Patient points (N, 3) -> (x, s, p) in the spine frame (and the frame's y if asked)."""
        pts = np.asarray(points, np.float32)
        q = (pts - self.translation.astype(np.float32)) @ self.rotation.astype(np.float32)
        x, y, z = q[:, 0], q[:, 1], q[:, 2]
        r = np.float32(self.radius)
        dy, dz = y - r, z
        dist = np.sqrt(dy * dy + dz * dz)
        phi = np.arctan2(dz, -dy)
        s, p = (np.float32(self.phi_top) - phi) * r, r - dist
        return (x, s, p, y) if with_y else (x, s, p)

    def to_patient(self, x: float, s: float, p: float) -> NDArray[np.float64]:
        """A point given in (x, s, p) -> patient coordinates."""
        phi = self.phi_top - s / self.radius
        dist = self.radius - p
        y = self.radius - dist * np.cos(phi)
        z = dist * np.sin(phi)
        return self.rotation @ np.array([x, y, z]) + self.translation

    def tangent(self, s: float) -> NDArray[np.float64]:
        """Unit vector along the spine (downwards) at s, in patient coordinates."""
        phi = self.phi_top - s / self.radius
        return self.rotation @ np.array([0.0, -np.sin(phi), -np.cos(phi)])

    def vertebra_param(self, values: F32, s: F32) -> F32:
        """A per-vertebra parameter interpolated along s (between body centres)."""
        centers = self.body_top + self.body_h / 2
        return np.interp(s, centers, values).astype(np.float32)

    # ---- ground-truth points ---------------------------------------------------------------
    def _level_geometry(self, level: Level) -> tuple[float, float, float]:
        """(s of the disc centre, canal half width, canal AP depth) at a level."""
        s = float(self.disc_center[disc_index(level)])
        cw = float(self.vertebra_param(self.canal_w, np.array([s], np.float32))[0])
        ca = float(self.vertebra_param(self.canal_ap, np.array([s], np.float32))[0])
        return s, cw, ca

    def canal_point(self, level: Level) -> NDArray[np.float64]:
        """Centre of the canal at the disc level (where RSNA readers mark spinal stenosis)."""
        s, _, ca = self._level_geometry(level)
        return self.to_patient(0.0, s, 0.45 * ca)

    def foramen_point(self, level: Level, side: Side) -> NDArray[np.float64]:
        """Centre of a neural foramen (x > 0 is the patient's left)."""
        s, cw, ca = self._level_geometry(level)
        sign = 1.0 if side is Side.LEFT else -1.0
        return self.to_patient(sign * (cw + FORAMEN_X_OFFSET), s + foramen_s_offset(self, level), 0.45 * ca)

    def recess_point(self, level: Level, side: Side) -> NDArray[np.float64]:
        """The lateral recess (subarticular zone) at the disc level."""
        s, cw, ca = self._level_geometry(level)
        sign = 1.0 if side is Side.LEFT else -1.0
        return self.to_patient(sign * (cw - 3.5), s, 0.3 * ca)

    def label_point(self, label: Label) -> NDArray[np.float64]:
        """Where a reader would mark this label, in patient coordinates."""
        cond = label.condition
        if cond.group is ConditionGroup.SPINAL:
            return self.canal_point(label.level)
        assert cond.side is not None
        if cond.group is ConditionGroup.FORAMINAL:
            return self.foramen_point(label.level, cond.side)
        return self.recess_point(label.level, cond.side)


FORAMEN_X_OFFSET = 7.0  # mm lateral of the canal wall: the middle of the foramen


def foramen_s_offset(anat: Anatomy, level: Level) -> float:
    """The foramen's centre lies above the disc centre (between the pedicles)."""
    return -0.3 * float(anat.body_h[disc_index(level)])


# ---- sampling ------------------------------------------------------------------------------


def _rotation(rx: float, ry: float, rz: float) -> NDArray[np.float64]:
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def sample_grades(rng: np.random.Generator) -> tuple[dict[Label, Severity], dict[Label, float]]:
    """Grades per label from RSNA-like priors, correlated within a study, and their latent narrowing."""
    degeneration = rng.normal(0.0, 1.0)
    grades: dict[Label, Severity] = {}
    narrowing: dict[Label, float] = {}
    for label in LABELS:
        prior = np.array(GRADE_PRIORS[label.condition.group][label.level.position])
        w = prior * np.exp(0.6 * degeneration * np.arange(3))
        grade = Severity(int(rng.choice(3, p=w / w.sum())))
        lo, hi = NARROWING_RANGES[grade]
        grades[label] = grade
        narrowing[label] = float(rng.uniform(lo, hi))
    return grades, narrowing


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one subject: size, curvature, grades and placement vary from study to study."""
    n = len(VERTEBRAE)
    scale = rng.uniform(0.88, 1.12)
    grades, narrowing = sample_grades(rng)
    body_h = np.array([23, 24, 25, 26, 27, 27, 26, 24, 20, 17], np.float32) * scale
    body_h *= rng.uniform(0.95, 1.05, n).astype(np.float32)
    disc_h = np.array([6.5, 7.5, 8.5, 9.5, 10.5, 11.0, 10.5, 2.5, 2.0], np.float32) * scale
    # Disc degeneration follows the worst narrowing at the level (degenerated discs narrow canals).
    degeneration = np.clip(rng.normal(0.15, 0.1, n - 1), 0, 1).astype(np.float32)
    for level in LEVELS:
        worst = max(narrowing[Label(c, level)] for c in CONDITIONS)
        degeneration[disc_index(level)] = np.clip(0.7 * worst + rng.normal(0.1, 0.12), 0, 1)
    disc_h *= (1.0 - 0.35 * degeneration) * rng.uniform(0.92, 1.08, n - 1).astype(np.float32)
    body_w = np.linspace(19.0, 25.0, n).astype(np.float32) * scale
    body_w[-3:] = np.array([25.0, 22.0, 17.0]) * scale
    body_d = np.linspace(28.0, 33.0, n).astype(np.float32) * scale
    body_d[-3:] = np.array([32.0, 24.0, 18.0]) * scale
    canal_w = (np.linspace(10.0, 12.0, n) * rng.uniform(0.9, 1.1)).astype(np.float32)
    canal_ap = (np.linspace(16.5, 15.0, n) * rng.uniform(0.88, 1.12)).astype(np.float32)
    canal_ap[-2:] *= 0.7  # the sacral canal is shallow
    lumbar_length = float(body_h[L1_INDEX:7].sum() + disc_h[L1_INDEX:7].sum())
    radius = rng.uniform(170.0, 420.0)
    apex_s = rng.uniform(0.45, 0.7) * lumbar_length
    rotation = _rotation(*np.radians(rng.normal(0.0, [2.0, 2.0, 2.5])))
    translation = np.array([rng.normal(0, 4), rng.uniform(-15, 25), rng.uniform(-40, 40)])
    translation[2] += 0.5 * lumbar_length  # put about L3 near the patient z origin
    skin_p = float(canal_ap.mean() + rng.uniform(45, 85) * scale)
    return Anatomy(
        radius=radius,
        phi_top=apex_s / radius,
        body_h=body_h,
        disc_h=disc_h.astype(np.float32),
        body_w=body_w,
        body_d=body_d,
        canal_w=canal_w,
        canal_ap=canal_ap,
        torso_w=float(rng.uniform(135, 185) * scale),
        skin_p=skin_p,
        front_p=float(-rng.uniform(150, 230) * scale),
        fat_t=float(rng.uniform(6, 32)),
        conus_s=float(rng.uniform(-0.3, 0.9) * body_h[L1_INDEX]),
        degeneration=degeneration,
        narrowing=narrowing,
        grades=grades,
        rotation=rotation,
        translation=translation,
        texture=np.concatenate(
            [rng.normal(0, 1, (4, 3)) * rng.uniform(0.05, 0.2, (4, 1)), rng.uniform(0, 6.3, (4, 1))],
            axis=1,
        ),
    )


# ---- rendering -----------------------------------------------------------------------------


def _soft(sd: Field, edge: float = 1.0) -> Field:
    """Soft membership from a signed distance (mm, negative inside): partial volume at edges."""
    return np.clip(0.5 - sd * np.float32(1.0 / edge), 0.0, 1.0)


def _ellipse_sd(dx: F32, dy: F32, a: Field | float, b: Field | float) -> Field:
    """Approximate signed distance to an axis-aligned ellipse (exact on circles)."""
    r = np.sqrt((dx / a) ** 2 + (dy / b) ** 2)
    return (r - 1.0) * np.minimum(a, b)


def _superellipse_sd(dx: F32, dy: F32, a: Field | float, b: Field | float) -> Field:
    """Approximate signed distance to a 4th-power superellipse (a rounded box)."""
    u, v = (dx / a) ** 2, (dy / b) ** 2
    r = np.sqrt(np.sqrt(u * u + v * v))
    return (r - 1.0) * np.minimum(a, b)


def _slab_sd(d: F32, half: F32 | float) -> F32:
    return abs(d) - half


def _rounded_corner(inside_s: F32, p_depth: F32, depth: F32, r: float) -> F32:
    """Signed distance that rounds the four sagittal corners of a vertebral body (radius r):
    ``inside_s`` is the distance inside from the nearest endplate, ``p_depth`` the depth from the
    posterior wall (0..depth)."""
    dp = np.minimum(p_depth, depth - p_depth)  # distance inside from the nearest wall
    qs, qp = np.maximum(r - inside_s, 0.0), np.maximum(r - dp, 0.0)
    return np.where((qs > 0) & (qp > 0), np.sqrt(qs * qs + qp * qp) - r, -100.0).astype(np.float32)


class _Canvas:
    """Painter's algorithm over soft memberships: value and hard tissue label per point."""

    def __init__(self, img: F32, lab: NDArray[np.uint8], values: NDArray[np.float32]):
        self.img, self.lab, self.values = img, lab, values

    def paint(self, tissue: Tissue, m: Field) -> None:
        self.img += (self.values[tissue] - self.img) * m
        self.lab[m > 0.5] = tissue

    def subset(self, idx: NDArray[np.intp]) -> _Canvas:
        """A canvas over some of the points (contiguous, so painting it is fast)."""
        return _Canvas(self.img[idx], self.lab[idx], self.values)

    def merge(self, sub: _Canvas, idx: NDArray[np.intp]) -> None:
        self.img[idx], self.lab[idx] = sub.img, sub.lab


@dataclass
class _SpinePoints:
    """Points near the spine in the spine frame, with their segment along s and the local sizes there."""

    x: F32
    s: F32
    p: F32
    ax: F32  # |x|
    k: NDArray[np.intp]  # nearest disc
    ds: F32  # signed distance from the nearest disc centre
    half_disc: F32  # half height of the nearest disc
    sacral: NDArray[np.bool_]  # nearest disc is a fused (sacral) one
    cw: F32  # canal half width
    ca: F32  # canal AP depth
    bw: F32  # vertebral body half width
    column_sd: F32  # < 0 within the column's s-range

    def subset(self, idx: NDArray[np.intp]) -> _SpinePoints:
        """The same description of some of the points."""
        return _SpinePoints(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def _paint_torso(cv: _Canvas, anat: Anatomy, x: F32, y: F32, p: F32) -> None:
    """Torso (a cylinder along the body axis): subcutaneous fat, back muscles, abdominal contents."""
    t_mid, t_half = (anat.skin_p + anat.front_p) / 2, (anat.skin_p - anat.front_p) / 2
    cv.paint(Tissue.FAT, _soft(_ellipse_sd(x, y - t_mid, anat.torso_w, t_half)))
    inner = _ellipse_sd(x, y - t_mid, anat.torso_w - anat.fat_t, t_half - anat.fat_t)
    cv.paint(Tissue.SOFT, _soft(np.maximum(inner, y + 30.0)))  # abdominal contents
    cv.paint(Tissue.MUSCLE, _soft(np.maximum(inner, _ellipse_sd(x, p - 36.0, 64.0, 38.0))))  # back muscles


def _near_spine(ax: F32, p: F32) -> NDArray[np.intp]:
    """Indices of the points near enough to the spine to hold any of its structures."""
    return np.flatnonzero((ax < 70.0) & (p > -60.0) & (p < 60.0))


def _paint_perivertebral(cv: _Canvas, anat: Anatomy, x: F32, s: F32, p: F32, ax: F32, bw: F32, bd: F32) -> None:
    """Perivertebral fat, psoas muscles (growing towards the pelvis), aorta."""
    below = np.clip((s - anat.disc_center[L1_INDEX]) / 120.0, 0.0, 1.0)  # 0 at L1/L2 .. 1 at sacrum
    cv.paint(Tissue.FAT, _soft(_ellipse_sd(x, p + 0.45 * bd, bw + 7.0, 0.5 * bd + 5.0)))
    psoas_r = 6.0 + 14.0 * below
    psoas = _ellipse_sd(ax - (bw + psoas_r * 0.8), p + 0.45 * bd, psoas_r, psoas_r * 1.2)
    cv.paint(Tissue.MUSCLE, _soft(np.maximum(psoas, s - 170.0)))
    s_bif = float(anat.disc_center[disc_index(Level.L4_L5)]) - 10.0
    aorta = _ellipse_sd(x - 10.0, p + bd + 12.0, 9.0, 9.0)
    cv.paint(Tissue.FLOW, _soft(np.maximum(aorta, s - s_bif)))


def _locate_segments(anat: Anatomy, x: F32, s: F32, p: F32, ax: F32, bw: F32) -> _SpinePoints:
    """Segment lookup along s: nearest disc, distance from it, canal size and the column's extent."""
    dc = anat.disc_center
    k = np.clip(np.searchsorted((dc[:-1] + dc[1:]) / 2, s), 0, len(dc) - 1)
    ds = s - dc[k]  # signed distance from the nearest disc centre
    half_disc = anat.disc_h[k] / 2.0
    sacral = k >= N_LUMBAR_DISCS_ABOVE_SACRUM
    cw = anat.vertebra_param(anat.canal_w, s)
    ca = anat.vertebra_param(anat.canal_ap, s)
    top, bottom = anat.body_top[0], anat.body_top[-1] + anat.body_h[-1]
    column_sd = np.maximum(top - s, s - bottom)  # < 0 within the column's s-range
    return _SpinePoints(x, s, p, ax, k, ds, half_disc, sacral, cw, ca, bw, column_sd)


def _paint_bodies_and_discs(cv: _Canvas, anat: Anatomy, sp: _SpinePoints, bd: F32) -> None:
    """Vertebral bodies (cortex shell, marrow) and discs (annulus, nucleus; fused and bony in the sacrum)."""
    x, p, k, ds, half_disc, sacral, bw = sp.x, sp.p, sp.k, sp.ds, sp.half_disc, sp.sacral, sp.bw
    in_disc_sd = _slab_sd(ds, half_disc)  # < 0 inside the disc's s-range
    body_cs = _superellipse_sd(x, p + bd / 2.0, bw, bd / 2.0)
    body_s = np.where(ds > 0, ds - half_disc, ds + half_disc)  # from the nearest endplate, + inside
    corner = _rounded_corner(np.abs(body_s), -p, bd, 3.0)
    body_sd = np.maximum(np.maximum(np.maximum(body_cs, -in_disc_sd), sp.column_sd), corner)
    cv.paint(Tissue.CORTEX, _soft(body_sd))
    cv.paint(Tissue.MARROW, _soft(body_sd + 1.6))
    disc_sd = np.maximum(np.maximum(body_cs - 0.5, in_disc_sd), sp.column_sd)
    cv.paint(Tissue.ANNULUS, _soft(np.where(sacral, 1.0, disc_sd)))
    cv.paint(Tissue.CORTEX, _soft(np.where(sacral, disc_sd, 1.0)))
    nucleus = np.maximum(_ellipse_sd(x, p + 0.45 * bd, 0.6 * bw, 0.3 * bd), _slab_sd(ds, 0.6 * half_disc))
    brightness = np.float32(1.0) - 0.85 * anat.degeneration[k]
    cv.paint(Tissue.NUCLEUS, _soft(np.where(sacral, 1.0, nucleus)) * brightness)


def _posterior_zone(sp: _SpinePoints) -> NDArray[np.intp]:
    """Indices of the points around the canal and the posterior elements."""
    return np.flatnonzero((sp.ax < sp.cw + 24.0) & (sp.p > -3.0) & (sp.p < sp.ca + 40.0))


def _paint_pedicles_and_facets(cv: _Canvas, sp: _SpinePoints) -> None:
    """Pedicle/facet columns either side of the canal, with an oblique facet joint line at each disc level."""
    p, ax, ds, cw, ca, column_sd = sp.p, sp.ax, sp.ds, sp.cw, sp.ca, sp.column_sd
    lateral = _superellipse_sd(ax - (cw + 7.0), p - (ca + 3.0) / 2.0, 7.5, (ca + 5.0) / 2.0)
    lateral = np.maximum(lateral, column_sd)
    cv.paint(Tissue.CORTEX, _soft(lateral))
    cv.paint(Tissue.MARROW, _soft(lateral + 1.4))
    facet_line = np.abs((ax - (cw + 3.0)) * 0.6 - (p - 0.55 * ca) * 0.8) - 0.6
    facet = np.maximum(np.maximum(facet_line, _slab_sd(ds, 5.0)), lateral + 0.5)
    cv.paint(Tissue.FLUID, _soft(np.where(sp.sacral, 1.0, facet), 0.7))


def _paint_foramina(cv: _Canvas, anat: Anatomy, sp: _SpinePoints) -> None:
    """Neural foramina: fat with the exiting root, between the pedicles; narrowing effaces the fat."""
    x, p, ax, k, ds, sacral, cw, ca = sp.x, sp.p, sp.ax, sp.k, sp.ds, sp.sacral, sp.cw, sp.ca
    f_for = np.where(
        x > 0,
        anat.narrowing_array(CONDITIONS[1])[k],
        anat.narrowing_array(CONDITIONS[2])[k],
    )
    s_f = ds + 0.3 * anat.body_h[k]  # s relative to the foramen's centre
    f_half_s, f_half_p = 0.32 * (anat.body_h[k] + anat.disc_h[k]), 0.36 * ca
    f_lat = np.where(sacral, 1.0, _slab_sd(ax - (cw + FORAMEN_X_OFFSET), 9.0))
    space = np.maximum(_ellipse_sd(s_f, p - 0.45 * ca, f_half_s, f_half_p), f_lat)
    cv.paint(Tissue.LIGAMENT, _soft(space))
    fat_s, fat_p = f_half_s * (1.0 - 0.55 * f_for), f_half_p * (1.0 - 0.9 * f_for)
    fat = np.maximum(_ellipse_sd(s_f + 0.25 * f_for * f_half_s, p - 0.45 * ca, fat_s, fat_p), f_lat)
    cv.paint(Tissue.FAT, _soft(fat))
    root_r = 2.3 * (1.0 - 0.3 * f_for)
    root = np.maximum(_ellipse_sd(s_f + 0.3 * f_half_s, p - 0.45 * ca, root_r, root_r), f_lat)
    cv.paint(Tissue.NERVE, _soft(root))


def _paint_laminae_and_spinous(cv: _Canvas, anat: Anatomy, sp: _SpinePoints) -> None:
    """Laminae, spinous processes and interspinous ligament, interrupted at the interlaminar spaces."""
    p, ax, k, ds, cw, ca, column_sd = sp.p, sp.ax, sp.k, sp.ds, sp.cw, sp.ca, sp.column_sd
    gap = np.where(sp.sacral, -1.0, _slab_sd(ds - 1.0, 0.5 * anat.disc_h[k] + 2.5))
    lamina = np.maximum(np.maximum(_slab_sd(p - (ca + 3.5), 3.5), ax - (cw + 4.0)), -gap)
    spinous = np.maximum(np.maximum(_slab_sd(p - (ca + 20.0), 17.0), ax - 3.5), -gap - 2.0)
    posterior = np.maximum(np.minimum(lamina, spinous), column_sd)
    cv.paint(Tissue.CORTEX, _soft(posterior))
    cv.paint(Tissue.MARROW, _soft(posterior + 1.3))
    ligament = np.maximum(np.maximum(_slab_sd(p - (ca + 18.0), 19.0), ax - np.where(p < ca + 4, cw + 2.0, 2.0)), gap)
    cv.paint(Tissue.LIGAMENT, _soft(np.maximum(ligament, column_sd)))


def _paint_canal(cv: _Canvas, anat: Anatomy, sp: _SpinePoints) -> None:
    """The canal: epidural fat, thecal sac (CSF), cord or cauda equina, traversing roots."""
    x, s, p, ax, cw, ca, column_sd = sp.x, sp.s, sp.p, sp.ax, sp.cw, sp.ca, sp.column_sd
    canal = np.maximum(_ellipse_sd(x, p - ca / 2.0, cw, ca / 2.0 + 0.5), column_sd)
    cv.paint(Tissue.FAT, _soft(canal))
    sac_w, sac_a = cw - 1.8, ca / 2.0 - 1.0
    sac = np.maximum(_ellipse_sd(x, p - ca / 2.0, sac_w, sac_a), column_sd)
    cv.paint(Tissue.CSF, _soft(sac))
    taper = np.sqrt(np.clip((anat.conus_s - s) / 25.0, 0.0, 1.0))
    cord = _ellipse_sd(x, p - 0.45 * ca, 4.5 * taper + 1e-3, 3.6 * taper + 1e-3)
    cv.paint(Tissue.CORD, _soft(cord))
    lattice = np.cos(x * np.float32(2 * np.pi / 3.4)) + np.cos(p * np.float32(2 * np.pi / 3.4))
    cauda = np.maximum(np.maximum(sac + 1.2, 0.55 * ca - p), (1.3 - lattice) * 1.5)
    cauda = np.maximum(cauda, anat.conus_s - 15.0 - s)
    cv.paint(Tissue.NERVE, _soft(cauda, 0.8) * 0.8)
    trav = _ellipse_sd(ax - (cw - 3.5), p - 0.3 * ca, 1.7, 1.7)
    cv.paint(Tissue.NERVE, _soft(np.maximum(trav, column_sd)))


def _paint_spinal_stenosis(cv: _Canvas, anat: Anatomy, sp: _SpinePoints) -> None:
    """Spinal stenosis: disc bulge from the front and ligamentum flavum from the back, at the level."""
    x, p, ax, k, ds, cw, ca = sp.x, sp.p, sp.ax, sp.k, sp.ds, sp.cw, sp.ca
    f_sp = anat.narrowing_array(CONDITIONS[0])[k]
    g = np.exp(-((ds / (0.55 * anat.disc_h[k] + 2.5)) ** 2)) * np.where(sp.sacral, 0.0, 1.0)
    bulge = (0.05 + 0.6 * f_sp) * ca * g
    bulge_sd = np.maximum(np.maximum(p - bulge * np.exp(-((x / (1.1 * cw)) ** 2)), -p - 0.5), ax - sp.bw)
    cv.paint(Tissue.ANNULUS, _soft(np.maximum(bulge_sd, _slab_sd(ds, sp.half_disc + 3.0))))
    flavum_t = (0.08 + 0.4 * f_sp) * ca * g
    flavum = np.maximum(np.maximum(ca - flavum_t - 0.3 * ax - p, p - ca - 1.0), ax - cw - 0.5)  # a V
    cv.paint(Tissue.LIGAMENT, _soft(flavum))


def _paint_subarticular_stenosis(cv: _Canvas, anat: Anatomy, sp: _SpinePoints) -> None:
    """Subarticular stenosis: facet and flavum hypertrophy fill the lateral recess."""
    x, p, ax, k, ds, cw, ca = sp.x, sp.p, sp.ax, sp.k, sp.ds, sp.cw, sp.ca
    f_sa = np.where(
        x > 0,
        anat.narrowing_array(CONDITIONS[3])[k],
        anat.narrowing_array(CONDITIONS[4])[k],
    )
    g_sa = np.exp(-((ds / (0.7 * anat.disc_h[k] + 3.5)) ** 2)) * np.where(sp.sacral, 0.0, 1.0)
    mass_r = (1.5 + 8.5 * f_sa) * g_sa
    mass = _ellipse_sd(ax - (cw + 1.0), p - 0.62 * ca, mass_r + 1e-3, 1.2 * mass_r + 1e-3)
    cv.paint(Tissue.LIGAMENT, _soft(np.maximum(mass, ax - cw - 1.0)))


def _textured(anat: Anatomy, points: NDArray, img: F32, lab: NDArray[np.uint8]) -> F32:
    """Texture in marrow and abdominal contents (cheap smooth random field)."""
    pts = np.asarray(points, np.float32)
    tex = np.zeros(len(img), np.float32)
    for row in anat.texture:
        tex += np.sin(pts @ row[:3].astype(np.float32) + np.float32(row[3]))
    textured = (lab == Tissue.MARROW) | (lab == Tissue.SOFT)
    return np.where(textured, img * (1.0 + 0.035 * tex), img)


def render(
    anat: Anatomy, points: NDArray, values: NDArray[np.float32] | None = None
) -> tuple[F32, NDArray[np.uint8]]:
    """Signal and tissue label at patient points (N, 3).

    ``values`` holds one signal value per Tissue (the series' contrast); by default the tissue
    index itself, which makes the signal a smooth tissue map.
    """
    vals = np.arange(len(Tissue), dtype=np.float32) if values is None else values.astype(np.float32)
    x, s, p, y = anat.to_spine(points, with_y=True)
    whole = _Canvas(np.zeros(len(x), np.float32), np.zeros(len(x), np.uint8), vals)
    ax = np.abs(x)
    _paint_torso(whole, anat, x, y, p)

    # The spine's structures, painted only at the points near it.
    near = _near_spine(ax, p)
    x, s, p, ax = x[near], s[near], p[near], ax[near]
    around_spine = whole.subset(near)
    bw = anat.vertebra_param(anat.body_w, s)
    bd = anat.vertebra_param(anat.body_d, s)
    _paint_perivertebral(around_spine, anat, x, s, p, ax, bw, bd)
    spine = _locate_segments(anat, x, s, p, ax, bw)
    _paint_bodies_and_discs(around_spine, anat, spine, bd)

    # From here on, only the canal and the posterior elements around it.
    zone = _posterior_zone(spine)
    cv, spine = around_spine.subset(zone), spine.subset(zone)
    _paint_pedicles_and_facets(cv, spine)
    _paint_foramina(cv, anat, spine)
    _paint_laminae_and_spinous(cv, anat, spine)
    _paint_canal(cv, anat, spine)
    _paint_spinal_stenosis(cv, anat, spine)
    _paint_subarticular_stenosis(cv, anat, spine)

    around_spine.merge(cv, zone)
    whole.merge(around_spine, near)
    img = whole.img if values is None else _textured(anat, points, whole.img, whole.lab)
    return img, whole.lab


def region_of(anat: Anatomy, points: NDArray) -> list[str]:
    """Named anatomical region of each point, from the shapes (not the pixels), for checks:
    ``canal`` (central third), ``recess-left/right`` (lateral thirds of the canal),
    ``foramen-left/right``, or ``other``; with the nearest lumbar level as ``L4/L5`` etc."""
    x, s, p = anat.to_spine(points)
    out = []
    dc = anat.disc_center
    for xi, si, pi in zip(x, s, p, strict=True):
        k = int(np.argmin(np.abs(dc - si)))
        level = LEVELS[k - L1_INDEX].value if L1_INDEX <= k < L1_INDEX + len(LEVELS) else "none"
        cw = float(anat.vertebra_param(anat.canal_w, np.array([si], np.float32))[0])
        ca = float(anat.vertebra_param(anat.canal_ap, np.array([si], np.float32))[0])
        side = "left" if xi > 0 else "right"
        if 0 < pi < ca and abs(xi) < cw:
            name = "canal" if abs(xi) < cw / 3 else f"recess-{side}"
        elif cw <= abs(xi) <= cw + 16 and 0 < pi < ca and abs(si - dc[k] + 0.3 * anat.body_h[k]) < 0.4 * (
            anat.body_h[k] + anat.disc_h[k]
        ):
            name = f"foramen-{side}"
        else:
            name = "other"
        out.append(f"{name}@{level}")
    return out
