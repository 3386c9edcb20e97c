"""A pydicom decoding plugin: JPEG Extended (Process 2 and 4) through GDCM, 12-bit samples included,
in a child process.

pydicom's own GDCM plugin refuses JPEG Extended with 12-bit samples, and pylibjpeg's libjpeg refuses
some real 12-bit files (the DICOM WG04 ``MR*_JPLY`` style: a scan start that is not zero); GDCM
(python-gdcm 3.0.10 or later) decodes them with its 12-bit IJG codec. But GDCM aborts or crashes its
process on some corrupt JPEG data (an uncaught C++ exception; a segmentation fault in the 8-bit
codec), so each frame is decoded by ``inference.gdcm_worker`` in a process of its own (about 0.2 s
a frame: this plugin is the fallback for the images libjpeg refuses, not the first choice), and a
crash there is an error for that image only. GDCM's diagnostics on stderr stay in the child.

``inference.decoders`` adds this module to pydicom's ``JPEGExtended12BitDecoder`` as the plugin
``gdcm12``, following pydicom's plugin interface (``DECODER_DEPENDENCIES``, ``is_available`` and
the frame decoder).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec

from pydicom import uid
from pydicom.pixels.decoders.base import DecodeRunner

#: The plugin's name in pydicom's decoder.
PLUGIN = "gdcm12"
#: Seconds one frame may take in the child.
TIMEOUT_S = 60.0

DECODER_DEPENDENCIES = {uid.JPEGExtended12Bit: ("gdcm>=3.0.10",)}


def _gdcm_version() -> tuple[int, ...]:
    if find_spec("gdcm") is None:
        return ()
    try:
        return tuple(int(p) for p in version("python-gdcm").split(".")[:3] if p.isdigit())
    except PackageNotFoundError:  # a GDCM built from source, with its Python wrapping
        return (3, 0, 10)


def is_available(transfer_syntax: str) -> bool:
    """Whether this plugin can decode ``transfer_syntax`` here (python-gdcm 3.0.10 or later)."""
    return _gdcm_version() >= (3, 0, 10) and transfer_syntax in DECODER_DEPENDENCIES


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One JPEG Extended frame of a greyscale image, decoded by GDCM in a child process, as bytes
    of ``runner.bits_allocated`` bits per pixel."""
    if runner.samples_per_pixel != 1:
        raise NotImplementedError("the gdcm12 plugin decodes greyscale images only")
    args = [runner.rows, runner.columns, runner.bits_allocated, runner.bits_stored, runner.pixel_representation,
            str(runner.photometric_interpretation)]
    try:
        done = subprocess.run([sys.executable, "-I", "-m", "inference.gdcm_worker", *map(str, args)], input=src,
                              capture_output=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"GDCM took more than {TIMEOUT_S:.0f} s") from None
    if done.returncode < 0:
        raise RuntimeError(f"GDCM crashed on this image ({_signal_name(-done.returncode)})")
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").splitlines()
        reason = next((line[7:] for line in reversed(lines) if line.startswith("error: ")), f"exit {done.returncode}")
        raise RuntimeError(f"GDCM could not decode this image: {reason}")
    expected = runner.rows * runner.columns * (runner.bits_allocated // 8)
    if len(done.stdout) != expected:
        raise RuntimeError(f"GDCM returned {len(done.stdout)} bytes, {expected} expected")
    return done.stdout
