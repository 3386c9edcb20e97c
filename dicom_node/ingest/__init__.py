"""Ingest: the one way in for every image, whatever brought it (C-STORE, the web page's upload,
STOW-RS): an offered instance (``Candidate``) is checked and filed by the ``Admission`` (its
header read without inflating or decoding it whole: ``header``), an upload is streamed to the
spool's staging area (``staging``, ``upload_reader``) and taken whole or not at all (``upload``)."""

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
from dicom_node.ingest.header import uid_problem
from dicom_node.ingest.staging import Staging, StagingArea
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

__all__ = ["EXPECTED", "Admissible", "Admission", "Batch", "Candidate", "Outcome", "Reason", "Refused", "Source",
           "StagedFile", "Staging", "StagingArea", "UploadError", "UploadLimits", "UploadProblem", "UploadResult",
           "Verdict", "admit_upload", "expand_zips", "inspect_upload", "read_upload", "uid_problem"]
