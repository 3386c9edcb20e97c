"""STOW-RS requests as a DICOMweb client sends them (PS3.18 10.5.1): a multipart/related body of
PS3.10 files built by hand, whole or streamed without a Content-Length, with HTTP Basic credentials."""

from __future__ import annotations

import base64
from collections.abc import Iterator

BOUNDARY = "lumbar-stow-boundary-3f9a"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
MiB = 2**20


def basic(name: str, password: str) -> dict[str, str]:
    """The Authorization header of HTTP Basic credentials."""
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


def headers(name: str, password: str, content_type: str = CONTENT_TYPE) -> dict[str, str]:
    return {**basic(name, password), "Content-Type": content_type, "Accept": "application/dicom+json"}


def _part_head(part_type: str | None = "application/dicom") -> bytes:
    return f"--{BOUNDARY}\r\n".encode() + (f"Content-Type: {part_type}\r\n".encode() if part_type else b"") + b"\r\n"


def related(parts: list[bytes], part_type: str | None = "application/dicom") -> bytes:
    """A whole multipart/related body, one part per file."""
    out = b"".join(_part_head(part_type) + data + b"\r\n" for data in parts)
    return out + f"--{BOUNDARY}--\r\n".encode()


def streamed(total: int) -> Iterator[bytes]:
    """A body to send chunked (no Content-Length): one part of ``total`` zero bytes, in 1 MiB steps."""
    yield _part_head()
    zeros = bytes(MiB)
    left = total
    while left > 0:
        yield zeros[:min(MiB, left)]
        left -= MiB
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def parts_of(body: bytes, content_type: str) -> list[bytes]:
    """The parts of a multipart/related answer (WADO-RS), their headers left off."""
    from python_multipart.multipart import parse_options_header

    _, options = parse_options_header(content_type)
    delimiter = b"--" + options[b"boundary"]
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, data = chunk.partition(b"\r\n\r\n")
        parts.append(data[:-2] if data.endswith(b"\r\n") else data)
    return parts
