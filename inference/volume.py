"""Volumes: the slices of one role, pixels decoded, ordered by position along the slice normal.

Several series may form one volume (two Axial T2 series); their slices may lie in differently
angled stacks, so every slice keeps its own plane. Order never comes from InstanceNumber.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import structlog
from numpy.typing import ArrayLike, NDArray
from pydicom.dataset import Dataset
from pydicom.pixels import apply_rescale

from inference.decoders import decoded_pixels
from inference.geometry import ImagePlane, nearest_plane
from inference.instances import sop_class_uid
from inference.labels import SeriesRole
from inference.series import SeriesHeader

log = structlog.stdlib.get_logger(__name__)


@dataclass
class Slice:
    """One image: its plane, its pixels (float32, rescaled) and how to reference it in DICOM."""

    plane: ImagePlane
    pixels: NDArray[np.float32]
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int


@dataclass
class Volume:
    """The slices serving one role, sorted along the normal of the first stack."""

    role: SeriesRole
    slices: list[Slice]

    @property
    def planes(self) -> list[ImagePlane]:
        return [s.plane for s in self.slices]

    def nearest(self, point: ArrayLike) -> tuple[int, float]:
        """Index of the slice nearest a patient point (that projects into it) and the distance."""
        return nearest_plane(self.planes, point)


MAX_PIXELS = 2**25  # Rows x Columns x frames x samples decoded at most (32 Mi: 128 MiB as float32)


def _count(ds: Dataset, keyword: str, default: int | None) -> int:
    """A positive integer attribute of the pixel description; ValueError names it when it is not."""
    value = ds.get(keyword)
    if value in (None, ""):
        if default is None:
            raise ValueError(f"{keyword} is missing")
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{keyword} is not a single integer") from None
    if number < 1:
        raise ValueError(f"{keyword} is not positive")
    return number


def decode(ds: Dataset, max_pixels: int = MAX_PIXELS) -> NDArray[np.float32]:
    """Pixel data as float32, modality rescale applied, MONOCHROME1 inverted. Compressed transfer
    syntaxes decode through pydicom's plugins in the order ``inference.decoders`` sets (pylibjpeg,
    then GDCM, then Pillow, then pydicom's own; LUMBAR_NODE_DECODER may name one). The size the
    header declares is checked before anything is decoded (a 2 kB file may declare 4 Gi pixels)."""
    declared = (_count(ds, "Rows", None) * _count(ds, "Columns", None) * _count(ds, "NumberOfFrames", 1)
                * _count(ds, "SamplesPerPixel", 1))
    if declared > max_pixels:
        raise ValueError(f"an image of {declared} pixels (Rows x Columns x frames x samples; at most {max_pixels})")
    arr = decoded_pixels(ds)
    if arr.ndim != 2:
        raise ValueError(f"expected a single-frame greyscale image, got shape {arr.shape}")
    out = apply_rescale(arr, ds).astype(np.float32)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        out = out.max() - out
    return out


#: What decoding a broken image raises (not MemoryError, not a timeout: those end the grading).
UNUSABLE_IMAGE_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError, OSError, OverflowError,
                         NotImplementedError, RuntimeError, EOFError)


def instance_number(ds: Dataset) -> int:
    """InstanceNumber as an int, 0 when absent or malformed (it only labels an image: order comes
    from the geometry)."""
    try:
        return int(ds.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        return 0


def _full_dataset(ds: Dataset, path: Path | None) -> Dataset:
    if "PixelData" in ds or path is None:
        return ds
    return pydicom.dcmread(path)


def load_volume(role: SeriesRole, series: list[SeriesHeader], max_pixels: int = MAX_PIXELS) -> Volume:
    """Decode the images of these series and sort them along the slice normal. An image that
    cannot be used (unreadable pixels, a malformed pixel attribute) is left out with a log line
    naming why; the volume fails only when no image is left."""
    slices = []
    left_out: list[str] = []
    for s in series:
        for header, path in s.instances:
            try:
                ds = _full_dataset(header, path)
                slices.append(Slice(
                    plane=ImagePlane.from_dataset(ds),
                    pixels=decode(ds, max_pixels),
                    series_uid=s.series_uid,
                    sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                    sop_class_uid=sop_class_uid(ds),
                    instance_number=instance_number(ds),
                ))
            except UNUSABLE_IMAGE_ERRORS as exc:  # one bad image must not fail its series
                left_out.append(f"{type(exc).__name__}: {exc}")
    if left_out:
        log.warning("images left out: not decodable", role=role.value, images=len(left_out), example=left_out[0])
    if not slices:
        raise ValueError(f"no usable images for {role.value}" + (f" ({left_out[0]})" if left_out else ""))
    normal = slices[0].plane.normal
    slices.sort(key=lambda sl: float(sl.plane.position @ normal))
    return Volume(role, slices)
