"""A request body streamed to a parser that writes to the staging area: fed in steps of about
``CHUNK`` bytes in a worker thread (the disk writes stay off the event loop) and counted as it
arrives, refused as soon as it passes its limit.
The web upload (``upload_reader``) and STOW-RS (``dicomweb.related``) both take their bodies so."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio.to_thread

__all__ = ["BODY_OVERHEAD", "CHUNK", "pump_body"]

CHUNK = 1 << 20  # bytes parsed (and written) per step
BODY_OVERHEAD = 1 << 20  # boundaries and part headers on top of the parts' bytes


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
