"""Grad-CAM Secondary Capture images (highdicom SCImage, RGB), one series in the source study: the
source slice with the heatmap blended over it, and burned in the finding (label, AI grade, class
probabilities), the patient orientation and the disclaimer. The model is in each image's
Contributing Equipment Sequence, as in the SR."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import cv2
import numpy as np
from highdicom.sc import SCImage
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.observability import get_logger
from dicom_node.results.identity import DISCLAIMER, DISCLAIMER_LINES, MANUFACTURER
from dicom_node.results.sources import (
    REGION_RADIUS_MM,
    ImageKey,
    PatientStudy,
    algorithm_equipment,
    column_spacing,
    location_key,
    number,
    patient_study,
    sop_reference,
    valid_value,
)
from inference.analyze import AssessedLabel, StudyResult
from inference.geometry import ImagePlane, direction_letters
from inference.labels import SEVERITIES, Label
from inference.volume import decode

log = get_logger(__name__)

SC_SERIES_NUMBER = 9902
SC_SERIES_DESCRIPTION = "AI Grad-CAM heatmaps - not for diagnosis"


def source_window(ds: Dataset) -> tuple[float, float] | None:
    """The source's own window (first WindowCenter and WindowWidth values) when it is usable, else None."""
    center, width = number(ds, "WindowCenter"), number(ds, "WindowWidth")
    return (center, width) if center is not None and width is not None and width > 0 else None


def has_window(ds: Dataset) -> bool:
    """Whether the source's own window (first WindowCenter and WindowWidth values) is usable."""
    return source_window(ds) is not None


def _window(ds: Dataset, pixels: NDArray[np.float32]) -> NDArray[np.uint8]:
    """8-bit greyscale with the source's own window (first value) when usable, else a percentile
    window (no window, or one that is not a number: "abc")."""
    window = source_window(ds)
    if window is not None:
        c, w = window
        lo, hi = c - w / 2, c + w / 2
    else:
        lo, hi = (float(v) for v in np.percentile(pixels, [1, 99.5]))
    windowed: NDArray[np.uint8] = np.clip((pixels - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255).astype(np.uint8)
    return windowed


def _cam_affine(r: AssessedLabel, plane: ImagePlane, scale: tuple[float, float] = (1.0, 1.0)) -> NDArray[np.float64]:
    """The 2 x 3 matrix from a pixel (x, y) of the picture to a pixel (column, row) of the label's
    crop grid. The picture is the source image scaled by ``scale`` (columns, rows) the way
    cv2.resize scales it (pixel centres kept); the map is affine, as both grids are planar."""
    frame = r.location.crop
    step, half = frame.spec.mm_per_pixel, (frame.spec.pixels - 1) / 2
    sx, sy = 1.0 / scale[0], 1.0 / scale[1]
    out = np.empty((2, 3))
    for i, axis in enumerate((frame.u, frame.v)):
        a0 = float((plane.position - frame.center) @ axis) / step + half  # crop pixel of source pixel (0, 0)
        ax = plane.col_spacing * float(plane.row_dir @ axis) / step  # per source column
        ay = plane.row_spacing * float(plane.col_dir @ axis) / step  # per source row
        # source pixel x = (X + 0.5) * sx - 0.5 for picture pixel X (cv2.resize's pixel centres)
        out[i] = (ax * sx, ay * sy, a0 + ax * (0.5 * sx - 0.5) + ay * (0.5 * sy - 0.5))
    return out


def cam_on_image(r: AssessedLabel, plane: ImagePlane, size: tuple[int, int] | None = None) -> NDArray[np.float32]:
    """The label's Grad-CAM (on its crop grid) resampled onto the source image's pixel grid, 0..1;
    with ``size`` (width, height), onto that grid over the same field of view (the picture's).
    One affine warp (bilinear), in OpenCV: no per-pixel coordinates in Python."""
    n = r.location.crop.spec.pixels
    cam = cv2.resize(r.cam.astype(np.float32), (n, n), interpolation=cv2.INTER_LINEAR)
    width, height = size if size is not None else (plane.columns, plane.rows)
    matrix = _cam_affine(r, plane, (width / plane.columns, height / plane.rows))
    on_image = cv2.warpAffine(cam, matrix, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    return np.asarray(on_image, dtype=np.float32)  # float32 already (cam's type): typed, not copied


MIN_SIDE = 512  # pictures are drawn at least this large, so that the burned-in text stays legible
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _text(img: NDArray[np.uint8], text: str, org: tuple[int, int], size: float, colour: tuple[int, int, int],
          outline: bool = False) -> None:
    thick = max(1, round(size * 2))
    if outline:
        cv2.putText(img, text, org, FONT, size, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(img, text, org, FONT, size, colour, thick, cv2.LINE_AA)


def _fit(lines: list[str], width: int, size: float) -> float:
    """The largest font size up to ``size`` at which every line fits the width."""
    widest = max(cv2.getTextSize(line, FONT, 1.0, 1)[0][0] for line in lines)
    return min(size, (width - 16) / widest)


def _banner(img: NDArray[np.uint8], top: int, bottom: int) -> None:
    """Darken a full-width band so that text on it reads over any anatomy."""
    img[top:bottom] = (img[top:bottom] * 0.35).astype(np.uint8)


def finding_lines(r: AssessedLabel) -> list[str]:
    """What the picture says about its finding: label, AI grade, the three class probabilities."""
    probs = "  ".join(f"{s.display} {100 * p:.0f}%" for s, p in zip(SEVERITIES, r.probabilities, strict=True))
    return [f"{r.label.level.value} {r.label.condition.display}", f"AI grade: {r.grade.display}", probs]


@dataclass(frozen=True)
class SourcePicture:
    """A source image made ready once for every finding drawn on it: its plane, its column
    spacing, and the windowed slice scaled to at least MIN_SIDE pixels (``zoom``), as RGB."""

    plane: ImagePlane
    column_spacing: float
    zoom: float
    rgb: NDArray[np.uint8]

    @classmethod
    def of(cls, source: Dataset) -> SourcePicture:
        gray = _window(source, decode(source))
        zoom = max(1.0, MIN_SIDE / max(gray.shape))
        size = (round(gray.shape[1] * zoom), round(gray.shape[0] * zoom))
        gray = np.asarray(cv2.resize(gray, size, interpolation=cv2.INTER_CUBIC), dtype=np.uint8)
        rgb = np.asarray(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB), dtype=np.uint8)
        return cls(ImagePlane.from_dataset(source), column_spacing(source), zoom, rgb)


def render_overlay(r: AssessedLabel, source: Dataset, picture: SourcePicture | None = None) -> NDArray[np.uint8]:
    """RGB picture: the windowed source slice scaled to at least MIN_SIDE pixels, the heatmap blended
    over it, a circle at the finding, the patient orientation at the edges, the finding and the
    disclaimer on dark bands at the top and bottom. ``picture`` is the source made ready
    (``SourcePicture.of(source)``), shared by the findings on one image."""
    picture = picture or SourcePicture.of(source)
    plane, zoom, base = picture.plane, picture.zoom, picture.rgb
    heat = cam_on_image(r, plane, (base.shape[1], base.shape[0]))
    np.clip(heat, 0, 1, out=heat)
    colour = cv2.cvtColor(cv2.applyColorMap(cv2.convertScaleAbs(heat, alpha=255.0), cv2.COLORMAP_JET),
                          cv2.COLOR_BGR2RGB)
    alpha = np.clip((heat - 0.15) * (0.5 / 0.85), 0, 0.5)  # float32, at most half the heatmap's colour
    out = np.asarray(cv2.blendLinear(colour, base, alpha, 1.0 - alpha), dtype=np.uint8)
    h, w = out.shape[:2]
    u = max(h, w) / MIN_SIDE  # 1 at MIN_SIDE
    x, y = (round(v * zoom) for v in r.location.pixel)
    radius = max(int(REGION_RADIUS_MM / picture.column_spacing * zoom), 4)
    cv2.circle(out, (x, y), radius, (255, 255, 255), max(1, round(1.5 * u)), cv2.LINE_AA)

    lines = finding_lines(r)
    fs = _fit(lines, w, 0.6 * u)
    step = int(28 * fs)
    _banner(out, 0, step * len(lines) + int(10 * u))
    for i, (text, rgb) in enumerate(zip(lines, [(255, 255, 255), (255, 230, 0), (200, 230, 255)], strict=True)):
        _text(out, text, (8, step * (i + 1)), fs, rgb)
    fs_d = _fit(list(DISCLAIMER_LINES), w, 0.6 * u)
    step_d = int(28 * fs_d)
    band = step_d * len(DISCLAIMER_LINES) + int(10 * fs_d)
    _banner(out, h - band, h)
    for i, text in enumerate(DISCLAIMER_LINES):
        _text(out, text, (8, h - band + step_d * (i + 1)), fs_d, (255, 110, 110))

    fs_o = 0.6 * u  # orientation letters, as a viewer shows them
    (right, down), (left, up) = _orientation(plane), _orientation(plane, opposite=True)
    top = step * len(lines) + int(34 * u)
    for text, (ox, oy) in [(left, (6, h // 2)), (right, (w - int(22 * u), h // 2)),
                           (up, (w // 2, top)), (down, (w // 2, h - band - int(8 * u)))]:
        _text(out, text, (ox, oy), fs_o, (255, 255, 255), outline=True)
    return out


def _orientation(plane: ImagePlane, opposite: bool = False) -> tuple[str, str]:
    """Patient Orientation of the picture: the major-axis letter of its rows and columns (toward
    the right and bottom edges; with ``opposite``, toward the left and top edges)."""
    sign = -1.0 if opposite else 1.0
    return direction_letters(sign * plane.row_dir)[0], direction_letters(sign * plane.col_dir)[0]


def render_pictures(result: StudyResult, sources: Mapping[ImageKey, Dataset],
                    executor: Executor) -> dict[Label, Future[NDArray[np.uint8]]]:
    """Start drawing every graded label's picture on ``executor`` (a thread pool: decoding,
    resampling, blending and text are OpenCV and NumPy work that releases the interpreter lock),
    each source image made ready once for all the findings on it. The label -> its picture (RGB)."""
    by_source: dict[ImageKey, list[AssessedLabel]] = {}
    for r in result.assessed():
        by_source.setdefault(location_key(r.location), []).append(r)
    pictures: dict[Label, Future[NDArray[np.uint8]]] = {}
    for key, labels in by_source.items():
        source = sources[key]
        ready: Future[SourcePicture] = executor.submit(SourcePicture.of, source)
        for r in labels:  # queued after their source's picture: a thread waits only on one being made
            pictures[r.label] = executor.submit(_draw, r, source, ready)
    return pictures


def _draw(r: AssessedLabel, source: Dataset, ready: Future[SourcePicture]) -> NDArray[np.uint8]:
    return render_overlay(r, source, ready.result())


def build_sc_images(result: StudyResult, sources: Mapping[ImageKey, Dataset], series_uid: str | None = None,
                    patient: PatientStudy | None = None,
                    pictures: Mapping[Label, Future[NDArray[np.uint8]]] | None = None) -> list[SCImage]:
    """One Secondary Capture per graded label, drawn on the image the label was graded on.
    ``sources`` maps (SeriesInstanceUID, SOPInstanceUID) -> the source image (with its pixels);
    ``patient`` holds the patient/study attributes to write (made from the sources when not given);
    ``pictures`` are the labels' pictures started by ``render_pictures`` (drawn here, one after
    the other, when not given)."""
    series_uid = series_uid or generate_uid()
    patient = patient or patient_study(sources.values(), result.study_uid)
    images: list[SCImage] = []
    unwindowed: set[ImageKey] = set()
    for r in result.labels:
        if not isinstance(r, AssessedLabel):
            continue
        key = location_key(r.location)
        source = sources[key]
        if "WindowCenter" in source and not has_window(source):
            unwindowed.add(key)
        rgb = pictures[r.label].result() if pictures is not None else render_overlay(r, source)
        reference = patient.reference(source)
        sc = SCImage.from_ref_dataset(
            ref_dataset=reference, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=SC_SERIES_NUMBER,
            sop_instance_uid=generate_uid(), instance_number=len(images) + 1, manufacturer=MANUFACTURER,
            patient_orientation=_orientation(ImagePlane.from_dataset(source)),
            contributing_equipment=[algorithm_equipment(result)],  # the model (IHE AI Results)
        )
        patient.apply(sc)
        sc.SeriesDescription = SC_SERIES_DESCRIPTION
        sc.BurnedInAnnotation = "YES"
        body_part, _ = valid_value(source, "BodyPartExamined", ascii_only=True)
        if body_part is not None:  # the spine is unpaired: Laterality (Type 2C) stays absent
            sc.BodyPartExamined = body_part
        else:  # unknown body part: Laterality present and empty
            sc.Laterality = ""
        sc.ImageComments = ". ".join([*finding_lines(r), DISCLAIMER])
        sc.SourceImageSequence = [sop_reference(reference)]
        sc.DerivationDescription = "Grad-CAM of the predicted grade blended over the source image"
        images.append(sc)
    if unwindowed:
        log.warning("WindowCenter/WindowWidth not usable: heatmaps drawn with a percentile window",
                    study_uid=result.study_uid, images=len(unwindowed))
    return images
