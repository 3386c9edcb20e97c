"""An upload read as it arrives: a ``multipart/form-data`` body streamed through python-multipart's
parser into staged files, the whole upload counted while it is read (a body over the limit is
refused as soon as it passes it, with or without a Content-Length, chunked or not); then each zip
opened on its staged file, its members streamed out in chunks with one running total of inflated
bytes across every zip of the upload, and bounds on the entries and the compression ratio.
Nothing is held in memory but a chunk; nothing is named after the user's files on disk."""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from dicom_node.errors import NodeError
from dicom_node.ingest.body import BODY_OVERHEAD, CHUNK, StagedBytes, pump_body
from dicom_node.ingest.staging import StagingArea

EXPECTED = "DICOM files (Part 10, with the 'DICM' marker), a folder of them, or a .zip of them"
_EOCD_SEARCH = 22 + 65535  # a zip's end of central directory record and its comment lie in this tail


class UploadProblem(StrEnum):
    """The kind of an upload's refusal: the first words of its message, and all that is logged
    (the message names the user's files, and a file name may hold a patient's name)."""

    NOTHING_CHOSEN = "Nothing chosen"
    WRONG_FORMAT = "Wrong format"
    MALFORMED = "The upload could not be read"
    TOO_LARGE = "Too large"
    TOO_MANY_FILES = "Too many files"
    MORE_THAN_ONE_STUDY = "More than one study"
    NOT_MR = "Not an MR study"
    FROM_PACS = "From the PACS"
    NOT_ACCEPTED = "Not accepted"
    DISK_FULL = "Not enough disk space"
    NOT_STORED = "Not stored"
    FORBIDDEN = "Refused"


class UploadError(NodeError, ValueError):
    """An upload that is refused: its kind, the HTTP status, and a message shown to the user as it is."""

    def __init__(self, kind: UploadProblem, message: str, http_status: int = 400):
        super().__init__(message)
        self.kind, self.http_status = kind, http_status


@dataclass(frozen=True)
class UploadLimits:
    """What one upload may cost."""

    max_bytes: int  # the files' bytes as sent, and again their bytes once zips are inflated
    min_free_bytes: int = 0  # the spool's floor: staging stops below it
    max_files: int = 20000  # files, zip members included
    max_fields: int = 100
    max_field_bytes: int = 64 * 1024
    max_zip_ratio: float = 100.0  # a zip member may inflate to at most this many times its compressed size
    ratio_exempt_bytes: int = 1 << 20  # ... unless it is smaller than this


@dataclass(frozen=True)
class StagedFile:
    """One file of an upload, staged: the name it was sent under (shown back to the user, never
    logged) and where it lies."""

    name: str
    path: Path


@dataclass
class ReceivedUpload:
    """What a multipart body held: its form fields and its files, staged."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[StagedFile] = field(default_factory=list)
    body_bytes: int = 0
    file_bytes: int = 0


def too_large(max_bytes: int) -> UploadError:
    return UploadError(UploadProblem.TOO_LARGE, f"Too large: the upload is over the limit of {max_bytes / 2**20:g} MiB "
                       "(web.upload_max_mb)", 413)


class MultipartReader:
    """A ``multipart/form-data`` body fed chunk by chunk (``feed``), its files written to staged
    files as they come. ``before_files`` sees the form fields sent before the first file (the CSRF
    token) and may refuse by raising UploadError before any file byte is written."""

    def __init__(self, content_type: str, area: StagingArea, limits: UploadLimits,
                 before_files: Callable[[dict[str, str]], None] | None = None):
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise UploadError(UploadProblem.NOTHING_CHOSEN, f"Nothing chosen: choose {EXPECTED}")
        self.area, self.limits, self.before_files = area, limits, before_files
        self.upload = ReceivedUpload()
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._on_part_begin, "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value, "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished, "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end, "on_end": self._on_end})
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._field: tuple[str, bytearray] | None = None
        self._file: BinaryIO | None = None
        self._checked_fields = False
        self._ended = False
        self._staged = StagedBytes(area, limits.max_bytes, limits.min_free_bytes,
                                   lambda: too_large(limits.max_bytes), disk_full)

    def feed(self, chunk: bytes) -> None:
        """Parse the next bytes of the body; UploadError as soon as it breaks a limit or the format."""
        self.upload.body_bytes += len(chunk)
        if self.upload.body_bytes > self.limits.max_bytes + BODY_OVERHEAD:
            raise too_large(self.limits.max_bytes)
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise UploadError(UploadProblem.MALFORMED, f"The upload could not be read: {exc}") from None

    def finish(self) -> ReceivedUpload:
        """The whole body has been fed: what it held (UploadError if it ended early)."""
        self._close_file()
        if not self._ended:
            raise UploadError(UploadProblem.MALFORMED, "The upload could not be read: it ended before its last part")
        return self.upload

    def close(self) -> None:
        """Close a file left open by a body that broke off (the staging area removes it)."""
        self._close_file()

    # -- python-multipart's callbacks ---------------------------------------------------------------

    def _on_part_begin(self) -> None:
        self._disposition = b""

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        if len(self._header_value) > self.limits.max_field_bytes:
            raise UploadError(UploadProblem.MALFORMED, "The upload could not be read: a part header is too long")

    def _on_header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            if len(self.upload.fields) >= self.limits.max_fields:
                raise UploadError(UploadProblem.MALFORMED, "The upload could not be read: too many form fields")
            self._field = (name, bytearray())
            return
        if not self._checked_fields:
            self._checked_fields = True
            if self.before_files is not None:
                self.before_files(dict(self.upload.fields))
        if len(self.upload.files) >= self.limits.max_files:
            raise UploadError(UploadProblem.TOO_MANY_FILES, f"Too many files: at most {self.limits.max_files} "
                              "files in one upload")
        filename = options[b"filename"].decode("utf-8", "replace") or "file"
        path, self._file = self.area.new_file("part")
        if name == "files":
            self.upload.files.append(StagedFile(filename, path))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._field is not None:
            value = self._field[1]
            value += data[start:end]
            if len(value) > self.limits.max_field_bytes:
                raise UploadError(UploadProblem.MALFORMED, "The upload could not be read: a form field is too long")
            return
        if self._file is None:
            return
        self._staged.write(self._file, data[start:end])
        self.upload.file_bytes = self._staged.total

    def _on_part_end(self) -> None:
        if self._field is not None:
            name, value = self._field
            self.upload.fields[name] = value.decode("utf-8", "replace")
            self._field = None
        self._close_file()

    def _on_end(self) -> None:
        self._ended = True

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def disk_full() -> UploadError:
    return UploadError(UploadProblem.DISK_FULL, "Not enough disk space: the node's free disk is under its floor "
                       "(storage.min_free_disk_mb); try again later", 507)


async def read_upload(body: AsyncIterator[bytes], content_type: str, area: StagingArea, limits: UploadLimits,
                      before_files: Callable[[dict[str, str]], None] | None = None,
                      content_length: str | None = None) -> ReceivedUpload:
    """Stream a request body (Starlette's ``request.stream()``) into ``area``: parsed in steps of
    about ``CHUNK`` bytes in a worker thread (the disk writes stay off the event loop), counted
    as it arrives. UploadError (413) as soon as the body passes the limit, or at once when its
    declared Content-Length does."""
    if content_length is not None and content_length.isdigit() and \
            int(content_length) > limits.max_bytes + BODY_OVERHEAD:
        raise too_large(limits.max_bytes)
    if limits.min_free_bytes and area.free_bytes() < limits.min_free_bytes:
        raise disk_full()
    reader = MultipartReader(content_type, area, limits, before_files)
    try:
        await pump_body(body, reader.feed, limits.max_bytes, lambda: too_large(limits.max_bytes))
        return reader.finish()
    finally:
        reader.close()


def is_dicom(path: Path) -> bool:
    """Whether a file starts as DICOM Part 10 does (a preamble, then 'DICM')."""
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def _skipped(member: str) -> bool:
    """macOS and editor droppings inside a zip or a folder."""
    base = member.rsplit("/", 1)[-1]
    return base.startswith(".") or member.startswith("__MACOSX/")


def expand_zips(files: list[StagedFile], area: StagingArea, limits: UploadLimits) -> list[StagedFile]:
    """The upload's files, each zip replaced by its members (streamed to staged files, the zip
    then removed). One running total covers the upload's files as sent plus every byte inflated
    from its zips; a member that claims to inflate more than ``max_zip_ratio`` times its size, or
    a total of files over ``max_files``, is refused before it is inflated."""
    out: list[StagedFile] = []
    total = sum(f.path.stat().st_size for f in files if is_dicom(f.path) or not zipfile.is_zipfile(f.path))
    if total > limits.max_bytes:
        raise too_large(limits.max_bytes)
    for staged in files:
        if _skipped(staged.name) or is_dicom(staged.path) or not zipfile.is_zipfile(staged.path):
            if not _skipped(staged.name):
                out.append(staged)
            continue
        entries = _zip_entries(staged.path)
        if entries is not None and len(out) + entries > limits.max_files:  # before zipfile reads them all
            raise UploadError(UploadProblem.TOO_MANY_FILES, f"Too many files: at most {limits.max_files} "
                              "files in one upload (zip members included)")
        try:
            with zipfile.ZipFile(staged.path) as archive:
                for entry in archive.infolist():
                    if entry.is_dir() or _skipped(entry.filename):
                        continue
                    if len(out) >= limits.max_files:
                        raise UploadError(UploadProblem.TOO_MANY_FILES, f"Too many files: at most {limits.max_files} "
                                          "files in one upload (zip members included)")
                    ratio = entry.file_size / max(entry.compress_size, 1)
                    if entry.file_size > limits.ratio_exempt_bytes and ratio > limits.max_zip_ratio:
                        raise UploadError(UploadProblem.TOO_LARGE, f"Too large: {staged.name} holds a member that "
                                          f"inflates {ratio:.0f} times its size (at most {limits.max_zip_ratio:g})",
                                          413)
                    if total + entry.file_size > limits.max_bytes:
                        raise too_large(limits.max_bytes)
                    path, total = _extract(archive, entry, area, total, limits)
                    out.append(StagedFile(f"{staged.name}:{entry.filename}", path))
        except UploadError:
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, RuntimeError, NotImplementedError, EOFError,
                zlib.error, ValueError) as exc:
            raise UploadError(UploadProblem.WRONG_FORMAT, f"Wrong format: {staged.name} is a zip that cannot be read "
                              f"({exc}); expected {EXPECTED}") from None
        staged.path.unlink(missing_ok=True)
    return out


def _zip_entries(path: Path) -> int | None:
    """How many entries a zip's end of central directory record declares (zip64 too), read
    before ``zipfile`` builds an object for each of them; None if there is no such record."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - _EOCD_SEARCH))
        tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    count = struct.unpack_from("<H", tail, at + 10)[0]
    locator = at - 20
    if count == 0xFFFF and locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":
        offset = struct.unpack_from("<Q", tail, locator + 8)[0]  # of the zip64 end of central directory
        with open(path, "rb") as f:
            f.seek(offset)
            record = f.read(56)
        if len(record) == 56 and record[:4] == b"PK\x06\x06":
            count = struct.unpack_from("<Q", record, 32)[0]
    return int(count)


def _extract(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, area: StagingArea, total: int,
             limits: UploadLimits) -> tuple[Path, int]:
    """Stream one zip member to a new staged file, counting into the upload's running total."""
    path, out = area.new_file("member")
    with out, archive.open(entry) as member:
        while chunk := member.read(CHUNK):
            total += len(chunk)
            if total > limits.max_bytes:
                raise too_large(limits.max_bytes)
            out.write(chunk)
    if limits.min_free_bytes and area.free_bytes() < limits.min_free_bytes:
        raise disk_full()
    return path, total
