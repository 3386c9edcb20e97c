"""Which of pydicom's decoding plugins decode compressed pixel data, in which order.

pydicom 3 decodes each compressed transfer syntax through plugins; this module picks them:

- ``auto`` (the default): pylibjpeg first (pylibjpeg-libjpeg, -openjpeg and -rle: RLE Lossless
  about ten times faster than pydicom's own numpy decoder), then ``gdcm12`` (GDCM in a child
  process, for the 12-bit JPEG Extended files that libjpeg refuses, see ``inference.gdcm_jpeg12``),
  then Pillow, then pydicom's own decoders. A plugin that fails (or panics: pylibjpeg-rle's Rust
  code does on some corrupt data) hands the image to the next one.
- The environment variable ``LUMBAR_NODE_DECODER`` names one family instead: ``pylibjpeg``,
  ``gdcm``, ``pillow`` or ``pydicom`` (pydicom's own numpy RLE decoder: the old, slow path, for
  timing comparisons). That family alone decodes the transfer syntaxes it serves; the others
  decode as ``auto`` does. An unknown value is logged once and ``auto`` is used.

pydicom's own GDCM plugin runs GDCM in the calling process, where a corrupt JPEG can end the
process (an abort or a segmentation fault, measured with python-gdcm 3.2.6): importing this module
removes it from every pydicom decoder, so that no ``pixel_array`` in this process runs GDCM in
process; GDCM decodes only through ``gdcm12``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from enum import StrEnum
from functools import lru_cache
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder, pixel_array
from pydicom.pixels.decoders import JPEGExtended12BitDecoder
from pydicom.uid import (
    UID,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

from inference import gdcm_jpeg12
from inference.codestream import check_codestreams

log = structlog.stdlib.get_logger(__name__)

#: The environment variable that picks the decoders (see DecoderChoice).
DECODER_ENV = "LUMBAR_NODE_DECODER"


class DecoderChoice(StrEnum):
    """The values of LUMBAR_NODE_DECODER."""

    AUTO = "auto"  # pylibjpeg, then GDCM, then Pillow, then pydicom's own
    PYLIBJPEG = "pylibjpeg"
    GDCM = "gdcm"
    PILLOW = "pillow"
    PYDICOM = "pydicom"  # pydicom's own decoders (RLE Lossless: numpy), the old path


#: pydicom plugin names, first tried first (plugins not named here come last).
PLUGIN_ORDER = ("pylibjpeg", gdcm_jpeg12.PLUGIN, "pillow", "pyjpegls", "pydicom")
#: pydicom's plugins that run GDCM in process: removed (see the module's docstring).
IN_PROCESS_GDCM = "gdcm"
_FAMILIES = {
    DecoderChoice.PYLIBJPEG: ("pylibjpeg",),
    DecoderChoice.GDCM: (gdcm_jpeg12.PLUGIN,),
    DecoderChoice.PILLOW: ("pillow",),
    DecoderChoice.PYDICOM: ("pydicom",),
}


def _register_gdcm12() -> None:
    with contextlib.suppress(ValueError):  # added already
        JPEGExtended12BitDecoder.add_plugin(gdcm_jpeg12.PLUGIN, ("inference.gdcm_jpeg12", "_decode_frame"))


def _remove_in_process_gdcm() -> None:
    for syntax in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes, RLELossless):
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:  # a syntax pydicom has no decoder for
            continue
        if IN_PROCESS_GDCM in decoder.available_plugins:
            decoder.remove_plugin(IN_PROCESS_GDCM)


class _QuietPluginFailures(logging.Filter):
    """pydicom logs a traceback at ERROR for every plugin that fails before it tries the next; the
    failures come back in the error raised at the end (and ``decoded_pixels`` tries the next plugin
    itself), so these records only alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.exc_info)


_ALL_FAILED = "Unable to decode as exceptions were raised by all available plugins:"  # pydicom's words

_register_gdcm12()
_remove_in_process_gdcm()
logging.getLogger("pydicom.pixels.decoders.base").addFilter(_QuietPluginFailures())


def _plugin_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says that a plugin could not decode the image (and the next may): an error
    of the data, or a Rust panic (pyo3's PanicException: pylibjpeg-rle on some corrupt data); not
    MemoryError, KeyboardInterrupt or SystemExit."""
    if isinstance(exc, (RuntimeError, ValueError, NotImplementedError, TypeError, OSError, IndexError, KeyError,
                        AttributeError, EOFError, OverflowError)):
        return True
    return type(exc).__name__ == "PanicException"


@lru_cache(maxsize=8)
def _parse_choice(value: str) -> DecoderChoice:
    try:
        return DecoderChoice(value.strip().lower() or DecoderChoice.AUTO)
    except ValueError:
        log.warning("LUMBAR_NODE_DECODER is not a known decoder: auto is used", value=value,
                    known=[c.value for c in DecoderChoice])
        return DecoderChoice.AUTO


def decoder_choice() -> DecoderChoice:
    """The decoders LUMBAR_NODE_DECODER asks for (read at every call: a benchmark may switch it)."""
    return _parse_choice(os.environ.get(DECODER_ENV, ""))


def decoding_plugins(transfer_syntax: UID, choice: DecoderChoice = DecoderChoice.AUTO) -> tuple[str, ...]:
    """The available pydicom plugins that decode ``transfer_syntax``, in the order they are tried;
    empty for a native (uncompressed) syntax. NotImplementedError for a syntax pydicom cannot decode."""
    available = get_decoder(transfer_syntax).available_plugins
    ordered = [p for p in PLUGIN_ORDER if p in available] + sorted(set(available) - set(PLUGIN_ORDER))
    if choice is not DecoderChoice.AUTO:
        family = [p for p in ordered if p in _FAMILIES[choice]]
        if family:
            return tuple(family)
    return tuple(ordered)


def decoded_pixels(ds: Dataset) -> NDArray[Any]:
    """The data set's pixels as pydicom decodes them, through the plugins of ``decoding_plugins``
    (for LUMBAR_NODE_DECODER), one after another until one succeeds. RuntimeError naming every
    plugin's failure when none does. A compressed frame whose codestream header disagrees with
    Rows, Columns, SamplesPerPixel or BitsAllocated is refused first (``CodestreamMismatch``, a
    ValueError), never decoded."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not syntax:
        raise ValueError("the file meta names no Transfer Syntax UID")
    check_codestreams(ds, UID(syntax))  # what the codestream declares, before a decoder allocates it
    plugins = decoding_plugins(UID(syntax), decoder_choice())
    if not plugins:
        return np.asarray(pixel_array(ds))
    failures = []
    for plugin in plugins:
        try:
            return np.asarray(pixel_array(ds, decoding_plugin=plugin))
        except BaseException as exc:  # a Rust panic is a BaseException; others go on up
            if not _plugin_failure(exc):
                raise
            reason = " ".join(str(exc).replace(_ALL_FAILED, "").split())
            failures.append(reason if reason.startswith(f"{plugin}:") else f"{plugin}: {reason}")
            if plugin != plugins[-1]:
                log.debug("decoding plugin failed: trying the next", plugin=plugin, error=failures[-1])
    raise RuntimeError(f"no decoder could decode this {UID(syntax).name} image ({'; '.join(failures)})")
