"""Pixel data in the transfer syntaxes a PACS sends decodes to the same image (real files shipped
inside the pydicom wheel; nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from inference.volume import decode


def _local(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"{name} is not in the installed pydicom wheel")
    return str(path)


@pytest.mark.parametrize("name", [
    "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
])
def test_lossless_syntaxes_decode_to_the_uncompressed_pixels(name: str) -> None:
    reference = decode(pydicom.dcmread(_local("MR_small.dcm")))
    assert np.array_equal(decode(pydicom.dcmread(_local(name))), reference)


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEGLSNearLossless_16.dcm", "image_dfl.dcm", "JPEG2000.dcm"])
def test_lossy_and_deflated_syntaxes_decode(name: str) -> None:
    ds = pydicom.dcmread(_local(name))
    pixels = decode(ds)
    assert pixels.shape == (ds.Rows, ds.Columns) and pixels.dtype == np.float32 and pixels.std() > 0


def test_colour_images_are_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="greyscale"):
        decode(pydicom.dcmread(_local("SC_rgb_rle.dcm")))
