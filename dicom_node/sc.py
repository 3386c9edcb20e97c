"""Grad-CAM Secondary Capture images (highdicom SCImage, RGB), one series in the source study: the
source slice with the heatmap blended over it and the finding written on the image."""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np
from highdicom.sc import SCImage
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.sr import MANUFACTURER, copy_patient_study
from inference.analyze import LabelResult, StudyResult
from inference.geometry import ImagePlane, direction_letters
from inference.volume import decode

SC_SERIES_NUMBER = 9902
SC_SERIES_DESCRIPTION = "AI Grad-CAM heatmaps - not for diagnosis"
DISCLAIMER = "AI result - not for diagnosis"


def _window(ds: Dataset, pixels: NDArray[np.float32]) -> NDArray[np.uint8]:
    """8-bit greyscale with the source's own window (first value), else a percentile window."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c = float(center[0] if isinstance(center, (list, tuple)) or getattr(center, "VM", 1) > 1 else center)
        w = float(width[0] if isinstance(width, (list, tuple)) or getattr(width, "VM", 1) > 1 else width)
        lo, hi = c - w / 2, c + w / 2
    else:
        lo, hi = np.percentile(pixels, [1, 99.5])
    return np.clip((pixels - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255).astype(np.uint8)


def cam_on_image(r: LabelResult, plane: ImagePlane) -> NDArray[np.float32]:
    """The label's Grad-CAM (on its crop grid) resampled onto the source image's pixel grid, 0..1."""
    assert r.cam is not None and r.location is not None
    frame = r.location.crop
    n = frame.spec.pixels
    cam = cv2.resize(r.cam.astype(np.float32), (n, n), interpolation=cv2.INTER_LINEAR)
    grid = plane.pixel_grid()  # (rows, cols, 3) patient coordinates
    d = grid - frame.center
    half = (n - 1) / 2
    col = (d @ frame.u / frame.spec.mm_per_pixel + half).astype(np.float32)
    row = (d @ frame.v / frame.spec.mm_per_pixel + half).astype(np.float32)
    return cv2.remap(cam, col, row, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def render_overlay(r: LabelResult, source: Dataset) -> NDArray[np.uint8]:
    """RGB picture: the windowed source slice, the heatmap blended over it, and the finding as text."""
    assert r.location is not None and r.probabilities is not None and r.grade is not None
    plane = ImagePlane.from_dataset(source)
    gray = _window(source, decode(source))
    rgb = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    heat = cam_on_image(r, plane)
    colour = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    alpha = (0.5 * np.clip((heat - 0.15) / 0.85, 0, 1))[..., None]
    out = (rgb * (1 - alpha) + colour * alpha).astype(np.uint8)
    x, y = (int(round(v)) for v in r.location.pixel)
    scale = max(out.shape) / 512
    radius = max(int(4.0 / float(source.PixelSpacing[1])), 3)
    cv2.circle(out, (x, y), radius, (255, 255, 255), max(1, int(scale)), cv2.LINE_AA)
    p = r.probabilities[r.grade.value]
    lines = [f"{r.label.level.value} {r.label.condition.display}", f"{r.grade.display}  p={p:.2f}"]
    font, size, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, max(1, int(scale))
    for i, text in enumerate(lines):
        cv2.putText(out, text, (6, int(18 * scale * (i + 1))), font, size, (0, 0, 0), thick + 2, cv2.LINE_AA)
        cv2.putText(out, text, (6, int(18 * scale * (i + 1))), font, size, (255, 255, 0), thick, cv2.LINE_AA)
    bottom = out.shape[0] - int(8 * scale)
    cv2.putText(out, DISCLAIMER, (6, bottom), font, size, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(out, DISCLAIMER, (6, bottom), font, size, (255, 80, 80), thick, cv2.LINE_AA)
    return out


def _orientation(source: Dataset) -> tuple[str, str]:
    """Patient Orientation of the picture: the major-axis letter of its rows and columns."""
    plane = ImagePlane.from_dataset(source)
    return direction_letters(plane.row_dir)[0], direction_letters(plane.col_dir)[0]


def build_sc_images(result: StudyResult, sources: Mapping[str, Dataset], series_uid: str | None = None) -> list[SCImage]:
    """One Secondary Capture per graded label. ``sources`` maps SOPInstanceUID -> the source image
    (with its pixels)."""
    series_uid = series_uid or generate_uid()
    images = []
    for r in result.labels:
        if not r.assessed or r.location is None or r.cam is None:
            continue
        source = sources[r.location.sop_instance_uid]
        rgb = render_overlay(r, source)
        sc = SCImage.from_ref_dataset(
            ref_dataset=source, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=SC_SERIES_NUMBER,
            sop_instance_uid=generate_uid(), instance_number=len(images) + 1, manufacturer=MANUFACTURER,
            patient_orientation=_orientation(source),
        )
        copy_patient_study(source, sc)
        sc.SeriesDescription = SC_SERIES_DESCRIPTION
        sc.BurnedInAnnotation = "YES"
        sc.Laterality = ""  # General Series Type 2C: unpaired body part
        sc.ImageComments = f"{r.label.level.value} {r.label.condition.display}: {r.grade.display}. {DISCLAIMER}"
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.SOPClassUID
        ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
        sc.SourceImageSequence = [ref]
        sc.DerivationDescription = "Grad-CAM of the predicted grade blended over the source image"
        images.append(sc)
    return images
