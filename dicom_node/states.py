"""The fixed sets of values of the node's life cycle, one definition each.

Study and delivery states are stored in the ledger as their string values (StrEnum), so a
ledger written before these types existed reads the same.
"""

from __future__ import annotations

from enum import StrEnum


class StudyState(StrEnum):
    """receiving -> analysing -> sending -> done, or failed / skipped with a reason."""

    RECEIVING = "receiving"
    ANALYSING = "analysing"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"

    @property
    def final(self) -> bool:
        return self in (StudyState.DONE, StudyState.FAILED, StudyState.SKIPPED)


class DeliveryState(StrEnum):
    """A run's results for one destination: pending until delivered, or superseded by a newer run."""

    PENDING = "pending"
    DELIVERED = "delivered"
    SUPERSEDED = "superseded"
    FAILED = "failed"


class GradeResult(StrEnum):
    """What grading one study came to."""

    REPORTED = "reported"
    SKIPPED = "skipped"
    FAILED = "failed"

    @property
    def study_state(self) -> StudyState:
        """The state a study takes for an outcome that is not a report."""
        return StudyState.SKIPPED if self is GradeResult.SKIPPED else StudyState.FAILED


class SkipReason(StrEnum):
    """Why a study is not a lumbar spine MRI the node grades (the text is the ledger's reason)."""

    NO_INSTANCES = "no readable DICOM instances"
    NOT_MR = "not an MR study"
    NOT_LUMBAR = "not a lumbar spine study"
    NO_SERIES = "no Sagittal T1, Sagittal T2/STIR or Axial T2 series found"
    NOTHING_ASSESSED = "nothing could be assessed"


class EventKind(StrEnum):
    """What a line of a study's audit trail (the ledger's events) records."""

    RECEIVED = "instances received"  # one per association (or upload) and study: how many, from whom
    UPLOADED = "uploaded"
    RELEASED = "released"
    GRADED = "graded"
    SKIPPED = "skipped"
    GRADING_FAILED = "grading failed"
    DELIVERED = "delivered"
    DELIVERY_FAILED = "delivery attempt failed"
    GRADE_AGAIN = "grade again"
    SEND_AGAIN = "send again"
    SIGNED_IN = "signed in"
    SIGN_IN_REFUSED = "sign-in refused"
    SIGNED_OUT = "signed out"
    REFUSED = "action refused"
    ASKED_PACS = "asked the PACS"  # for the series a study lacked (query/retrieve), with what came of it
    FETCHED = "fetched from the PACS"  # `lumbar-node fetch` or the web page's fetch form
    SIGN_IN_THROTTLED = "sign-in throttled"  # failed sign-ins past the allowance: the next attempt waits
    SESSIONS_ENDED = "sessions ended"  # an administrator ended sessions of an account
