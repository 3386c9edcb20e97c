"""The web upload's memory, probed as issue 18 found it: a real node (`lumbar-node serve` in its own
process), a viewer signed in over HTTP on loopback, then hostile uploads, one fresh node each,
with the node's peak RSS (VmHWM of /proc/<pid>/status) read before and after:

- ``deflate-bomb``: a ~1 MiB Part 10 file in Deflated Explicit VR Little Endian that inflates to
  ``--bomb-mib`` (1 GiB) of pixel data;
- ``over-limit``: ``--over-mib`` (200 MiB) with ``web.upload_max_mb`` at ``--limit-mib`` (64), the
  CSRF token in the header and a Content-Length;
- ``chunked``: the same without a Content-Length (Transfer-Encoding: chunked), the token in the form;
- ``zips``: six ~60 kB zips, each of one DICOM file of 60 MiB (zero pixels);
- ``normal``: a small valid upload, for the baseline.

    .venv/bin/python tests/benchmarks/probe_upload_memory.py [--cases deflate-bomb,chunked] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import re
import socket
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, MRImageStorage, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.procfs import proc_status  # noqa: E402
from tests.support.served_node import ServedNode, stop_all  # noqa: E402

BOUNDARY = "probe-boundary-7d41"
USER, PASSWORD = "vic", "vic-password-1"
CASES = ("normal", "deflate-bomb", "over-limit", "chunked", "zips")
MiB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _image(rows: int, bits: int = 16, pixels: bytes | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "MR"
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, bits, bits, bits - 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels if pixels is not None else bytes(rows * rows * bits // 8)
    return ds


def _meta(ds: Dataset, transfer_syntax: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    return out.getvalue()


def _encoded(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def deflate_bomb(inflated_mib: int) -> bytes:
    """A Part 10 file whose deflated dataset inflates to ``inflated_mib`` MiB of zero pixels."""
    rows = int((inflated_mib * MiB // 4) ** 0.5)
    ds = _image(rows, 32, b"")
    header = _encoded(ds)[:-4] + (rows * rows * 4).to_bytes(4, "little")
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [_meta(ds, DeflatedExplicitVRLittleEndian), packer.compress(header)]
    zeros = bytes(MiB)
    for _ in range(rows * rows * 4 // MiB):
        parts.append(packer.compress(zeros))
    parts.append(packer.compress(bytes(rows * rows * 4 % MiB)) + packer.flush())
    return b"".join(parts)


def small_file() -> bytes:
    ds = _image(64)
    return _meta(ds, ExplicitVRLittleEndian) + _encoded(ds)


def zip_of(size_mib: int) -> bytes:
    """A zip of one DICOM file of ``size_mib`` MiB (zero pixels): about 60 kB per 60 MiB."""
    rows = int((size_mib * MiB // 2) ** 0.5)
    ds = _image(rows, 16, b"")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("a.dcm", "w", force_zip64=True) as member:
            member.write(_meta(ds, ExplicitVRLittleEndian) + _encoded(ds)[:-4] + (rows * rows * 2).to_bytes(4, "little"))
            left = rows * rows * 2
            while left:
                member.write(bytes(min(MiB, left)))
                left -= min(MiB, left)
    return out.getvalue()


def part_head(name: str, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()


def multipart(csrf: str | None, files: list[tuple[str, bytes]]) -> bytes:
    out = (part_head("csrf") + csrf.encode() + b"\r\n") if csrf else b""
    for name, data in files:
        out += part_head("files", name) + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def streamed(csrf: str, total: int) -> Iterator[bytes]:
    """A chunked body: the token, then one file of ``total`` zero bytes, 1 MiB at a time."""
    yield part_head("csrf") + csrf.encode() + b"\r\n" + part_head("files", "big.dcm")
    zeros = bytes(MiB)
    for _ in range(total // MiB):
        yield zeros
    yield b"\r\n" + f"--{BOUNDARY}--\r\n".encode()


def sign_in(node: ServedNode) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=node.web_url, timeout=300)
    answer = client.post("/signin", data={"name": USER, "password": PASSWORD, "next": "/"})
    assert answer.status_code == 303, answer.text
    token = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/").text)
    assert token is not None
    return client, token.group(1)


def run_case(case: str, root: Path, args: argparse.Namespace) -> dict:
    node = ServedNode(root / case, _free_port(), web={"upload_max_mb": args.limit_mib})
    node.add_user(USER, "viewer", PASSWORD)
    node.start()
    try:
        client, token = sign_in(node)
        pid = node.process.pid
        before = proc_status(pid)["VmHWM"] // 1024
        content_type = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        started = time.perf_counter()
        sent = 0
        try:
            if case == "normal":
                body = multipart(token, [("a.dcm", small_file())])
            elif case == "deflate-bomb":
                body = multipart(token, [("bomb.dcm", deflate_bomb(args.bomb_mib))])
            elif case == "zips":
                body = multipart(token, [(f"{i}.zip", zip_of(60)) for i in range(6)])
            elif case == "over-limit":
                body = multipart(None, [("big.dcm", bytes(args.over_mib * MiB))])
                content_type["X-CSRF-Token"] = token
            else:
                body = None
            if body is not None:
                sent = len(body)
                answer = client.post("/upload", content=body, headers=content_type)
            else:
                sent = args.over_mib * MiB
                answer = client.post("/upload", content=streamed(token, sent), headers=content_type)
            status, message = answer.status_code, answer.text[:160]
        except httpx.HTTPError as exc:  # the node closed the connection while the body was being sent
            status, message = None, f"{type(exc).__name__}: {exc}"[:160]
        seconds = time.perf_counter() - started
        after = proc_status(pid)["VmHWM"] // 1024
        alive = node.process.poll() is None
        leftovers = sorted(str(p.relative_to(node.root)) for p in (node.root / "spool").rglob("*") if p.is_file())
        return {"case": case, "body_mib": round(sent / MiB, 2), "status": status, "answer": message,
                "seconds": round(seconds, 2), "peak_rss_before_mib": before, "peak_rss_after_mib": after,
                "node_alive": alive, "spool_files": len(leftovers)}
    finally:
        stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--bomb-mib", type=int, default=1024, help="what the deflate bomb inflates to (MiB)")
    parser.add_argument("--over-mib", type=int, default=200, help="the over-limit and chunked uploads (MiB)")
    parser.add_argument("--limit-mib", type=float, default=64, help="web.upload_max_mb of the probed node")
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="probe-upload-") as tmp:
        for case in args.cases.split(","):
            result = run_case(case.strip(), Path(tmp), args)
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                print(f"{result['case']:>13}: {result['body_mib']:8.2f} MiB sent -> HTTP {result['status']} in "
                      f"{result['seconds']:6.2f} s; node peak RSS {result['peak_rss_before_mib']} -> "
                      f"{result['peak_rss_after_mib']} MiB; alive {result['node_alive']}; spool files "
                      f"{result['spool_files']}; {result['answer']!r}", flush=True)


if __name__ == "__main__":
    main()
