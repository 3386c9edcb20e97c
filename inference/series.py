"""Series of a study and their roles (Sagittal T1, Sagittal T2/STIR, Axial T2).

Roles are decided from what must be in an MR image header, geometry first: the slice orientation
from ImageOrientationPatient, the contrast from the sequence (ScanningSequence, InversionTime,
RepetitionTime, EchoTime). SeriesDescription is only a hint, used when the sequence is silent.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pydicom.dataset import Dataset

from inference.geometry import ImagePlane, classify_orientation
from inference.instances import MR_SOP_CLASSES, sop_class_uid
from inference.labels import SeriesRole
from inference.sanity import screen_series

log = structlog.stdlib.get_logger(__name__)

MAX_SERIES_IMAGES = 1000  # images of one series the analysis takes (a worker's memory bounds it)


@dataclass
class SeriesHeader:
    """One series of a study, known from its headers only (no pixels read)."""

    series_uid: str
    description: str
    orientation: str  # sagittal | axial | coronal | oblique | unknown
    contrast: str | None  # T1 | T2 | STIR | None (unknown)
    instances: list[tuple[Dataset, Path | None]] = field(default_factory=list)
    problem: str | None = None  # why its geometry is impossible for a lumbar spine (inference.sanity): not graded

    @property
    def n_images(self) -> int:
        return len(self.instances)


_DESCRIPTION_HINTS = (
    (re.compile(r"stir|tirm|\bir\b", re.IGNORECASE), "STIR"),
    (re.compile(r"t2", re.IGNORECASE), "T2"),
    (re.compile(r"t1", re.IGNORECASE), "T1"),
)


def _number(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def contrast_of(ds: Dataset) -> str | None:
    """T1, T2 or STIR from the sequence parameters, else from the description, else None."""
    sequence = ds.get("ScanningSequence", "")
    sequence = {sequence} if isinstance(sequence, str) else set(sequence)
    ti = _number(ds, "InversionTime")
    tr, te = _number(ds, "RepetitionTime"), _number(ds, "EchoTime")
    if ("IR" in sequence and ti is not None and ti < 400) or (ti is not None and 100 < ti < 300):
        return "STIR"
    if tr is not None and te is not None:
        if te >= 60 and tr >= 1500:
            return "T2"
        if te <= 30 and tr <= 1200:
            return "T1"
    text = f"{ds.get('SeriesDescription', '')} {ds.get('ProtocolName', '')}"
    for pattern, name in _DESCRIPTION_HINTS:
        if pattern.search(text):
            return name
    return None


def usable_geometry(ds: Dataset) -> str | None:
    """Why an image's geometry cannot be used (NaN, non-unit or non-orthogonal directions, an
    absurd position, no spacing), or None when it can."""
    try:
        ImagePlane.from_dataset(ds)
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
        return str(exc) or type(exc).__name__
    return None


def not_an_mr_image(ds: Dataset) -> bool:
    """Whether the header names a SOP class that is not an MR image storage class (a Secondary
    Capture holding an MR image, say): such an image is never taken for an MR series. A header
    naming no class at all is judged by the node's eligibility, not here."""
    uid = sop_class_uid(ds)
    return bool(uid) and uid not in MR_SOP_CLASSES


def group_series(instances: Iterable[tuple[Dataset, Path | None]]) -> list[SeriesHeader]:
    """Group image headers by SeriesInstanceUID; orientation by majority of the instances.

    An image whose geometry cannot be used is left out (a log line per series says how many and
    why), so that one broken header does not decide a series' orientation or fail the study; so is
    an image of a SOP class other than the MR image storage classes. Each series' geometry is then
    checked (``inference.sanity.screen_series``): a few images of impossible spacing are left out;
    a series that is impossible as a whole is kept with its ``problem`` named, and not graded."""
    groups: dict[str, list[tuple[Dataset, Path | None]]] = defaultdict(list)
    left_out: dict[str, list[str]] = defaultdict(list)
    multiframe = not_mr = 0
    for ds, path in instances:
        if "SeriesInstanceUID" not in ds:
            continue
        if not_an_mr_image(ds):
            not_mr += 1
            continue
        if "PerFrameFunctionalGroupsSequence" in ds:  # enhanced multi-frame: geometry per frame, not read
            multiframe += 1
            continue
        if "ImageOrientationPatient" not in ds:  # images with geometry only
            continue
        problem = usable_geometry(ds)
        if problem is not None:
            left_out[str(ds.SeriesInstanceUID)].append(problem)
            continue
        groups[str(ds.SeriesInstanceUID)].append((ds, path))
    if multiframe:
        log.warning("images left out: enhanced multi-frame images are not supported", images=multiframe)
    if not_mr:
        log.warning("images left out: not of an MR image storage class", images=not_mr)
    for uid, problems in left_out.items():
        log.warning("images left out: unusable geometry", series_uid=uid, images=len(problems), example=problems[0])
    out = []
    for uid, items in groups.items():
        kept, implausible, problem = screen_series([ImagePlane.from_dataset(ds) for ds, _ in items])
        if implausible and problem is None:
            log.warning("images left out: implausible geometry", series_uid=uid, images=len(implausible),
                        example=next(iter(implausible.values())))
            items = [items[i] for i in kept]
        votes: dict[str, int] = defaultdict(int)
        for ds, _ in items:
            try:
                votes[classify_orientation(ds.ImageOrientationPatient)] += 1
            except (ValueError, TypeError):
                votes["unknown"] += 1
        first = items[0][0]
        out.append(SeriesHeader(
            series_uid=uid,
            description=str(first.get("SeriesDescription", "")),
            orientation=max(votes, key=lambda k: votes[k]),
            contrast=contrast_of(first),
            instances=items,
            problem=problem,
        ))
    return sorted(out, key=lambda s: s.series_uid)


def log_untidy_uids(series: list[SeriesHeader]) -> None:
    """Log (once per study) what real exports do that the analysis copes with: SOPInstanceUIDs that
    repeat across series (the Kaggle files: "<study>.<series_no>.<n>" in every series), and series
    with different FrameOfReferenceUIDs, whose patient coordinates are used together regardless."""
    seen: dict[str, str] = {}
    repeated = 0
    for s in series:
        for ds, _ in s.instances:
            uid = str(ds.get("SOPInstanceUID", ""))
            if seen.setdefault(uid, s.series_uid) != s.series_uid:
                repeated += 1
    if repeated:
        log.warning("SOPInstanceUIDs repeat across series: images are told apart by series and file",
                    instances=repeated)
    frames = {str(ds.get("FrameOfReferenceUID", "")) for s in series for ds, _ in s.instances[:1]}
    if len(frames) > 1:
        log.info("series have different FrameOfReferenceUIDs: their patient coordinates are used together",
                 series=len(series), frames_of_reference=len(frames))


def role_of(series: SeriesHeader) -> SeriesRole | None:
    """The role a series can serve, from its orientation and contrast (None: no role)."""
    if series.orientation == "sagittal":
        if series.contrast == "T1":
            return SeriesRole.SAG_T1
        if series.contrast in ("T2", "STIR"):
            return SeriesRole.SAG_T2
    if series.orientation == "axial" and series.contrast == "T2":
        return SeriesRole.AX_T2
    return None


def assign_roles(series: list[SeriesHeader], min_images: int = 3,
                 max_images: int = MAX_SERIES_IMAGES) -> dict[SeriesRole, list[SeriesHeader]]:
    """The series that serve each role. A sagittal role takes the one series with most images
    (T2 preferred over STIR); the axial role takes every axial T2 series (they are merged). A
    series of more than ``max_images`` images is not used (it would not fit a worker's memory), nor
    is one whose geometry is impossible (``SeriesHeader.problem``)."""
    roles: dict[SeriesRole, list[SeriesHeader]] = {}
    candidates: dict[SeriesRole, list[SeriesHeader]] = defaultdict(list)
    for s in series:
        role = role_of(s)
        if role is not None and s.problem is not None:
            log.warning("series not used: implausible geometry", series_uid=s.series_uid, role=role.value,
                        images=s.n_images, why=s.problem)
            continue
        if role is not None and s.n_images > max_images:
            log.warning("series not used: too many images", series_uid=s.series_uid, images=s.n_images,
                        limit=max_images)
            continue
        if role is not None and s.n_images >= min_images:
            candidates[role].append(s)
    for role, found in candidates.items():
        if role is SeriesRole.AX_T2:
            roles[role] = found
        else:
            found.sort(key=lambda s: (s.contrast == "T2", s.n_images), reverse=True)
            roles[role] = found[:1]
    return roles


def geometry_refusals(series: list[SeriesHeader], role: SeriesRole) -> list[str]:
    """Why the series of ``role`` that ``assign_roles`` refused for their geometry were refused."""
    return [s.problem for s in series if s.problem is not None and role_of(s) is role]
