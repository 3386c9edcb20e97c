"""Keeping a training process's memory flat over a long run (glibc's allocator, Linux)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import structlog

log = structlog.stdlib.get_logger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameters
ONE_MIB = 1 << 20


def bound_heap_growth() -> bool:
    """Serve allocations of 1 MiB and more from mmap (returned to the system when freed) and trim
    the heap's free top above 1 MiB; whether glibc took the settings.

    By default glibc raises its mmap threshold each time a large buffer is freed, after which
    autograd's activations (tens of MB per layer and batch) come from the heap, whose freed
    fragments are rarely returned: a CPU training run's peak RSS then creeps up with every batch
    of a new size, i.e. with the number of studies (1.9 GB instead of 0.7 GB after 20 grader
    batches on real-size phantom studies). A fixed threshold keeps it at one batch's worth."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, ONE_MIB)) and bool(libc.mallopt(M_TRIM_THRESHOLD, ONE_MIB))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    if not ok:
        log.info("the C library refused the allocator settings; memory may creep up over a long run")
    return ok
