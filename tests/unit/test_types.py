"""Fixed sets of values as types: DICOM statuses by name, states stored as their strings, model
metadata read and written by one type."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from dicom_node.dicom.statuses import STORED, StoreStatus, is_stored
from dicom_node.states import DeliveryState, GradeResult, StudyState
from dicom_node.store.ledger import Ledger
from inference.labels import ConditionGroup
from inference.model import ModelError, ModelMetadata, file_sha256
from inference.runtime import DEFAULT_MODEL_DIR


def test_store_statuses_mean_what_pynetdicom_says() -> None:
    words = {StoreStatus.PROCESSING_FAILURE: "Processing Failure", StoreStatus.OUT_OF_RESOURCES: "Out of Resources",
             StoreStatus.CANNOT_UNDERSTAND: "Cannot Understand", StoreStatus.COERCION_OF_DATA_ELEMENTS: "Coercion",
             StoreStatus.ELEMENTS_DISCARDED: "Element Discarded",
             StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS: "Does Not Match SOP Class"}
    for status, word in words.items():
        category, text = STORAGE_SERVICE_CLASS_STATUS[status]
        assert word in text
        assert (category in ("Success", "Warning")) is (status in STORED)
    assert StoreStatus.SUCCESS in STORED and StoreStatus.SUCCESS == 0


@pytest.mark.parametrize(("status", "stored"), [
    (0x0000, True), (0xB000, True), (0xB007, True), (0xB123, True),  # any warning: stored (PS3.7 C.4)
    (0x0107, True), (0x0001, True),
    (0xA700, False), (0xA900, False), (0xC000, False), (0x0110, False), (0x0122, False),  # failures
    (0xFF00, False), (0xFE00, False), (0x1234, False), (-1, False),  # pending, cancel, unknown, not a status
])
def test_stored_is_success_or_a_warning_as_pynetdicom_categorises_them(status: int, stored: bool) -> None:
    assert is_stored(status) is stored and (status in STORED) is stored


def test_states_are_stored_as_their_strings_and_read_back_as_enums(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.record_instance("1.2.3.4", "1.2.3", "1.2.3.1", "1.2.840.10008.5.1.4.1.1.4", tmp_path / "x.dcm", "AE")
    ledger.set_state("1.2.3", StudyState.SKIPPED, "not an MR study")
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        assert db.execute("SELECT state FROM studies").fetchall() == [("skipped",)]
    study = ledger.study("1.2.3")
    assert study is not None and study.state is StudyState.SKIPPED and study.state.final
    ledger.close()
    assert GradeResult.SKIPPED.study_state is StudyState.SKIPPED and GradeResult.FAILED.study_state is StudyState.FAILED
    assert {s.value for s in DeliveryState} == {"pending", "delivered", "superseded", "failed"}


def test_model_metadata_round_trips_the_bundled_model_json() -> None:
    raw = json.loads((DEFAULT_MODEL_DIR / "model.json").read_text())
    meta = ModelMetadata.read(DEFAULT_MODEL_DIR / "model.json")
    assert set(meta.offsets_mm) == set(ConditionGroup)
    assert meta.to_json() == raw
    assert meta.onnx is not None and meta.onnx["files"]["grader.onnx"] == file_sha256(DEFAULT_MODEL_DIR / "grader.onnx")


def test_model_metadata_errors_name_the_problem() -> None:
    raw = json.loads((DEFAULT_MODEL_DIR / "model.json").read_text())
    with pytest.raises(ModelError, match="unknown keys"):
        ModelMetadata.from_json({**raw, "surprise": 1})
    with pytest.raises(ModelError, match="offsets_mm"):
        ModelMetadata.from_json({k: v for k, v in raw.items() if k != "offsets_mm"})
    with pytest.raises(ModelError, match="label order"):
        ModelMetadata.from_json({**raw, "label_columns": raw["label_columns"][::-1]}).check()
