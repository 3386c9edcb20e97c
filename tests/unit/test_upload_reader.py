"""The upload read as it arrives: files streamed to staged files, the limit counted while reading
(crossed mid-stream, chunked, a declared Content-Length), the fields before the first file (the
CSRF token) seen before any file byte is written, malformed bodies; and zips: members streamed
out with one running total across every zip of the upload, the compression-ratio and entry-count
bounds, droppings skipped."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import anyio
import pytest

from dicom_node.ingest import Staging, StagingArea, UploadError, UploadLimits, UploadProblem, expand_zips, read_upload
from dicom_node.ingest.upload_reader import BODY_OVERHEAD, _zip_entries

BOUNDARY = "----lumbar-test-boundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
MiB = 2**20


def field(name: str, value: str) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()


def file_head(name: str, field_name: str = "files") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()


def body(fields: dict[str, str], files: dict[str, bytes]) -> bytes:
    out = b"".join(field(k, v) for k, v in fields.items())
    out += b"".join(file_head(name) + data + b"\r\n" for name, data in files.items())
    return out + f"--{BOUNDARY}--\r\n".encode()


class Source:
    """A request body as Starlette's ``request.stream()`` yields it; counts what was pulled."""

    def __init__(self, chunks: Iterable[bytes]):
        self.chunks = iter(chunks)
        self.pulled = 0

    async def stream(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.pulled += len(chunk)
            yield chunk


def chunked(data: bytes, size: int = 4096) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.fixture
def area(tmp_path: Path) -> StagingArea:
    with Staging(tmp_path / "spool").area() as staged:
        yield staged


def _read(area: StagingArea, source: Source, limits: UploadLimits, **kw: object) -> object:
    return anyio.run(lambda: read_upload(source.stream(), CONTENT_TYPE, area, limits, **kw))


def test_files_are_streamed_to_staged_files_and_fields_kept(area: StagingArea) -> None:
    files = {"Jane Doe/a.dcm": os.urandom(3 * MiB + 17), "b.dcm": b"x" * 10}
    got = _read(area, Source(chunked(body({"csrf": "token"}, files), 65536)), UploadLimits(max_bytes=8 * MiB))
    assert got.fields == {"csrf": "token"}
    assert [(f.name, f.path.read_bytes()) for f in got.files] == list(files.items())
    assert all(f.path.parent == area.folder and "Jane" not in f.path.name for f in got.files)  # numbered, not named
    assert got.file_bytes == sum(len(d) for d in files.values())


def test_an_upload_over_the_limit_is_refused_mid_stream(area: StagingArea) -> None:
    """A chunked body (no Content-Length) that never ends is refused once it passes the limit:
    what was pulled from the client stays within the limit plus a chunk."""

    def endless() -> Iterable[bytes]:
        yield field("csrf", "token") + file_head("big.dcm")
        while True:
            yield bytes(65536)

    source = Source(endless())
    with pytest.raises(UploadError) as refused:
        _read(area, source, UploadLimits(max_bytes=4 * MiB))
    assert refused.value.kind is UploadProblem.TOO_LARGE and refused.value.http_status == 413
    assert str(refused.value).startswith("Too large: the upload is over the limit of 4 MiB")
    assert source.pulled <= 4 * MiB + BODY_OVERHEAD + 65536 * 2
    assert sum(p.stat().st_size for p in area.folder.iterdir()) <= 4 * MiB


def test_the_limit_counts_every_file_of_the_upload(area: StagingArea) -> None:
    files = {f"{i}.dcm": bytes(MiB) for i in range(5)}  # 5 MiB in five files of 1 MiB, limit 4 MiB
    with pytest.raises(UploadError) as refused:
        _read(area, Source(chunked(body({}, files), 65536)), UploadLimits(max_bytes=4 * MiB))
    assert refused.value.kind is UploadProblem.TOO_LARGE


def test_a_declared_content_length_over_the_limit_is_refused_before_reading(area: StagingArea) -> None:
    source = Source([body({}, {"a.dcm": b"x"})])
    with pytest.raises(UploadError) as refused:
        _read(area, source, UploadLimits(max_bytes=MiB), content_length=str(200 * MiB))
    assert refused.value.http_status == 413 and source.pulled == 0


def test_the_fields_before_the_first_file_are_checked_before_any_file_byte(area: StagingArea) -> None:
    seen: list[dict[str, str]] = []

    def forged(fields: dict[str, str]) -> None:
        seen.append(fields)
        raise UploadError(UploadProblem.FORBIDDEN, "Refused: the form was out of date", 403)

    with pytest.raises(UploadError) as refused:
        _read(area, Source([body({"csrf": "forged"}, {"a.dcm": b"x" * 100})]), UploadLimits(max_bytes=MiB),
              before_files=forged)
    assert refused.value.http_status == 403 and seen == [{"csrf": "forged"}]
    assert list(area.folder.iterdir()) == []


@pytest.mark.parametrize(("data", "kind"), [
    (body({}, {"a.dcm": b"x"})[:-30], UploadProblem.MALFORMED),  # ends before its last boundary
    (field("x", "y" * (65 * 1024)) + f"--{BOUNDARY}--\r\n".encode(), UploadProblem.MALFORMED),  # a huge field
    (b"".join(field(f"f{i}", "v") for i in range(101)) + f"--{BOUNDARY}--\r\n".encode(), UploadProblem.MALFORMED),
])
def test_malformed_bodies_are_refused(area: StagingArea, data: bytes, kind: UploadProblem) -> None:
    with pytest.raises(UploadError) as refused:
        _read(area, Source([data]), UploadLimits(max_bytes=MiB))
    assert refused.value.kind is kind


def test_not_multipart_is_nothing_chosen(area: StagingArea) -> None:
    with pytest.raises(UploadError) as refused:
        anyio.run(lambda: read_upload(Source([b"x"]).stream(), "application/json", area, UploadLimits(max_bytes=MiB)))
    assert refused.value.kind is UploadProblem.NOTHING_CHOSEN


def test_too_many_files(area: StagingArea) -> None:
    with pytest.raises(UploadError) as refused:
        _read(area, Source([body({}, {f"{i}.dcm": b"x" for i in range(4)})]), UploadLimits(max_bytes=MiB, max_files=3))
    assert refused.value.kind is UploadProblem.TOO_MANY_FILES


# -- zips ------------------------------------------------------------------------------------------


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


def _stage(area: StagingArea, files: dict[str, bytes]) -> list:
    from dicom_node.ingest import StagedFile

    staged = []
    for name, data in files.items():
        path, f = area.new_file()
        with f:
            f.write(data)
        staged.append(StagedFile(name, path))
    return staged


def _dicom_like(n: int) -> bytes:
    return b"\0" * 128 + b"DICM" + os.urandom(n)


def test_zip_members_are_streamed_out_and_droppings_skipped(area: StagingArea) -> None:
    member = _dicom_like(100)
    files = _stage(area, {"s.zip": _zip({"x/a.dcm": member, "x/.DS_Store": b"", "__MACOSX/x/._a.dcm": b"m", "d/": b""}),
                          "b.dcm": _dicom_like(10), ".DS_Store": b"junk"})
    out = expand_zips(files, area, UploadLimits(max_bytes=MiB))
    assert [f.name for f in out] == ["s.zip:x/a.dcm", "b.dcm"]
    assert out[0].path.read_bytes() == member and not files[0].path.exists()  # the zip is gone once expanded


def test_one_running_total_across_every_zip_of_the_upload(area: StagingArea) -> None:
    """Six small zips, each within the limit, inflating to more than it together, are refused."""
    member = os.urandom(16 * 1024) * 64  # 1 MiB that deflates about 60 times: within the ratio bound
    files = _stage(area, {f"{i}.zip": _zip({"a.dcm": member}) for i in range(6)})
    assert sum(f.path.stat().st_size for f in files) < 2 * MiB
    with pytest.raises(UploadError) as refused:
        expand_zips(files, area, UploadLimits(max_bytes=5 * MiB))
    assert refused.value.kind is UploadProblem.TOO_LARGE and refused.value.http_status == 413
    assert expand_zips(_stage(area, {f"{i}.zip": _zip({"a.dcm": member}) for i in range(4)}), area,
                       UploadLimits(max_bytes=5 * MiB))


def test_a_zip_bomb_is_refused_by_its_ratio_before_inflating(area: StagingArea) -> None:
    files = _stage(area, {"bomb.zip": _zip({"a.dcm": bytes(200 * MiB)})})  # about 200 kB
    assert files[0].path.stat().st_size < MiB
    with pytest.raises(UploadError) as refused:
        expand_zips(files, area, UploadLimits(max_bytes=1024 * MiB))
    assert refused.value.kind is UploadProblem.TOO_LARGE and "inflates" in str(refused.value)
    assert sorted(p.name for p in area.folder.iterdir()) == [files[0].path.name]  # nothing inflated


def test_zip_entry_count_and_unreadable_zips(area: StagingArea) -> None:
    many = _stage(area, {"many.zip": _zip({f"{i}.dcm": b"x" for i in range(11)})})
    with pytest.raises(UploadError) as refused:
        expand_zips(many, area, UploadLimits(max_bytes=MiB, max_files=10))
    assert refused.value.kind is UploadProblem.TOO_MANY_FILES
    out = io.BytesIO()  # zip64: its entry count is read from the zip64 end record
    with zipfile.ZipFile(out, "w") as z:
        for i in range(70000):
            z.writestr(f"{i}", b"")
    many = _stage(area, {"zip64.zip": out.getvalue()})
    assert _zip_entries(many[0].path) == 70000  # counted before zipfile reads the central directory
    with pytest.raises(UploadError) as refused:
        expand_zips(many, area, UploadLimits(max_bytes=64 * MiB, max_files=20000))
    assert refused.value.kind is UploadProblem.TOO_MANY_FILES and "zip members included" in str(refused.value)
    broken = bytearray(_zip({"a.dcm": _dicom_like(5000)}))
    broken[40:60] = b"\xff" * 20  # the member's deflate data
    with pytest.raises(UploadError) as refused:
        expand_zips(_stage(area, {"broken.zip": bytes(broken)}), area, UploadLimits(max_bytes=MiB))
    assert refused.value.kind is UploadProblem.WRONG_FORMAT
    assert str(refused.value).startswith("Wrong format: broken.zip is a zip that cannot be read")
