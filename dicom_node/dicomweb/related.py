"""A STOW-RS request body read as it arrives: ``multipart/related; type="application/dicom"``
(PS3.18 8.6.1.2, 10.5.1), streamed through python-multipart's parser (which splits any multipart
body on its boundary) into files of the spool's staging area, one per part. The whole body is
counted while it is read: a body over the limit is refused as soon as it passes it, with or
without a Content-Length, chunked or not. Nothing is held in memory but a chunk and a part's
headers; nothing on disk is named after anything the client sent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from dicom_node.errors import NodeError
from dicom_node.ingest import BODY_OVERHEAD, StagedBytes, StagingArea, pump_body

MEDIA_TYPE = "application/dicom"  # of every part (PS3.10 files): the only one the node takes
RESPONSE_TYPE = "application/dicom+json"
MAX_BOUNDARY = 200  # RFC 2046 says 70 characters at most; Orthanc's STOW-RS client sends 73
MAX_PREAMBLE = 64 << 10  # bytes before the first boundary (RFC 2046's preamble, ignored)


class StowError(NodeError, ValueError):
    """A STOW-RS request refused whole: the HTTP status (400, 413, 415, 503) and why, in plain words."""

    def __init__(self, http_status: int, message: str):
        super().__init__(message)
        self.http_status = http_status


@dataclass(frozen=True)
class RelatedLimits:
    """What one STOW-RS request may cost."""

    max_bytes: int  # the parts' bytes together
    min_free_bytes: int = 0  # the spool's floor: staging stops below it
    max_parts: int = 20000
    max_header_bytes: int = 16 * 1024  # one part's headers together


@dataclass
class ReceivedBody:
    """What a multipart/related body held: its parts, staged in order."""

    parts: list[Path] = field(default_factory=list)
    body_bytes: int = 0
    part_bytes: int = 0


def too_large(max_bytes: int) -> StowError:
    return StowError(413, f"the request is over the limit of {max_bytes / 2**20:g} MiB (web.upload_max_mb)")


def disk_full() -> StowError:
    return StowError(503, "the node's free disk is under its floor (storage.min_free_disk_mb); try again later")


def boundary_of(content_type: str) -> bytes:
    """The boundary of a STOW-RS request's Content-Type; StowError 415 unless it is multipart/related
    of application/dicom (a ``type`` parameter, when given, must say so), 400 without a boundary."""
    kind, options = parse_options_header(content_type)
    if kind.lower() != b"multipart/related":
        raise StowError(415, f'the node takes multipart/related; type="{MEDIA_TYPE}" (PS3.10 instances), '
                        f"not {kind.decode('latin-1')[:64] or 'a body without a Content-Type'}")
    declared = options.get(b"type")
    if declared is not None and declared.strip().lower() != MEDIA_TYPE.encode():
        raise StowError(415, f'the node takes type="{MEDIA_TYPE}" parts (PS3.10 instances), not '
                        f"{declared.decode('latin-1')[:64]!r} (metadata and bulk data are not supported)")
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise StowError(400, "the multipart/related Content-Type has no valid boundary")
    return bytes(boundary)


class RelatedReader:
    """A multipart/related body fed chunk by chunk (``feed``), each part written to a staged file
    as it comes. A part with a Content-Type other than application/dicom is refused (415)."""

    def __init__(self, boundary: bytes, area: StagingArea, limits: RelatedLimits):
        self.area, self.limits = area, limits
        self.body = ReceivedBody()
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._on_part_begin, "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value, "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished, "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end, "on_end": self._on_end})
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._header_bytes = 0
        self._part_type = b""
        self._file: BinaryIO | None = None
        self._ended = False
        self._staged = StagedBytes(area, limits.max_bytes, limits.min_free_bytes,
                                   lambda: too_large(limits.max_bytes), disk_full)
        self._delimiter = b"--" + boundary
        self._preamble: bytearray | None = bytearray()  # None once the first delimiter is found

    def feed(self, chunk: bytes) -> None:
        """Parse the next bytes of the body; StowError as soon as it breaks a limit or the format."""
        self.body.body_bytes += len(chunk)
        if self.body.body_bytes > self.limits.max_bytes + BODY_OVERHEAD:
            raise too_large(self.limits.max_bytes)
        if self._ended:
            return  # the epilogue after the closing boundary: ignored (RFC 2046)
        if self._preamble is not None:
            chunk = self._skip_preamble(chunk)
            if not chunk:
                return
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise StowError(400, f"the multipart/related body cannot be read: {exc}") from None

    def _skip_preamble(self, chunk: bytes) -> bytes:
        """What of ``chunk`` follows a preamble before the first delimiter (RFC 2046; python-multipart
        wants the delimiter first): b"" while it is still to come."""
        assert self._preamble is not None
        self._preamble += chunk
        at = 0
        while (at := self._preamble.find(self._delimiter, at)) >= 0:
            if at == 0 or self._preamble[at - 1:at] == b"\n":
                rest = bytes(self._preamble[at:])
                self._preamble = None
                return rest
            at += 1
        if len(self._preamble) > MAX_PREAMBLE:
            raise StowError(400, "the multipart/related body cannot be read: no boundary where one was due")
        return b""

    def finish(self) -> ReceivedBody:
        """The whole body has been fed: its parts (StowError 400 if it ended early or held none)."""
        self._close_file()
        if not self._ended:
            raise StowError(400, "the multipart/related body ended before its closing boundary")
        if not self.body.parts:
            raise StowError(400, "the multipart/related body holds no part")
        return self.body

    def close(self) -> None:
        """Close a file left open by a body that broke off (the staging area removes it)."""
        self._close_file()

    # -- python-multipart's callbacks ---------------------------------------------------------------

    def _on_part_begin(self) -> None:
        self._part_type = b""
        self._header_bytes = 0

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]
        self._count_header(end - start)

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        self._count_header(end - start)

    def _count_header(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.limits.max_header_bytes:
            raise StowError(400, "the multipart/related body cannot be read: a part's headers are too long")

    def _on_header_end(self) -> None:
        if bytes(self._header_name).strip().lower() == b"content-type":
            self._part_type = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        if self._part_type:
            kind, _ = parse_options_header(self._part_type)
            if kind.lower() != MEDIA_TYPE.encode():
                raise StowError(415, f"part {len(self.body.parts) + 1} is {kind.decode('latin-1')[:64]!r}: the "
                                f"node takes {MEDIA_TYPE} parts (PS3.10 instances) only")
        if len(self.body.parts) >= self.limits.max_parts:
            raise StowError(413, f"too many parts: at most {self.limits.max_parts} instances in one request")
        path, self._file = self.area.new_file("part")
        self.body.parts.append(path)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is None:
            return
        self._staged.write(self._file, data[start:end])
        self.body.part_bytes = self._staged.total

    def _on_part_end(self) -> None:
        self._close_file()

    def _on_end(self) -> None:
        self._ended = True

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def read_related(body: AsyncIterator[bytes], content_type: str, area: StagingArea, limits: RelatedLimits,
                       content_length: str | None = None) -> ReceivedBody:
    """Stream a STOW-RS request body (Starlette's ``request.stream()``) into ``area``: parsed in
    steps of about ``CHUNK`` bytes in a worker thread (the disk writes stay off the event loop),
    counted as it arrives. StowError 415 for another media type (before a byte is read), 413 at
    once when the declared Content-Length is over the limit, else as soon as the body passes it."""
    boundary = boundary_of(content_type)
    if content_length is not None and content_length.isdigit() and \
            int(content_length) > limits.max_bytes + BODY_OVERHEAD:
        raise too_large(limits.max_bytes)
    if limits.min_free_bytes and area.free_bytes() < limits.min_free_bytes:
        raise disk_full()
    reader = RelatedReader(boundary, area, limits)
    try:
        await pump_body(body, reader.feed, limits.max_bytes, lambda: too_large(limits.max_bytes))
        return reader.finish()
    finally:
        reader.close()
