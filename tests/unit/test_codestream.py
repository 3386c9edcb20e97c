"""A compressed frame's own header is checked against the data set before anything is decoded
(inference/codestream.py): real files of every family pass; a header that lies about its size,
components, precision or RLE segments is refused for that image, with the reason, undecoded."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import UID

from inference.codestream import Codestream, CodestreamMismatch, check_codestreams, family, jpeg_header
from inference.volume import UNUSABLE_IMAGE_ERRORS, decode
from tests.support.defects import BOMB_SIZE, jpeg_ls_declaring, lie_about_size

ROOT = Path(__file__).resolve().parents[2]


def _local(name: str) -> Dataset:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"{name} is not in the installed pydicom wheel")
    return pydicom.dcmread(str(path))


def _frame(ds: Dataset) -> bytearray:
    return bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))


def _with_frame(ds: Dataset, frame: bytes) -> Dataset:
    ds.PixelData = encapsulate([bytes(frame)])
    return ds


@pytest.mark.parametrize("name", [
    "JPEG-lossy.dcm", "JPGExtended.dcm", "JPEG-LL.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_16.dcm", "MR_small_jp2klossless.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_rle.dcm",
    "SC_rgb_rle_16bit.dcm", "MR_small.dcm",
])
def test_real_files_of_every_family_pass_the_check(name: str) -> None:
    ds = _local(name)
    check_codestreams(ds, UID(ds.file_meta.TransferSyntaxUID))


def test_families_of_transfer_syntaxes() -> None:
    assert family(UID("1.2.840.10008.1.2.4.80")) is Codestream.JPEG_LS
    assert family(UID("1.2.840.10008.1.2.4.50")) is Codestream.JPEG
    assert family(UID("1.2.840.10008.1.2.4.90")) is Codestream.JPEG_2000
    assert family(UID("1.2.840.10008.1.2.5")) is Codestream.RLE
    assert family(UID("1.2.840.10008.1.2.1")) is None


def test_a_jpeg_ls_codestream_declaring_20000_squared_is_refused_undecoded(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = lie_about_size(_local("MR_small.dcm"))
    assert (ds.Rows, ds.Columns) == (64, 64) and len(ds.PixelData) < 10_000
    assert jpeg_header(_frame(ds)[:100], Codestream.JPEG_LS).rows == BOMB_SIZE

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a decoder ran on a codestream that lies about its size")

    monkeypatch.setattr("inference.decoders.pixel_array", never)
    with pytest.raises(CodestreamMismatch, match=r"JPEG-LS codestream declares 20000 x 20000 .* the data set 64 x 64") \
            as refused:
        decode(ds)
    assert isinstance(refused.value, UNUSABLE_IMAGE_ERRORS)  # load_volume leaves the image out, with the reason


def test_refusing_the_lying_codestream_costs_no_memory() -> None:
    """In a fresh process: decoding the lying image is refused with the peak RSS under 300 MB
    (without the check, pylibjpeg allocates the 800 MB it declares: 2.4 GB peak, measured)."""
    code = textwrap.dedent("""
        import os, pydicom
        from pydicom.data import get_testdata_file
        from inference.volume import decode
        from tests.support.defects import lie_about_size
        from tests.support.procfs import proc_status
        try:
            decode(lie_about_size(pydicom.dcmread(get_testdata_file("MR_small.dcm"))))
        except ValueError as exc:
            print(type(exc).__name__)
        print(proc_status(os.getpid())["VmHWM"] // 1024)  # not ru_maxrss: it counts the forked pytest
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    refused, peak_mb = out.stdout.split()
    assert refused == "CodestreamMismatch" and int(peak_mb) < 300, out.stdout


def test_a_jpeg_frame_header_that_disagrees_is_refused() -> None:
    ds = _local("JPGExtended.dcm")  # 1024 rows x 256 columns, 12-bit
    frame = _frame(ds)
    at = frame.find(b"\xff\xc1")
    struct.pack_into(">H", frame, at + 5, 4096)  # the height
    with pytest.raises(CodestreamMismatch, match=r"declares 256 x 4096 .* the data set 256 x 1024"):
        check_codestreams(_with_frame(ds, frame), UID(ds.file_meta.TransferSyntaxUID))
    ds = _local("JPGExtended.dcm")
    frame = _frame(ds)
    frame[6] = 0xFF  # the sample precision: 255 bits (GDCM crashes on it)
    with pytest.raises(CodestreamMismatch, match="255-bit samples, BitsAllocated is 16"):
        decode(_with_frame(ds, frame))


def test_a_codestream_without_a_frame_header_is_refused() -> None:
    ds = _local("JPEG-lossy.dcm")
    with pytest.raises(CodestreamMismatch, match="does not start with an SOI marker"):
        check_codestreams(_with_frame(ds, b"\x00" * 200), UID(ds.file_meta.TransferSyntaxUID))
    ds = _local("MR_small_jpeg_ls_lossless.dcm")
    with pytest.raises(CodestreamMismatch, match="no frame header before its scan data"):
        check_codestreams(_with_frame(ds, b"\xff\xd8\xff\xda\x00\x08" + b"\x00" * 100),
                          UID(ds.file_meta.TransferSyntaxUID))


def test_a_jpeg_2000_size_that_disagrees_is_refused() -> None:
    ds = _local("MR_small_jp2klossless.dcm")
    frame = _frame(ds)
    at = frame.find(b"\xff\x4f\xff\x51") + 4
    struct.pack_into(">I", frame, at + 4, 40000)  # Xsiz
    with pytest.raises(CodestreamMismatch, match="JPEG 2000 codestream declares 40000 x 64"):
        decode(_with_frame(ds, frame))


def test_jpeg_2000_components_must_match_samples_per_pixel() -> None:
    ds = _local("MR_small_jp2klossless.dcm")
    ds.SamplesPerPixel = 3
    with pytest.raises(CodestreamMismatch, match="1 components, SamplesPerPixel is 3"):
        check_codestreams(ds, UID(ds.file_meta.TransferSyntaxUID))


def test_rle_segment_counts_must_match_samples_and_bytes_per_sample() -> None:
    ds = _local("MR_small_RLE.dcm")  # 16 bit, one sample: 2 segments
    frame = _frame(ds)
    struct.pack_into("<I", frame, 0, 15)
    with pytest.raises(CodestreamMismatch, match=r"RLE header declares 15 segments, .* = 2"):
        decode(_with_frame(ds, frame))
    ds = _local("MR_small_RLE.dcm")
    ds.BitsAllocated = 32
    with pytest.raises(CodestreamMismatch, match=r"declares 2 segments, .* = 4"):
        check_codestreams(ds, UID(ds.file_meta.TransferSyntaxUID))


def test_jpeg_ls_declaring_writes_the_sizes_asked_for() -> None:
    data = jpeg_ls_declaring(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), 300, 200)
    header = jpeg_header(data, Codestream.JPEG_LS)
    assert (header.rows, header.columns, header.precision) == (300, 200, 16)
