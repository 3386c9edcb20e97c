"""dicom_node.results.pdf.pdf_document: the PDF out of Encapsulated PDF data sets as other writers make them.
(The node's own PDF: tests/integration/test_pdf.py.)"""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from dicom_node.results.pdf import pdf_document

DOCUMENT = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"  # 46 bytes


def _encapsulated(stored: bytes, length: int | None = None) -> Dataset:
    ds = Dataset()
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = stored
    if length is not None:
        ds.EncapsulatedDocumentLength = length
    return ds


@pytest.mark.parametrize(("stored", "length", "expected"), [
    (DOCUMENT, len(DOCUMENT), DOCUMENT),
    (DOCUMENT[:-1] + b"\0", len(DOCUMENT) - 1, DOCUMENT[:-1]),  # odd length, NUL pad
    (DOCUMENT[:-1] + b"\0", None, DOCUMENT[:-1]),  # ends at %%EOF, pad cut
    (DOCUMENT + b"\r\n", None, DOCUMENT),  # only one end of line after %%EOF is the document's
    (DOCUMENT[:-1] + b"\r\n", 10, DOCUMENT[:-1] + b"\r\n"),  # a length that would cut the document: not used
    (DOCUMENT + b"trailing", 999, DOCUMENT),  # a length beyond the data: not used
    (b"%PDF-1.4 no end marker.\0", None, b"%PDF-1.4 no end marker."),  # the pad byte only
    (b"%PDF-1.4 no end marker\0", None, b"%PDF-1.4 no end marker\0"),  # odd: no pad to strip
])
def test_the_document_without_its_padding(stored: bytes, length: int | None, expected: bytes) -> None:
    assert pdf_document(_encapsulated(stored, length)) == expected


@pytest.mark.parametrize("ds", [Dataset(), _encapsulated(b"")])
def test_no_document_is_a_clear_error(ds: Dataset) -> None:
    with pytest.raises(ValueError, match="not an encapsulated document"):
        pdf_document(ds)
