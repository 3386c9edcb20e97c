"""The node's process-wide changes to pynetdicom, applied together by ``apply()`` when the storage
SCP starts and undone together by ``restore()`` when it stops:

- the poll clock: pynetdicom's association and DUL reactors poll every ``node.poll_interval_ms``
  instead of every 1 ms, and slow down once idle (``_PollClock``);
- a filter on the root log handlers that lets one pynetdicom error per association thread through
  and counts the rest (``ERRORS``);
- ``threading.excepthook``: a pynetdicom reactor thread that meets an exception aborts its
  association instead of leaving the peer waiting.

They change pynetdicom for the whole process (every AE in it, the delivery SCU included). Calls
nest: each ``apply()`` needs its ``restore()``; the last one puts everything back as it was.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import pynetdicom.association
import pynetdicom.dul
from pynetdicom.association import Association

from dicom_node.observability import get_logger

__all__ = ["ERRORS", "IDLE_AFTER_S", "IDLE_POLL_S", "OncePerConnection", "applied", "apply", "restore",
           "restore_poll_interval", "set_poll_interval"]

log = get_logger(__name__)

IDLE_POLL_S = 0.1  # an association idle for IDLE_AFTER_S polls ten times a second
IDLE_AFTER_S = 1.0


class _PollClock:
    """``time`` for pynetdicom's association and DUL modules: their sleeps capped at ``poll_s``
    while a reactor has work, and ``idle_s`` long once it has had none for ``idle_after_s``.

    pynetdicom's acceptor reactor sleeps a fixed 1 ms between polls of its DIMSE queue, and each
    association's DUL reactor 1 ms between polls of its socket; neither has a public setting, and
    each C-STORE waits for such polls: at 4 to 5 ms per image that is a large share. A reactor
    that calls ``sleep`` again right after the last one returned found nothing to do; once that
    has lasted ``idle_after_s`` its polls slow down to ``idle_s``, so an idle association costs
    (near) no CPU, and the first message after the pause waits at most ``idle_s``.
    """

    BUSY_GAP_S = 0.0005  # more than this between two sleeps of a thread: it did some work

    def __init__(self, poll_s: float, idle_s: float = IDLE_POLL_S, idle_after_s: float = IDLE_AFTER_S):
        self.poll_s, self.idle_s, self.idle_after_s = poll_s, idle_s, idle_after_s
        self._threads = threading.local()

    def sleep(self, seconds: float) -> None:
        state, now = self._threads, time.monotonic()
        if now - getattr(state, "last_wake", 0.0) > self.BUSY_GAP_S:
            state.idle_since = now
        idle = now - getattr(state, "idle_since", now) >= self.idle_after_s
        time.sleep(max(seconds, self.idle_s) if idle else min(seconds, self.poll_s))
        state.last_wake = time.monotonic()

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def set_poll_interval(poll_s: float) -> None:
    """Poll pynetdicom's association and DUL reactors every ``poll_s`` seconds instead of every 1 ms
    (for the whole process; ``restore_poll_interval`` undoes it). ``apply()`` calls it."""
    clock = _PollClock(poll_s)  # stands in for the `time` module: its sleep, and time's own for the rest
    pynetdicom.association.time = clock  # type: ignore[assignment]  # a duck-typed module, see _PollClock
    pynetdicom.dul.time = clock  # type: ignore[assignment]  # the same


def restore_poll_interval() -> None:
    """pynetdicom's own polling again (1 ms)."""
    pynetdicom.association.time = time
    pynetdicom.dul.time = time


class OncePerConnection(logging.Filter):
    """Lets the first pynetdicom error of each association thread through and counts the rest,
    so that protocol garbage costs a bounded number of log lines (the count is logged when the
    connection closes)."""

    def __init__(self) -> None:
        super().__init__()
        self.suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.name.startswith("pynetdicom"):
            return True
        name = threading.current_thread().name
        with self._lock:
            if name in self.suppressed:
                self.suppressed[name] += 1
                return False
            self.suppressed[name] = 0
        record.exc_info, record.exc_text = None, None  # the first line says what; no traceback per PDU
        return True

    def closed(self, thread_name: str) -> int:
        """Forget a connection's thread; how many of its errors were suppressed."""
        with self._lock:
            return self.suppressed.pop(thread_name, 0)


#: The process's one error filter (the patches are process-wide): on the root handlers while applied.
ERRORS = OncePerConnection()


def _thread_died(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook: a pynetdicom reactor thread (an association or its DUL) that meets an
    exception ends its association (A-ABORT) instead of leaving the peer waiting; logged once."""
    thread = args.thread
    assoc = thread if isinstance(thread, Association) else getattr(thread, "assoc", None)
    log.error("a thread ended with an exception", thread=getattr(thread, "name", "?"),
              error=f"{args.exc_type.__name__}: {args.exc_value}", association=assoc is not None)
    if isinstance(assoc, Association) and assoc.is_alive():
        with contextlib.suppress(Exception):  # the association is already broken: any error of abort() is moot
            assoc.abort()


_lock = threading.Lock()
_depth = 0
_saved_excepthook: Callable[[threading.ExceptHookArgs], object] | None = None
_filtered: list[logging.Handler] = []


def apply(poll_s: float) -> None:
    """Apply the poll clock (``poll_s`` seconds), the error filter on the root log handlers and the
    excepthook; nested calls only update the poll interval."""
    global _depth, _saved_excepthook
    with _lock:
        set_poll_interval(poll_s)
        _depth += 1
        if _depth > 1:
            return
        for handler in logging.getLogger().handlers:  # a logger's own filter would miss pynetdicom.dul & co
            handler.addFilter(ERRORS)
            _filtered.append(handler)
        _saved_excepthook = threading.excepthook
        threading.excepthook = _thread_died


def restore() -> None:
    """Undo ``apply()``: the last call puts pynetdicom's polling, the log handlers and
    ``threading.excepthook`` back as they were (a call without an ``apply()`` does nothing)."""
    global _depth, _saved_excepthook
    with _lock:
        if _depth == 0:
            return
        _depth -= 1
        if _depth > 0:
            return
        restore_poll_interval()
        for handler in _filtered:
            handler.removeFilter(ERRORS)
        _filtered.clear()
        if threading.excepthook is _thread_died and _saved_excepthook is not None:
            threading.excepthook = _saved_excepthook
        _saved_excepthook = None


def applied() -> bool:
    """Whether the changes are in place (some ``apply()`` not yet restored)."""
    return _depth > 0
