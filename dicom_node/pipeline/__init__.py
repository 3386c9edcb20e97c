"""What happens to a stored study: its release for grading (``release``), the worker process that
grades it (``worker``), the policy of what is gradable (``eligibility``), the delivery of its
results with retries (``delivery``) to each destination by its kind (``destinations``: C-STORE or
STOW-RS), retention (``retention``), and query/retrieve from the PACS (``fetch``: the series a study
lacks before its release, whole studies on request). ``service.Node`` wires them."""

from dicom_node.pipeline.audit import audit
from dicom_node.pipeline.delivery import Deliveries, backoff
from dicom_node.pipeline.destinations import DicomWebSender, DimseSender, Sender, sender_for
from dicom_node.pipeline.eligibility import (
    LUMBAR_BODY_PARTS,
    Skip,
    has_all_roles,
    mr_images,
    note_missing,
    nothing_assessed,
    skip_reason,
)
from dicom_node.pipeline.fetch import (
    NOT_ON_PACS,
    FetchedStudy,
    Fetcher,
    FetchError,
    FetchJob,
    FetchJobs,
    FetchState,
    MissingAnswer,
    missing_note,
)
from dicom_node.pipeline.release import SWEEP_INTERVAL_S, Releaser
from dicom_node.pipeline.retention import PURGE_INTERVAL_S, purge
from dicom_node.pipeline.worker import (
    GradeJob,
    GradeOutcome,
    GradingTimeout,
    grade,
    init_worker,
    worker_ready,
)

__all__ = ["LUMBAR_BODY_PARTS", "NOT_ON_PACS", "PURGE_INTERVAL_S", "SWEEP_INTERVAL_S", "Deliveries", "DicomWebSender",
           "DimseSender", "FetchError", "FetchJob", "FetchJobs", "FetchState", "FetchedStudy", "Fetcher", "GradeJob",
           "GradeOutcome", "GradingTimeout", "MissingAnswer", "Releaser", "Sender", "Skip", "audit", "backoff",
           "grade", "has_all_roles", "init_worker", "missing_note", "mr_images", "note_missing", "nothing_assessed",
           "purge", "sender_for", "skip_reason", "worker_ready"]
