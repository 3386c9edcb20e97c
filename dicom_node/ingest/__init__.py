"""Ingest: the one way in for every image, whatever brought it (C-STORE, the web page's upload,
STOW-RS). An offered instance (``Candidate``: bytes, or a file staged under the spool) goes through
the ``Admission``: its header read without inflating or decoding it whole (``header``), the header
checks (``checks``: truncation, image size, series size, whether it (re)opens a study), the UID,
size, Deflate, free-disk and conflict checks, then the spool, the ledger, the metrics and the
audit trail; its ``Verdict`` carries the C-STORE status (``statuses``). An upload is streamed to
the spool's staging area (``staging``, ``upload_reader``) and taken whole or not at all (``upload``)."""

from dicom_node.ingest.admission import (
    Admissible,
    Admission,
    Batch,
    Candidate,
    Outcome,
    Reason,
    Refused,
    Source,
    Verdict,
)
from dicom_node.ingest.body import BODY_OVERHEAD, CHUNK, DISK_CHECK_EVERY, StagedBytes, pump_body
from dicom_node.ingest.checks import (
    PIXEL_DATA,
    UNDEFINED_LENGTH,
    image_size_problem,
    reopens_study,
    series_size_of,
    truncation,
)
from dicom_node.ingest.header import InflateProblem, inflate, read_file_meta, read_header
from dicom_node.ingest.staging import Staging, StagingArea
from dicom_node.ingest.statuses import StoreStatus
from dicom_node.ingest.upload import UploadResult, admit_upload, inspect_upload
from dicom_node.ingest.upload_reader import (
    EXPECTED,
    StagedFile,
    UploadError,
    UploadLimits,
    UploadProblem,
    expand_zips,
    read_upload,
)

__all__ = ["BODY_OVERHEAD", "CHUNK", "DISK_CHECK_EVERY", "EXPECTED", "PIXEL_DATA", "UNDEFINED_LENGTH", "Admissible",
           "Admission", "Batch", "Candidate", "InflateProblem", "Outcome", "Reason", "Refused", "Source",
           "StagedBytes", "StagedFile", "Staging", "StagingArea", "StoreStatus", "UploadError", "UploadLimits",
           "UploadProblem", "UploadResult", "Verdict", "admit_upload", "expand_zips", "image_size_problem", "inflate",
           "inspect_upload", "pump_body", "read_file_meta", "read_header", "read_upload", "reopens_study",
           "series_size_of", "truncation"]
