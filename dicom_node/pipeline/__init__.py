"""What happens to a stored study: its release for grading (``release``), the worker process that
grades it (``worker``), the policy of what is gradable (``eligibility``), the delivery of its
results with retries (``delivery``) to each destination by its kind (``destinations``: C-STORE or
STOW-RS), and retention (``retention``). ``service.Node`` wires them."""

from dicom_node.pipeline.audit import audit
from dicom_node.pipeline.delivery import Deliveries, backoff
from dicom_node.pipeline.destinations import DicomWebSender, DimseSender, Sender, sender_for
from dicom_node.pipeline.eligibility import (
    LUMBAR_BODY_PARTS,
    Skip,
    has_all_roles,
    mr_images,
    nothing_assessed,
    skip_reason,
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

__all__ = ["LUMBAR_BODY_PARTS", "PURGE_INTERVAL_S", "SWEEP_INTERVAL_S", "Deliveries", "DicomWebSender",
           "DimseSender", "GradeJob", "GradeOutcome", "GradingTimeout", "Releaser", "Sender", "Skip", "audit",
           "backoff", "grade", "has_all_roles", "init_worker", "mr_images", "nothing_assessed", "purge", "sender_for",
           "skip_reason", "worker_ready"]
