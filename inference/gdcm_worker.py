"""The child process that decodes one JPEG Extended frame with GDCM (see ``inference.gdcm_jpeg12``).

GDCM aborts or crashes its process on some corrupt JPEG data (an uncaught C++ exception, a
segmentation fault), so it never runs in the node's process: each frame is decoded here, in a
process of its own, and a crash only ends this one.

    python -I -m inference.gdcm_worker ROWS COLUMNS BITS_ALLOCATED BITS_STORED PIXEL_REPRESENTATION PHOTOMETRIC

reads the encoded frame on stdin and writes the decoded frame on stdout (exit 0), or a line
``error: ...`` on stderr (exit 1). Imports GDCM only (no pydicom), to start quickly.
"""

from __future__ import annotations

import sys

JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"


def decode_frame(src: bytes, rows: int, columns: int, bits_allocated: int, bits_stored: int,
                 pixel_representation: int, photometric: str) -> bytes:
    """One greyscale JPEG Extended frame decoded by GDCM: rows x columns samples of
    ``bits_allocated`` bits, little endian."""
    import gdcm  # type: ignore[import-untyped]  # python-gdcm ships no type information

    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())

    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((columns, rows, 1))
    image.SetDataElement(element)
    pi_type = gdcm.PhotometricInterpretation.GetPIType(photometric)
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi_type))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(JPEG_EXTENDED)))
    image.SetPixelFormat(gdcm.PixelFormat(1, bits_allocated, bits_stored, bits_stored - 1, pixel_representation))
    frame: bytes = image.GetBuffer().encode("utf-8", "surrogateescape")  # GDCM returns char* as str
    expected = rows * columns * (bits_allocated // 8)
    if len(frame) < expected:
        raise ValueError(f"GDCM decoded {len(frame)} bytes, {expected} expected")
    return frame[:expected]


def main(argv: list[str]) -> int:
    """Decode the frame on stdin as the arguments describe it; the exit status says how it went."""
    try:
        rows, columns, bits_allocated, bits_stored, pixel_representation = (int(a) for a in argv[:5])
        frame = decode_frame(sys.stdin.buffer.read(), rows, columns, bits_allocated, bits_stored,
                             pixel_representation, argv[5])
    except Exception as exc:  # noqa: BLE001 - any failure is reported to the parent, which tells the user
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(frame)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
