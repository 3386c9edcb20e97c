"""Training samples from the RSNA layout: volumes, ground-truth points, localiser images, crops.

Everything geometric goes through ``inference`` (series, volumes, crops, localiser grid), so that
training sees exactly what serving sees. Per study we keep only small arrays (float16 crops), which
``training.cache`` stores for ``lumbar-node prepare``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import structlog
from numpy.typing import NDArray

from inference.geometry import ImagePlane
from inference.labels import LABELS, LEVELS, ConditionGroup, Label, Level, SeriesRole
from inference.levels import (
    CANAL_CENTRED,
    GRADER_SPEC,
    LOCALISER_SPEC,
    crop_axes,
    localiser_input,
    patient_to_crop,
    side_sign,
)
from inference.preprocess import HEAD, LEFT, POSTERIOR, CropSpec, crop_25d, intensity_of
from inference.series import group_series
from inference.volume import Volume, load_volume
from training.rsna import StudyRecord, read_image

log = structlog.stdlib.get_logger(__name__)

JITTER_PX = 8  # cached crop windows are this much larger on each side (at GRADER_SPEC's pitch), for jitter


def jitter_margin(grader: CropSpec) -> int:
    """The window's margin in pixels around a grader crop: ``JITTER_PX`` at the small preset's
    pitch, the same millimetres (at least ``JITTER_PX`` pixels) at a finer one."""
    return max(JITTER_PX, round(JITTER_PX * GRADER_SPEC.mm_per_pixel / grader.mm_per_pixel))


def window_spec(grader: CropSpec) -> CropSpec:
    """The cached window of a grader crop: ``jitter_margin`` pixels more on each side, one slice
    more on each side (for the slice-shift augmentation), at the crop's pitch."""
    m = jitter_margin(grader)
    return CropSpec(grader.mm_per_pixel * (grader.pixels + 2 * m), grader.pixels + 2 * m, grader.n_slices + 2)


CACHE_SPEC = window_spec(GRADER_SPEC)  # the small preset's window: 64 px, 5 slices
HEATMAP_SIGMA_PX = 2.0  # the localiser's target: a gaussian of this width at each disc's canal point


@dataclass(frozen=True)
class LocaliserSample:
    """One localiser image and where its disc levels' canal points lie on it."""

    image: NDArray[np.float16]  # (3, n, n) on the localiser's grid (LOCALISER_SPEC: 128 px)
    peaks: NDArray[np.float32]  # (5, 2) (col, row) of each level's canal point, NaN where not marked
    jittered: bool  # centred off the middle of the sagittal series (training only), else the served centre

    def target(self, sigma_px: float = HEATMAP_SIGMA_PX) -> NDArray[np.float32]:
        """The heatmap target (5, n, n): ``inference.levels.heatmap_target`` of the same points."""
        return render_heatmaps(self.peaks, self.image.shape[-1], sigma_px)


@dataclass
class StudySamples:
    """What training needs of one study."""

    study_id: int
    targets: NDArray[np.int64]  # (25,), -1 unlabelled
    points: dict[Label, NDArray]  # ground-truth patient points of the labelled findings
    localiser: list[LocaliserSample] = field(default_factory=list)
    windows: dict[int, NDArray[np.float16]] = field(default_factory=dict)  # label index -> its group's window
    images_left_out: int = 0  # image files of the study that could not be used

    def canal_points(self) -> dict[Level, NDArray]:
        return canal_points(self.points)


def canal_points(points: dict[Label, NDArray]) -> dict[Level, NDArray]:
    """The spinal canal's marked point per level."""
    return {lb.level: p for lb, p in points.items() if lb.condition.group is ConditionGroup.SPINAL}


def render_heatmaps(peaks: NDArray, pixels: int, sigma_px: float = HEATMAP_SIGMA_PX) -> NDArray[np.float32]:
    """Gaussian heatmaps (len(peaks), pixels, pixels) at (col, row) peaks; a NaN peak gives zeros."""
    out = np.zeros((len(peaks), pixels, pixels), np.float32)
    rows, cols = np.mgrid[0:pixels, 0:pixels]
    for k, (col, row) in enumerate(np.asarray(peaks, np.float64)):
        if np.isfinite(col) and np.isfinite(row):
            out[k] = np.exp(-((cols - col) ** 2 + (rows - row) ** 2) / (2 * sigma_px**2))
    return out


def read_volumes(record: StudyRecord) -> tuple[dict[SeriesRole, Volume], int]:
    """The study's volumes by role (CSV description), several Axial T2 series merged, and how many
    of its image files could not be used. Images are known by their files (the Kaggle files repeat
    SOP Instance UIDs across series); an unreadable file, or a role none of whose images decode, is
    left out with a log line."""
    out, files, used = {}, 0, 0
    for role in SeriesRole:
        instances = []
        for info in record.series_with_role(role):
            for n in info.instance_numbers:
                files += 1
                ds = read_image(info.file(n), pixels=False)
                if ds is not None:
                    instances.append((ds, info.file(n)))
        if not instances:
            continue
        try:
            out[role] = load_volume(role, [s for s in group_series(instances) if s.problem is None])  # as served
        except ValueError as exc:  # no image of the role decodes
            log.warning("series role left out: no usable image", study=record.study_id, role=role.value,
                        error=str(exc))
            continue
        used += len(out[role].slices)
    return out, files - used


def ground_truth_points(record: StudyRecord) -> dict[Label, NDArray]:
    """Patient coordinates of each labelled point (pixel x/y on its instance -> LPS mm); a point
    whose series or instance file is absent or unreadable, or whose geometry is unusable, is left out."""
    out = {}
    by_id = {s.series_id: s for s in record.series}
    for c in record.coordinates:
        info = by_id.get(c.series_id)
        if info is None or c.instance_number not in info.instance_numbers:
            continue
        ds = read_image(info.file(c.instance_number), pixels=False)
        if ds is None:
            continue
        try:
            out[c.label] = ImagePlane.from_dataset(ds).to_patient(c.x, c.y)
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
            log.warning("label point left out: its image has no usable geometry", study=record.study_id,
                        series=c.series_id, instance_number=c.instance_number, error=str(exc))
    return out


def crop_center(label: Label, points: dict[Label, NDArray], canal: dict[Level, NDArray]) -> NDArray | None:
    """Where training centres a label's crop: its marked point, except for the subarticular zones,
    whose crops are centred on the canal like the served ones (``inference.levels.CANAL_CENTRED``)."""
    if label.condition.group in CANAL_CENTRED:
        return canal.get(label.level)
    return points.get(label)


def local_components(label: Label, delta: NDArray) -> tuple[float, float, float]:
    """A patient vector -> (lateral, posterior, head) mm, lateral mirrored for the right side."""
    return float(delta @ LEFT) * side_sign(label.condition), float(delta @ POSTERIOR), float(delta @ HEAD)


def study_samples(record: StudyRecord, rng: np.random.Generator, localiser_jitter_mm: float = 25.0,
                  windows: Mapping[ConditionGroup, CropSpec] | None = None,
                  localiser: CropSpec = LOCALISER_SPEC) -> StudySamples:
    """Load a study once and cut its localiser images (on ``localiser``'s grid) and grader windows
    (``windows`` per group, default ``CACHE_SPEC``): per sagittal series, a localiser image at the
    served centre and one shifted by up to ``localiser_jitter_mm``."""
    volumes, left_out = read_volumes(record)
    points = ground_truth_points(record)
    samples = StudySamples(record.study_id, np.array(record.targets(), np.int64), points, images_left_out=left_out)
    canal = samples.canal_points()
    for role in (SeriesRole.SAG_T2, SeriesRole.SAG_T1):
        if role not in volumes or not canal:
            continue
        intensity = intensity_of(volumes[role])
        vol = volumes[role]
        plane = vol.slices[len(vol.slices) // 2].plane
        for jitter in (0.0, localiser_jitter_mm):
            shift = rng.uniform(-jitter, jitter, 2)
            loc = localiser_input(vol, intensity, plane.center + shift[0] * plane.row_dir + shift[1] * plane.col_dir,
                                  spec=localiser)
            peaks = np.full((len(LEVELS), 2), np.nan, np.float32)
            for level, point in canal.items():
                peaks[level.position] = patient_to_crop(loc.frame, point)
            samples.localiser.append(LocaliserSample(loc.image.astype(np.float16), peaks, jitter > 0))
    intensities = {role: intensity_of(vol) for role, vol in volumes.items()}
    for i, label in enumerate(LABELS):
        role = label.condition.series_role
        center = crop_center(label, points, canal)
        if center is None or role not in volumes or samples.targets[i] < 0:
            continue
        u, v, across = crop_axes(label.condition)
        window = windows[label.condition.group] if windows is not None else CACHE_SPEC
        samples.windows[i] = crop_25d(volumes[role], center, u, v, across, window, intensities[role]).astype(np.float16)
    return samples


def window_crop(window: NDArray, dx: int, dy: int, dz: int, spec: CropSpec = GRADER_SPEC) -> NDArray:
    """A grader crop (``spec``) out of a cached window (margins read from its shape), shifted by
    (dx, dy) pixels and dz slices."""
    n = spec.pixels
    m = (window.shape[-1] - n) // 2
    z0 = window.shape[0] // 2 + dz - spec.n_slices // 2
    return window[z0: z0 + spec.n_slices, m + dy: m + dy + n, m + dx: m + dx + n]


def level_error_mm(predicted: dict[Level, NDArray], truth: dict[Level, NDArray], normal: NDArray) -> list[float]:
    """In-plane distance (mm) between predicted and true canal points, on the sagittal plane."""
    out = []
    for level in LEVELS:
        if level in predicted and level in truth:
            d = predicted[level] - truth[level]
            d = d - (d @ normal) * normal
            out.append(float(np.linalg.norm(d)))
    return out
