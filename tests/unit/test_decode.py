"""Pixel data in the transfer syntaxes a PACS sends decodes to the same image (real files shipped
inside the pydicom wheel and pydicom-data; nothing is downloaded), through the decoders
``inference.decoders`` picks."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from structlog.testing import capture_logs

from inference.decoders import DECODER_ENV, DecoderChoice, decoder_choice, decoding_plugins
from inference.volume import UNUSABLE_IMAGE_ERRORS, decode
from tests.support.tools import require_tool


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


# ---- decoders: pylibjpeg first, GDCM for what libjpeg refuses, pydicom's own on demand ---------

def _jpeg_lossy_nm() -> pydicom.Dataset:
    """GDCM's JPEG-lossy.dcm (in pydicom's test files): a 12-bit JPEG Extended image whose scan
    header libjpeg refuses (the DICOM WG04 ``*_JPLY`` style)."""
    return pydicom.dcmread(_local("JPEG-lossy.dcm"))


def test_a_12_bit_jpeg_extended_image_libjpeg_refuses_decodes_through_gdcm() -> None:
    ds = _jpeg_lossy_nm()
    assert ds.file_meta.TransferSyntaxUID == JPEGExtended12Bit and ds.BitsStored == 12
    assert decoding_plugins(JPEGExtended12Bit)[:2] == ("pylibjpeg", "gdcm12")
    with pytest.raises(RuntimeError, match="libjpeg"):
        pixel_array(ds, decoding_plugin="pylibjpeg")
    # JPGExtended.dcm holds the same image with a scan header libjpeg accepts
    reference = decode(pydicom.dcmread(_local("JPGExtended.dcm")))
    pixels = decode(ds)
    assert pixels.shape == reference.shape == (1024, 256)
    assert np.abs(pixels - reference).max() <= 1.0 and pixels.max() > 200


@pytest.fixture(scope="module")
def mr_jply(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The DICOM WG04 MR2 image (MR2_UNCI.dcm, 1024 x 1024, 12 bits stored, in pydicom-data) and
    its JPEG Extended 12-bit compression by DCMTK (``dcmcjpeg +ee``), as MR2_JPLY was made."""
    reference = _local("MR2_UNCI.dcm")
    out = tmp_path_factory.mktemp("jply") / "MR2_JPLY.dcm"
    subprocess.run([require_tool("dcmcjpeg"), "+ee", "+rm", reference, str(out)], check=True,
                   capture_output=True, timeout=120)
    return reference, out


@pytest.mark.parametrize("choice", [DecoderChoice.PYLIBJPEG, DecoderChoice.GDCM])
def test_a_12_bit_jpeg_extended_mr_image_decodes_close_to_the_original(
        mr_jply: tuple[str, Path], choice: DecoderChoice, monkeypatch: pytest.MonkeyPatch) -> None:
    reference_path, jply = mr_jply
    reference = decode(pydicom.dcmread(reference_path))
    ds = pydicom.dcmread(jply)
    assert ds.file_meta.TransferSyntaxUID == JPEGExtended12Bit and ds.Modality == "MR" and ds.BitsStored == 12
    monkeypatch.setenv(DECODER_ENV, choice.value)
    pixels = decode(ds)
    error = np.abs(pixels - reference)
    span = float(reference.max() - reference.min())
    assert error.mean() < 0.01 * span and error.max() < 0.05 * span  # lossy, quality 90
    assert np.corrcoef(pixels.ravel(), reference.ravel())[0, 1] > 0.9999


def test_both_12_bit_jpeg_decoders_agree(mr_jply: tuple[str, Path]) -> None:
    ds = pydicom.dcmread(mr_jply[1])
    libjpeg = pixel_array(ds, decoding_plugin="pylibjpeg").astype(np.int32)
    gdcm = pixel_array(ds, decoding_plugin="gdcm12").astype(np.int32)
    assert np.abs(libjpeg - gdcm).max() <= 1


def _rle_phantom_sized() -> pydicom.Dataset:
    """A 768 x 768, 12-bit MR image (the real set's largest sagittal matrix) in RLE Lossless,
    encoded by pydicom's own encoder."""
    ds = pydicom.dcmread(_local("MR_small.dcm"))
    yy, xx = np.mgrid[:768, :768]
    rng = np.random.default_rng(0)
    image = (1500 + 900 * np.sin(xx / 37.0) * np.cos(yy / 23.0) + rng.normal(0, 40, (768, 768)))
    ds.Rows = ds.Columns = 768
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.compress(RLELossless, np.clip(image, 0, 4095).astype(np.uint16), encoding_plugin="pydicom")
    return ds


@pytest.mark.parametrize("make", [lambda: pydicom.dcmread(_local("MR_small_RLE.dcm")), _rle_phantom_sized],
                         ids=["MR_small_RLE", "768px-12bit"])
def test_rle_decodes_identically_with_pylibjpeg_rle_and_pydicoms_own(
        make: Callable[[], pydicom.Dataset], monkeypatch: pytest.MonkeyPatch) -> None:
    assert decoding_plugins(RLELossless)[0] == "pylibjpeg"  # pylibjpeg-rle is installed and first
    assert decoding_plugins(RLELossless, DecoderChoice.PYDICOM) == ("pydicom",)
    new = decode(make())
    monkeypatch.setenv(DECODER_ENV, "pydicom")
    old = decode(make())
    assert np.array_equal(new, old) and new.std() > 0


def test_the_decoder_switch_leaves_syntaxes_it_does_not_serve_to_auto() -> None:
    assert decoding_plugins(JPEGExtended12Bit, DecoderChoice.PYDICOM) == decoding_plugins(JPEGExtended12Bit)
    assert decoding_plugins(JPEGExtended12Bit, DecoderChoice.GDCM) == ("gdcm12",)
    assert decoding_plugins(ExplicitVRLittleEndian) == ()


def test_an_unknown_decoder_switch_is_logged_and_auto_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DECODER_ENV, "fastest-please")
    with capture_logs() as logs:
        assert decoder_choice() is DecoderChoice.AUTO
        pixels = decode(pydicom.dcmread(_local("MR_small_RLE.dcm")))
    assert pixels.shape == (64, 64)
    assert any(DECODER_ENV in entry["event"] and entry["value"] == "fastest-please" for entry in logs), logs


def test_an_image_no_decoder_can_decode_names_every_decoders_reason() -> None:
    ds = pydicom.dcmread(_local("MR_small_RLE.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])  # truncated
    with pytest.raises(RuntimeError, match=r"RLE Lossless image \(pylibjpeg: .+; pydicom: .+\)") as error:
        decode(ds)
    assert isinstance(error.value, UNUSABLE_IMAGE_ERRORS)  # load_volume leaves such an image out, with its reason


def test_gdcm_never_runs_in_this_process() -> None:
    """pydicom's own GDCM plugin (GDCM in process: a corrupt JPEG can end the process) is removed
    from every decoder; GDCM decodes only through gdcm12, in a child process."""
    for syntax in (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless):
        assert "gdcm" not in get_decoder(syntax).available_plugins
    assert "gdcm12" in get_decoder(JPEGExtended12Bit).available_plugins


@pytest.mark.parametrize(("offset", "value", "signal_name"), [(6, 0xFF, "SIGSEGV"), (15, 0x00, "SIGABRT")])
def test_a_jpeg_that_crashes_gdcm_is_an_error_for_that_image_only(
        offset: int, value: int, signal_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One changed byte of JPGExtended.dcm's JPEG header: GDCM (python-gdcm 3.2.6) crashes with a
    segmentation fault or aborts; here it is a clear error, and this process goes on. (Offset 6 is
    the frame header's sample precision, which the codestream check now refuses before any decoder
    runs: test_codestream.py; it is switched off here to reach GDCM.)"""
    ds = pydicom.dcmread(_local("JPGExtended.dcm"))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    frame[offset] = value
    ds.PixelData = encapsulate([bytes(frame)])
    monkeypatch.setenv(DECODER_ENV, "gdcm")
    monkeypatch.setattr("inference.decoders.check_codestreams", lambda ds, syntax: None)
    with pytest.raises(RuntimeError, match=f"gdcm12: GDCM crashed on this image \\({signal_name}\\)"):
        decode(ds)
    assert decode(pydicom.dcmread(_local("JPEG-lossy.dcm"))).max() > 200  # and GDCM still decodes the next image


def test_a_panic_of_the_rust_rle_decoder_is_an_error_for_that_image_only() -> None:
    """pylibjpeg-rle panics (pyo3's PanicException, a BaseException) on this corrupt segment; the
    next decoder, pydicom's own, is tried (and decodes it, with a warning about the segment)."""
    ds = pydicom.dcmread(_local("MR_small_RLE.dcm"))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    frame[64] = 0x81
    ds.PixelData = encapsulate([bytes(frame)])
    with pytest.raises(BaseException, match="index out of bounds") as panic:
        pixel_array(ds, decoding_plugin="pylibjpeg")
    assert not isinstance(panic.value, Exception)
    with pytest.warns(UserWarning, match="RLE segment"):
        assert decode(ds).shape == (64, 64)
