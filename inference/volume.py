"""Volumes: the slices of one role, pixels decoded, ordered by position along the slice normal.

Several series may form one volume (two Axial T2 series); their slices may lie in differently
angled stacks, so every slice keeps its own plane. Order never comes from InstanceNumber.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.pixels import apply_rescale

from inference.geometry import ImagePlane, nearest_plane
from inference.labels import SeriesRole
from inference.series import SeriesHeader


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

    def nearest(self, point: NDArray) -> tuple[int, float]:
        """Index of the slice nearest a patient point (that projects into it) and the distance."""
        return nearest_plane(self.planes, point)


MAX_PIXELS = 2**25  # Rows x Columns x frames x samples decoded at most (32 Mi: 128 MiB as float32)


def decode(ds: Dataset, max_pixels: int = MAX_PIXELS) -> NDArray[np.float32]:
    """Pixel data as float32, modality rescale applied, MONOCHROME1 inverted. Compressed transfer
    syntaxes decode through pydicom's plugins (pylibjpeg, pillow, gdcm when installed). The size
    the header declares is checked before anything is decoded (a 2 kB file may declare 4 Gi pixels)."""
    declared = (int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
                * int(ds.get("SamplesPerPixel", 1) or 1))
    if declared > max_pixels:
        raise ValueError(f"an image of {declared} pixels (Rows x Columns x frames x samples; at most {max_pixels})")
    arr = ds.pixel_array
    if arr.ndim != 2:
        raise ValueError(f"expected a single-frame greyscale image, got shape {arr.shape}")
    out = apply_rescale(arr, ds).astype(np.float32)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        out = out.max() - out
    return out


def _full_dataset(ds: Dataset, path: Path | None) -> Dataset:
    if "PixelData" in ds or path is None:
        return ds
    return pydicom.dcmread(path)


def load_volume(role: SeriesRole, series: list[SeriesHeader], max_pixels: int = MAX_PIXELS) -> Volume:
    """Decode the images of these series and sort them along the slice normal."""
    slices = []
    for s in series:
        for header, path in s.instances:
            ds = _full_dataset(header, path)
            slices.append(Slice(
                plane=ImagePlane.from_dataset(ds),
                pixels=decode(ds, max_pixels),
                series_uid=s.series_uid,
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                instance_number=int(ds.get("InstanceNumber", 0) or 0),
            ))
    if not slices:
        raise ValueError(f"no images for {role.value}")
    normal = slices[0].plane.normal
    slices.sort(key=lambda sl: float(sl.plane.position @ normal))
    return Volume(role, slices)
