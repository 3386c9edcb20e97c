"""Uploads to a running node's web page as a browser or a hostile client sends them: signing in
over HTTP, multipart bodies built by hand (whole, or streamed without a Content-Length), and the
bodies issue 18 probed the node with (a deflate bomb, zips that inflate a long way)."""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from collections.abc import Iterator

import httpx
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, MRImageStorage, generate_uid

BOUNDARY = "lumbar-upload-boundary-7d41"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
MiB = 2**20


def sign_in(web_url: str, name: str, password: str) -> tuple[httpx.Client, str]:
    """A client signed in to the node's web page, and the session's CSRF token."""
    client = httpx.Client(base_url=web_url, timeout=300)
    answer = client.post("/signin", data={"name": name, "password": password, "next": "/",
                                          "csrf": signin_token(client)})
    assert answer.status_code == 303, answer.text
    token = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/").text)
    assert token is not None
    return client, token.group(1)


def signin_token(client: httpx.Client) -> str:
    """The sign-in form's token (its cookie now in ``client``), as a browser gets it with the form."""
    found = re.search(r'name="csrf" value="([^"]+)"', client.get("/signin").text)
    assert found is not None
    return found.group(1)


def image(rows: int, bits: int = 16, pixels: bytes | None = None, study: str | None = None) -> Dataset:
    """An MR image of rows x rows native pixels (zeros unless given)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study or generate_uid(), generate_uid(), "MR"
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, bits, bits, bits - 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels if pixels is not None else bytes(rows * rows * bits // 8)
    return ds


def file_meta(ds: Dataset, transfer_syntax: str) -> bytes:
    """Preamble, 'DICM' and the file meta of a Part 10 file of ``ds``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    return out.getvalue()


def encoded(ds: Dataset) -> bytes:
    """``ds`` encoded Explicit VR Little Endian, no file meta."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def part10(ds: Dataset) -> bytes:
    return file_meta(ds, ExplicitVRLittleEndian) + encoded(ds)


def _header(rows: int, bits: int) -> tuple[Dataset, bytes]:
    """An image's encoded dataset up to its Pixel Data's value, that value declared rows x rows x bits."""
    ds = image(rows, bits, b"")
    return ds, encoded(ds)[:-4] + (rows * rows * bits // 8).to_bytes(4, "little")


def deflate_bomb(inflated_mib: int) -> bytes:
    """A Part 10 file in Deflated Explicit VR Little Endian whose dataset inflates to about
    ``inflated_mib`` MiB of zero pixels (about 1 MiB for 1 GiB)."""
    rows = int((inflated_mib * MiB // 4) ** 0.5)
    ds, header = _header(rows, 32)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [file_meta(ds, DeflatedExplicitVRLittleEndian), packer.compress(header)]
    zeros = bytes(MiB)
    for _ in range(rows * rows * 4 // MiB):
        parts.append(packer.compress(zeros))
    parts.append(packer.compress(bytes(rows * rows * 4 % MiB)) + packer.flush())
    return b"".join(parts)


def zip_of_one_image(size_mib: int) -> bytes:
    """A zip of one DICOM file of ``size_mib`` MiB (zero pixels): about 60 kB for 60 MiB."""
    rows = int((size_mib * MiB // 2) ** 0.5)
    ds, header = _header(rows, 16)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z, \
            z.open("a.dcm", "w", force_zip64=True) as member:
        member.write(file_meta(ds, ExplicitVRLittleEndian) + header)
        left = rows * rows * 2
        while left:
            member.write(bytes(min(MiB, left)))
            left -= min(MiB, left)
    return out.getvalue()


def _part_head(name: str, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()


def multipart(csrf: str | None, files: list[tuple[str, bytes]]) -> bytes:
    """A whole multipart body: the CSRF token's field (unless None), then the files."""
    out = (_part_head("csrf") + csrf.encode() + b"\r\n") if csrf else b""
    for name, data in files:
        out += _part_head("files", name) + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def streamed(csrf: str, total: int, name: str = "big.dcm") -> Iterator[bytes]:
    """A body to send chunked (no Content-Length): the token, then one file of ``total`` zero bytes."""
    yield _part_head("csrf") + csrf.encode() + b"\r\n" + _part_head("files", name)
    zeros = bytes(MiB)
    for _ in range(total // MiB):
        yield zeros
    yield b"\r\n" + f"--{BOUNDARY}--\r\n".encode()
