"""Bounded repeats of third-party warnings: one line per warning and study, then a count.

pydicom warns once per element it decodes: a study whose SpecificCharacterSet is "ISO_IR 999" wrote
1,646 lines of "Unknown encoding 'ISO_IR 999' - using default encoding instead" (its logger and
Python's warnings, both). ``RepeatedWarnings`` (a handler filter that ``logs.configure_logging``
installs) lets the first such line of each study through, then one at the 10th, 100th, 1000th...
repeat with the count so far; ``study_scope`` names the study the lines belong to and, when the
study's work ends, logs one summary line per warning that repeated, with its count.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import structlog

#: Loggers whose warnings are bounded (pydicom's own, and Python's warnings as captured by logging).
BOUNDED_LOGGERS = ("pydicom", "py.warnings")
MAX_KEYS = 4096  # (study, warning) pairs remembered; the oldest are forgotten first

_SCOPE: ContextVar[str] = ContextVar("lumbar_node_log_scope", default="")
log = structlog.stdlib.get_logger(__name__)

Key = tuple[str, str, str]  # (study, logger, message)


def _milestone(count: int) -> bool:
    """10, 100, 1000, ...: the repeats that are logged, with their count."""
    while count >= 10 and count % 10 == 0:
        count //= 10
    return count == 1


class RepeatedWarnings(logging.Filter):
    """A handler filter: a bounded logger's warning passes the first time in a study (``study_scope``),
    and at the 10th, 100th, ... time with the count appended; other repeats are counted, not written."""

    def __init__(self, max_keys: int = MAX_KEYS):
        super().__init__()
        self._counts: OrderedDict[Key, int] = OrderedDict()
        self._max_keys = max_keys
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith(BOUNDED_LOGGERS):
            return True
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed %-format: let the handler report it
            return True
        key = (_SCOPE.get(), record.name, message)
        with self._lock:
            count = self._counts.pop(key, 0) + 1
            self._counts[key] = count
            while len(self._counts) > self._max_keys:
                self._counts.popitem(last=False)
        if count == 1:
            return True
        if _milestone(count):
            scope = "this study" if key[0] else "this process"
            record.msg, record.args = f"{message} (repeated: {count} times in {scope})", None
            return True
        return False

    def take(self, scope: str) -> list[tuple[str, str, int]]:
        """The warnings of ``scope`` seen more than once, as (logger, message, count); forgotten."""
        with self._lock:
            keys = [k for k in self._counts if k[0] == scope]
            counts = [(k, self._counts.pop(k)) for k in keys]
        return [(k[1], k[2], n) for k, n in counts if n > 1]


REPEATED_WARNINGS = RepeatedWarnings()


@contextmanager
def study_scope(study_uid: str, summarize: bool = True) -> Iterator[None]:
    """The bounded warnings logged inside count for ``study_uid``; at the end (``summarize``), one
    line per warning that repeated, with how many times it was seen in all."""
    token = _SCOPE.set(study_uid)
    try:
        yield
    finally:
        _SCOPE.reset(token)
        if summarize:
            for name, message, count in REPEATED_WARNINGS.take(study_uid):
                log.warning("a warning repeated: written once, counted", study_uid=study_uid, source=name,
                            warning=message[:300], times=count)


def current_scope() -> str:
    """The study the bounded warnings now count for ("" outside any ``study_scope``)."""
    return _SCOPE.get()
