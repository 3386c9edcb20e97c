"""Bounded repeats of third-party warnings: one line per warning and study, with a count.

pydicom warns once per element it decodes: a study whose SpecificCharacterSet is "ISO_IR 999" wrote
1,646 lines of "Unknown encoding 'ISO_IR 999' - using default encoding instead" (its logger and
Python's warnings, both). ``RepeatedWarnings`` (a handler filter that ``logs.configure_logging``
installs) counts them per study (``study_scope``): inside a study's grading nothing is written until
the grading ends, then one line per warning with how many times it was seen; where a study has no
end (the receiver, instance by instance) the first one passes, then one at the 10th, 100th, ...
repeat with the count so far. Python's copy of a pydicom warning is not counted twice.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import structlog

#: Loggers whose warnings are bounded (pydicom's own, and Python's warnings as captured by logging).
BOUNDED_LOGGERS = ("pydicom", "py.warnings")
MAX_KEYS = 4096  # (study, warning) pairs remembered; the oldest are forgotten first

_SCOPE: ContextVar[tuple[str, bool]] = ContextVar("lumbar_node_log_scope", default=("", False))  # (study, deferred)
log = structlog.stdlib.get_logger(__name__)
#: The warning's own text in a line of the py.warnings logger ("<file>:<line>: UserWarning: <text>\n  <code>").
_PY_WARNING = re.compile(r"^.*?:\d+: \w+: (.*?)\n", re.DOTALL)

Key = tuple[str, str]  # (study, the warning's text)


def _milestone(count: int) -> bool:
    """10, 100, 1000, ...: the repeats that are logged, with their count."""
    while count >= 10 and count % 10 == 0:
        count //= 10
    return count == 1


class RepeatedWarnings(logging.Filter):
    """A handler filter: a bounded logger's warning is counted per study (``study_scope``); in a
    deferred scope none passes (the scope's end writes them, counted), elsewhere the first passes,
    and the 10th, 100th, ... with the count appended."""

    def __init__(self, max_keys: int = MAX_KEYS):
        super().__init__()
        self._counts: OrderedDict[Key, tuple[str, int]] = OrderedDict()  # key -> (logger, count)
        self._max_keys = max_keys
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith(BOUNDED_LOGGERS):
            return True
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed %-format: let the handler report it
            return True
        scope, deferred = _SCOPE.get()
        copy = record.name == "py.warnings" and (m := _PY_WARNING.match(message)) is not None
        key = (scope, m.group(1) if copy and m is not None else message)
        with self._lock:
            name, count = self._counts.pop(key, (record.name, 0))
            if copy and count:  # Python's copy of a pydicom warning just counted (pydicom's warn_and_log)
                self._counts[key] = (name, count)
                return False
            count += 1
            self._counts[key] = (name, count)
            while len(self._counts) > self._max_keys:
                self._counts.popitem(last=False)
        if deferred:
            return False
        if count == 1:
            return True
        if _milestone(count):
            where = "this study" if scope else "this process"
            record.msg, record.args = f"{message} (repeated: {count} times in {where})", None
            return True
        return False

    def take(self, scope: str) -> list[tuple[str, str, int]]:
        """The warnings counted for ``scope``, as (logger, message, count); forgotten."""
        with self._lock:
            keys = [k for k in self._counts if k[0] == scope]
            counted = [(k, self._counts.pop(k)) for k in keys]
        return [(name, k[1], n) for k, (name, n) in counted]


REPEATED_WARNINGS = RepeatedWarnings()


@contextmanager
def study_scope(study_uid: str, summarize: bool = True) -> Iterator[None]:
    """The bounded warnings logged inside count for ``study_uid``. With ``summarize`` they are held
    back and written when the scope ends, one line per warning with how many times it was seen;
    without, the first of each passes at once (and the 10th, 100th, ...)."""
    token = _SCOPE.set((study_uid, summarize))
    try:
        yield
    finally:
        _SCOPE.reset(token)
        if summarize:
            for name, message, count in REPEATED_WARNINGS.take(study_uid):
                log.warning("third-party warning, counted for the study", study_uid=study_uid, source=name,
                            warning=message[:300], times=count)


def current_scope() -> str:
    """The study the bounded warnings now count for ("" outside any ``study_scope``)."""
    return _SCOPE.get()[0]
