"""A request body streamed to a parser that writes to the staging area: fed in steps of about
``CHUNK`` bytes in a worker thread (the disk writes stay off the event loop) and counted as it
arrives, refused as soon as it passes its limit.
The web upload (``upload_reader``) and STOW-RS (``dicomweb.related``) both take their bodies so."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import BinaryIO

import anyio.to_thread

from dicom_node.ingest.staging import StagingArea

__all__ = ["BODY_OVERHEAD", "CHUNK", "DISK_CHECK_EVERY", "StagedBytes", "pump_body"]

CHUNK = 1 << 20  # bytes parsed (and written) per step
BODY_OVERHEAD = 1 << 20  # boundaries and part headers on top of the parts' bytes
DISK_CHECK_EVERY = 64 << 20  # bytes staged between two looks at the free disk


async def pump_body(body: AsyncIterator[bytes], feed: Callable[[bytes], None], max_bytes: int,
                    too_large: Callable[[], Exception]) -> None:
    """Feed ``body`` (Starlette's ``request.stream()``) to ``feed`` in a worker thread; raise
    ``too_large()`` once more than ``max_bytes`` (plus the multipart overhead) has arrived."""
    limit = max_bytes + BODY_OVERHEAD
    pending, arrived = bytearray(), 0
    async for chunk in body:
        arrived += len(chunk)
        if arrived > limit:
            raise too_large()
        pending += chunk
        if len(pending) >= CHUNK:
            data = bytes(pending)
            pending.clear()
            await anyio.to_thread.run_sync(feed, data)
    if pending:
        await anyio.to_thread.run_sync(feed, bytes(pending))


class StagedBytes:
    """The bytes of a body's parts written to the staging area: counted against ``max_bytes``
    (``too_large()`` past it), the free disk looked at every ``DISK_CHECK_EVERY`` bytes
    (``disk_full()`` under ``min_free_bytes``)."""

    def __init__(self, area: StagingArea, max_bytes: int, min_free_bytes: int,
                 too_large: Callable[[], Exception], disk_full: Callable[[], Exception]):
        self.area, self.max_bytes, self.min_free_bytes = area, max_bytes, min_free_bytes
        self.too_large, self.disk_full = too_large, disk_full
        self.total = 0
        self._next_check = DISK_CHECK_EVERY

    def write(self, file: BinaryIO, data: bytes) -> None:
        """Count ``data``, then write it to ``file`` (a staged part)."""
        self.total += len(data)
        if self.total > self.max_bytes:
            raise self.too_large()
        if self.total >= self._next_check:
            self._next_check += DISK_CHECK_EVERY
            if self.min_free_bytes and self.area.free_bytes() < self.min_free_bytes:
                raise self.disk_full()
        file.write(data)
