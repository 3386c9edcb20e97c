"""Observability: structured logging (``logs``), patient identifiers kept out of every log line
(``scrub``), third-party warnings bounded per study (``repeats``), and the Prometheus metrics
(``metrics``). Every room may import it; it imports only
the shared vocabulary (``states``)."""

from dicom_node.observability.logs import configure_logging, get_logger
from dicom_node.observability.metrics import CONTENT_TYPE, NodeMetrics, Snapshot, skip_label
from dicom_node.observability.repeats import REPEATED_WARNINGS, study_scope
from dicom_node.observability.scrub import (
    PHI_KEYWORDS,
    PHI_VALUES,
    REDACTED,
    PhiValues,
    scrub_phi,
    summarize_dataset,
)

__all__ = ["CONTENT_TYPE", "PHI_KEYWORDS", "PHI_VALUES", "REDACTED", "REPEATED_WARNINGS", "NodeMetrics", "PhiValues",
           "Snapshot", "configure_logging", "get_logger", "scrub_phi", "skip_label", "study_scope",
           "summarize_dataset"]
