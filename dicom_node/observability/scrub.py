"""Patient identifiers kept out of the log: by key (``patient_id`` and the DICOM keywords), by
type (``PersonName``, a whole ``Dataset`` summarized to its UIDs) and by value (``PHI_VALUES``: the
identifying values of the datasets a process handled lately, scrubbed from every rendered line).
``logs.configure_logging`` puts these processors into every log chain."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

import structlog
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.valuerep import PersonName

REDACTED = "[redacted]"

#: DICOM keywords whose values never reach a log line. Event-dict keys match
#: case-insensitively, ignoring underscores (``patient_id`` matches ``PatientID``).
PHI_KEYWORDS = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientBirthName",
        "PatientAge",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientMotherBirthName",
        "IssuerOfPatientID",
        "AccessionNumber",
        "ReferringPhysicianName",
    }
)
_PHI_KEYS = frozenset(k.lower() for k in PHI_KEYWORDS)
#: The only attributes of a Dataset that are logged in its place.
DATASET_SUMMARY_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

#: Attributes whose values, once seen in a received or read dataset, are scrubbed from every
#: rendered log line of the process (tracebacks and warnings included), not only under their key.
PHI_VALUE_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "PatientAge",
                      "IssuerOfPatientID", "AccessionNumber", "ReferringPhysicianName", "PatientBirthName",
                      "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers")
_PHI_VALUE_TAGS = tuple(Tag(keyword) for keyword in PHI_VALUE_KEYWORDS)
MIN_PHI_VALUE_LENGTH = 3  # shorter values ("M", "1") would redact half of every line
#: Values shorter than this are scrubbed only as a whole word, not inside a longer run of letters and
#: digits: a name part "x47" leaves "Unknown PDU type received '0x47'" alone; longer values (IDs,
#: dates) are scrubbed wherever they appear.
WHOLE_WORD_BELOW = 8
_WORD = r"[^\W_]"  # a letter or digit (any script), not the underscore


def _value_pattern(value: str) -> str:
    """The regular expression of one value: anywhere, or (short values) as a whole word."""
    text = re.escape(value)
    if len(value) >= WHOLE_WORD_BELOW:
        return text
    before = f"(?<!{_WORD})" if re.match(_WORD, value[0]) else ""
    after = f"(?!{_WORD})" if re.match(_WORD, value[-1]) else ""
    return before + text + after


class PhiValues:
    """The identifying values of the studies a process handled lately, to scrub by value (a value
    shorter than ``WHOLE_WORD_BELOW`` only where it stands as a word of its own)."""

    def __init__(self, size: int = 512):
        self._values: dict[str, None] = {}  # insertion order: the oldest are forgotten first
        self._size = size
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()
        self._read: set[tuple[object, ...]] = set()  # the raw identifying elements of datasets read

    def add(self, value: object) -> None:
        text = str(value).strip()
        variants = {text, *re.split(r"[\\^=]", text)}
        if re.fullmatch(r"\d{8}", text):  # a DA: also as a person would write it
            variants |= {f"{text[:4]}-{text[4:6]}-{text[6:]}", f"{text[6:]}.{text[4:6]}.{text[:4]}"}
        if m := re.fullmatch(r"0*(\d+)([DWMY])", text):  # an AS: 045Y is also "45 years"
            unit = {"D": "days", "W": "weeks", "M": "months", "Y": "years"}[m.group(2)]
            variants |= {f"{m.group(1)} {unit}", f"{m.group(1)}{m.group(2)}"}
        variants = {v.strip() for v in variants if len(v.strip()) >= MIN_PHI_VALUE_LENGTH}
        with self._lock:
            new = [v for v in variants if v not in self._values]
            if not new:
                return
            for v in new:
                self._values[v] = None
            if len(self._values) > self._size:
                self._read.clear()  # some values are forgotten now: add_from() reads each dataset again
            while len(self._values) > self._size:
                self._values.pop(next(iter(self._values)))
            self._pattern = None

    def add_from(self, ds: Dataset) -> None:
        """Remember the identifying values a dataset carries (never raises). A dataset whose
        identifying elements are, byte for byte, those of one already read is skipped: every image
        of a study carries the same, and decoding them costs a receiver a tenth of its time."""
        try:
            raw = tuple(getattr(ds.get_item(tag), "value", None) if tag in ds else None for tag in _PHI_VALUE_TAGS)
            hash(raw)
        except Exception:  # noqa: BLE001 - an odd element: read them one by one below
            raw = None
        if raw is not None and raw in self._read:
            return
        self._add_values(ds)
        if raw is not None:
            with self._lock:
                if len(self._read) >= self._size:
                    self._read.clear()
                self._read.add(raw)

    def _add_values(self, ds: Dataset) -> None:
        for keyword in PHI_VALUE_KEYWORDS:
            try:
                value = ds.get(keyword)
            except Exception:  # noqa: BLE001 - a malformed value is still a value: take the raw bytes
                elem = ds.get_item(keyword)
                value = getattr(elem, "value", None)
                if isinstance(value, bytes):
                    value = value.decode("latin-1", errors="replace")
            if value is None or value == "":
                continue
            for item in value if isinstance(value, (list, tuple)) or getattr(value, "VM", 1) > 1 else [value]:
                self.add(item)

    def scrub(self, text: str) -> str:
        with self._lock:
            if not self._values:
                return text
            if self._pattern is None:
                ordered = sorted(self._values, key=len, reverse=True)
                self._pattern = re.compile("|".join(_value_pattern(v) for v in ordered))
            pattern = self._pattern
        return pattern.sub(REDACTED, text)


PHI_VALUES = PhiValues()


def scrub_rendered(logger: Any, method_name: str, rendered: Any) -> Any:
    """Last processor: the rendered line without any identifying value seen lately."""
    return PHI_VALUES.scrub(rendered) if isinstance(rendered, str) else rendered


def _is_phi_key(key: object) -> bool:
    return isinstance(key, str) and key.replace("_", "").replace("-", "").lower() in _PHI_KEYS


def summarize_dataset(ds: Dataset) -> dict[str, str]:
    """The UIDs of ``ds`` (safe to log), and nothing else."""
    return {kw: str(ds.get(kw)) for kw in DATASET_SUMMARY_KEYWORDS if ds.get(kw) is not None}


def _scrub_value(value: Any, depth: int) -> Any:
    if isinstance(value, PersonName):
        return REDACTED
    if isinstance(value, Dataset):
        return summarize_dataset(value)
    if isinstance(value, DataElement):
        return REDACTED if value.VR == "PN" or _is_phi_key(value.keyword) else value
    if depth > 0 and isinstance(value, Mapping):
        return _scrub_mapping(value, depth - 1)
    if depth > 0 and isinstance(value, (list, tuple)):
        items = [_scrub_value(v, depth - 1) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value


def _scrub_mapping(mapping: Mapping[Any, Any], depth: int) -> dict[Any, Any]:
    return {k: REDACTED if _is_phi_key(k) else _scrub_value(v, depth) for k, v in mapping.items()}


def scrub_phi(logger: Any, method_name: str, event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """structlog processor: redact PHI keys and PersonName values, summarize Datasets (one level deep)."""
    return _scrub_mapping(event_dict, depth=1)


def scrub_record(record: logging.LogRecord) -> bool:
    """Handler filter: scrub a stdlib record's message and %-args before they are formatted."""
    if isinstance(record.args, Mapping):
        record.args = _scrub_mapping(record.args, depth=0)
    elif isinstance(record.args, tuple):
        record.args = tuple(_scrub_value(a, 0) for a in record.args)
    record.msg = _scrub_value(record.msg, 0)
    return True
