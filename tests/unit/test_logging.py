"""Tests for dicom_node.observability (logs, scrub): JSON/console output and PHI scrubbing."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from dicom_node.observability import REDACTED, configure_logging, get_logger

NAME = "Doe^Jane"
PID = "PID-12345"
BIRTH = "19700101"
ACCESSION = "ACC-98765"
PHI_VALUES = (NAME, "Doe", "Jane", PID, BIRTH, ACCESSION)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo configure_logging() so that other tests see logging as they found it."""
    root = logging.getLogger()
    pynetdicom = logging.getLogger("pynetdicom")
    saved = (root.handlers[:], root.level, pynetdicom.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    pynetdicom.setLevel(saved[2])
    structlog.reset_defaults()


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def assert_no_phi(text: str) -> None:
    for value in PHI_VALUES:
        assert value not in text, f"{value!r} leaked into log output:\n{text}"


def make_dataset() -> Dataset:
    ds = Dataset()
    ds.PatientName = NAME
    ds.PatientID = PID
    ds.PatientBirthDate = BIRTH
    ds.AccessionNumber = ACCESSION
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.StudyInstanceUID = "1.2.3.4.5"
    ds.SeriesInstanceUID = "1.2.3.4.5.6"
    return ds


def test_json_lines_have_event_level_timestamp_logger() -> None:
    stream = io.StringIO()
    configure_logging("json", "INFO", stream=stream)
    log = get_logger("dicom_node.test")
    log.info("study received", instances=12)
    log.warning("disk low", free_mb=400)
    log.debug("not shown")
    lines = json_lines(stream)
    assert len(lines) == 2
    first = lines[0]
    assert first["event"] == "study received"
    assert first["level"] == "info"
    assert first["logger"] == "dicom_node.test"
    assert first["instances"] == 12
    assert first["timestamp"].endswith("Z") and "T" in first["timestamp"]
    assert lines[1]["level"] == "warning"


def test_auto_format_is_json_on_non_tty_stream() -> None:
    stream = io.StringIO()
    configure_logging("auto", stream=stream)
    get_logger("x").info("hello")
    assert json_lines(stream)[0]["event"] == "hello"


def test_get_logger_defaults_to_calling_module_name() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    get_logger().info("named")
    assert json_lines(stream)[0]["logger"] == __name__


def test_phi_keys_are_redacted() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    get_logger("t").info(
        "received", PatientName=NAME, PatientID=PID, patient_id=PID, PatientBirthDate=BIRTH,
        accession_number=ACCESSION, series_count=3,
    )
    assert_no_phi(stream.getvalue())
    line = json_lines(stream)[0]
    assert line["PatientName"] == REDACTED
    assert line["patient_id"] == REDACTED
    assert line["series_count"] == 3


def test_person_name_under_innocent_key_is_redacted() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    get_logger("t").info("sender", who=PersonName(NAME))
    assert_no_phi(stream.getvalue())
    assert json_lines(stream)[0]["who"] == REDACTED


def test_nested_dicts_and_lists_are_scrubbed() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    get_logger("t").info("nested", meta={"PatientID": PID, "rows": 512}, names=[PersonName(NAME), "ok"])
    assert_no_phi(stream.getvalue())
    line = json_lines(stream)[0]
    assert line["meta"] == {"PatientID": REDACTED, "rows": 512}
    assert line["names"] == [REDACTED, "ok"]


def test_dataset_value_is_summarized_by_uids() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    get_logger("t").info("stored", ds=make_dataset())
    out = stream.getvalue()
    assert_no_phi(out)
    assert json_lines(stream)[0]["ds"] == {
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.4",
        "SOPInstanceUID": "1.2.3.4.5.6.7",
        "StudyInstanceUID": "1.2.3.4.5",
        "SeriesInstanceUID": "1.2.3.4.5.6",
    }


def test_structlog_positional_args_are_scrubbed() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    get_logger("t").info("patient %s arrived", PersonName(NAME))
    assert_no_phi(stream.getvalue())
    assert json_lines(stream)[0]["event"] == f"patient {REDACTED} arrived"


def test_stdlib_records_are_json_and_scrubbed() -> None:
    stream = io.StringIO()
    configure_logging("json", "INFO", stream=stream)
    logging.getLogger("pynetdicom").warning("association from %s", PersonName(NAME))
    logging.getLogger("other.lib").error("dataset %s", make_dataset())
    out = stream.getvalue()
    assert_no_phi(out)
    lines = json_lines(stream)
    assert lines[0]["event"] == f"association from {REDACTED}"
    assert lines[0]["logger"] == "pynetdicom"
    assert lines[0]["level"] == "warning"
    assert "timestamp" in lines[0]
    assert "1.2.3.4.5.6.7" in lines[1]["event"]


def test_pynetdicom_is_quiet_unless_debug() -> None:
    stream = io.StringIO()
    configure_logging("json", "INFO", stream=stream)
    logging.getLogger("pynetdicom").info("chatty")
    logging.getLogger("dicom_node.x").info("ours")
    assert [line["event"] for line in json_lines(stream)] == ["ours"]

    stream = io.StringIO()
    configure_logging("json", "DEBUG", stream=stream)
    logging.getLogger("pynetdicom").debug("chatty")
    assert [line["event"] for line in json_lines(stream)] == ["chatty"]


def test_reconfigure_replaces_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", stream=first)
    configure_logging("json", stream=second)
    get_logger("t").info("once")
    assert first.getvalue() == ""
    assert len(json_lines(second)) == 1


def test_exception_is_rendered_in_json() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("t").exception("failed")
    line = json_lines(stream)[0]
    assert line["event"] == "failed"
    assert "RuntimeError: boom" in line["exception"]


def test_console_format_is_readable_and_scrubbed() -> None:
    stream = io.StringIO()
    configure_logging("console", stream=stream)
    get_logger("t").info("study released", PatientName=NAME, series=4)
    logging.getLogger("pynetdicom").warning("peer %s", PersonName(NAME))
    out = stream.getvalue()
    assert "study released" in out
    assert "series=4" in out
    assert "\x1b[" not in out  # no colours on a non-terminal stream
    assert_no_phi(out)
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.splitlines()[0])


def test_bad_format_or_level_is_rejected() -> None:
    with pytest.raises(ValueError):
        configure_logging("xml", stream=io.StringIO())
    with pytest.raises(ValueError):
        configure_logging("json", "LOUD", stream=io.StringIO())


def _decode_with_unknown_charset(times: int) -> None:
    """What reading a study whose SpecificCharacterSet is "ISO_IR 999" does: pydicom warns for
    every text element it decodes (its logger, and Python's warnings)."""
    from pydicom.charset import decode_element
    from pydicom.dataelem import DataElement

    for _ in range(times):
        decode_element(DataElement(0x00081030, "LO", b"LUMBAR SPINE"), ["ISO_IR 999"])


def test_pydicoms_repeated_warnings_are_one_line_per_study_with_a_count() -> None:
    from dicom_node.observability import study_scope

    stream = io.StringIO()
    configure_logging(fmt="json", stream=stream)
    with study_scope("1.2.3.1"):
        _decode_with_unknown_charset(1646)
        assert "ISO_IR 999" not in stream.getvalue()  # held back until the study's grading ends
    with study_scope("1.2.3.2"):
        _decode_with_unknown_charset(5)
    lines = json_lines(stream)
    assert len(lines) == 2 and all("ISO_IR 999" in line["warning"] for line in lines), lines  # 3,302 unbounded
    assert [(line["study_uid"], line["times"], line["source"]) for line in lines] == \
        [("1.2.3.1", 1646, "pydicom"), ("1.2.3.2", 5, "pydicom")]  # Python's copy of each is not counted
    assert lines[0]["event"] == "third-party warning, counted for the study"


def test_where_a_study_has_no_end_the_first_warning_passes_then_every_tenfold_count() -> None:
    from dicom_node.observability import study_scope

    stream = io.StringIO()
    configure_logging(fmt="json", stream=stream)
    with study_scope("1.2.3.4", summarize=False):  # the receiver: instance by instance
        _decode_with_unknown_charset(150)
    events = [line["event"] for line in json_lines(stream) if line["logger"] == "pydicom"]
    warning = "Unknown encoding 'ISO_IR 999' - using default encoding instead"
    assert events == [warning, f"{warning} (repeated: 10 times in this study)",
                      f"{warning} (repeated: 100 times in this study)"]


def test_other_warnings_are_not_bounded() -> None:
    from dicom_node.observability import study_scope

    stream = io.StringIO()
    configure_logging(fmt="json", stream=stream)
    with study_scope("1.2.3.3"):
        for _ in range(30):
            get_logger("dicom_node.test").warning("our own warning", n=1)
    assert sum(line["event"] == "our own warning" for line in json_lines(stream)) == 30


def test_short_identifying_values_are_scrubbed_as_words_only() -> None:
    """A name part "x47" must not turn pynetdicom's "Unknown PDU type received '0x47'" into
    "'0[redacted]'"; the same value standing as a word, and every long value anywhere, still go."""
    from dicom_node.observability import PhiValues

    values = PhiValues()
    for value in ("Doe^Jane^x47", PID, BIRTH):
        values.add(value)
    assert values.scrub("Unknown PDU type received '0x47'") == "Unknown PDU type received '0x47'"
    assert values.scrub("Janet Doering of Does") == "Janet Doering of Does"
    assert values.scrub("patient Doe^Jane^x47 (Jane Doe, x47)") == \
        f"patient {REDACTED} ({REDACTED} {REDACTED}, {REDACTED})"
    assert values.scrub(f"file Doe_Jane.dcm, id X{PID}Y, born {BIRTH}1200 or 1970-01-01") == \
        f"file {REDACTED}_{REDACTED}.dcm, id X{REDACTED}Y, born {REDACTED}1200 or {REDACTED}"
