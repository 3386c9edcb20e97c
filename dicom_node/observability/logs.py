"""Structured logging for the node: JSON lines or console output, patient identifiers scrubbed
(``scrub.py``).

structlog and the standard library ``logging`` (pynetdicom, ...) share one chain
of processors and one renderer, so every line has the same shape and goes
through ``scrub.scrub_phi``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from dicom_node.observability.repeats import REPEATED_WARNINGS
from dicom_node.observability.scrub import scrub_phi, scrub_record, scrub_rendered

_handler: logging.Handler | None = None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def configure_logging(fmt: str = "auto", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send structlog and stdlib logging to ``stream`` (default stderr) as JSON lines or console text.

    ``fmt`` is ``json``, ``console`` or ``auto`` (console when ``stream`` is a TTY).
    Safe to call again: the handler installed by the previous call is replaced.
    """
    global _handler
    stream = sys.stderr if stream is None else stream
    if fmt == "auto":
        fmt = "console" if _isatty(stream) else "json"
    if fmt not in ("json", "console"):
        raise ValueError(f"unknown log format {fmt!r} (auto, json, console)")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")

    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        scrub_phi,  # before positional args are formatted into the event
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.StackInfoRenderer(),
    ]
    if fmt == "json":
        render: list[structlog.typing.Processor] = [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ]
    else:
        render = [structlog.dev.ConsoleRenderer(colors=_isatty(stream))]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render, scrub_rendered],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(REPEATED_WARNINGS)  # pydicom's per-element warnings: once per study, then counted
    handler.addFilter(scrub_record)

    logging.captureWarnings(True)  # pydicom's and numpy's warnings: through the same chain, not raw stderr
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(numeric)
    _handler = handler
    pynetdicom_level = logging.DEBUG if numeric <= logging.DEBUG else max(logging.WARNING, numeric)
    for chatty in ("pynetdicom", "apscheduler", "highdicom"):  # a line per PDU, job run, module copied
        logging.getLogger(chatty).setLevel(pynetdicom_level)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,  # so that a later configure_logging() takes effect
    )


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A structlog logger named ``name`` (default: the calling module's ``__name__``)."""
    if name is None:
        name = sys._getframe(1).f_globals.get("__name__", "dicom_node")
    return structlog.stdlib.get_logger(name)
