"""What a grading run produces: the writer (``writer``: the run folder's files as one typed record,
and ``RunFolder``, the folder's layout that the writer and every reader of a run go by),
the DICOM Structured Report (``sr``, with its codes in ``codes``), the Grad-CAM Secondary Captures
(``sc``), the Encapsulated PDF summary (``pdf``), the key images as a Key Object Selection
(``kos``), the result as text and JSON (``text``), the DICOM modules and references copied from
the source images (``sources``) and the device's identity (``identity``). It imports only observability and
inference."""

from dicom_node.results.identity import DISCLAIMER, DISCLAIMER_LINES, MANUFACTURER, MODEL_NAME, model_device_uid
from dicom_node.results.kos import KOS_SERIES_DESCRIPTION
from dicom_node.results.pdf import PDF_SERIES_DESCRIPTION, read_pdf
from dicom_node.results.sc import SC_SERIES_DESCRIPTION
from dicom_node.results.sources import ImageKey, image_key
from dicom_node.results.sr import SR_SERIES_DESCRIPTION
from dicom_node.results.text import result_json, result_table
from dicom_node.results.writer import (
    OutputFile,
    OutputKind,
    RunFolder,
    RunOutputs,
    Supersedes,
    previous_outputs,
    write_run,
)

__all__ = ["DISCLAIMER", "DISCLAIMER_LINES", "KOS_SERIES_DESCRIPTION", "MANUFACTURER", "MODEL_NAME",
           "PDF_SERIES_DESCRIPTION", "SC_SERIES_DESCRIPTION", "SR_SERIES_DESCRIPTION", "ImageKey", "OutputFile",
           "OutputKind", "RunFolder", "RunOutputs", "Supersedes", "image_key", "model_device_uid",
           "previous_outputs", "read_pdf", "result_json", "result_table", "write_run"]
