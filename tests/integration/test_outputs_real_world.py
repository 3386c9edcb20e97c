"""The SR, Secondary Captures and PDF written for real-world sources, checked with dciodvfy and
dcentvfy: a Kaggle-style phantom study (``phantom --style kaggle``) as a PACS holds it, the same
study with the attribute values real exports and fuzzing produced (a birth date "1931-07-04", a TM
with colons, an unknown character set, WindowCenter "abc", two accession numbers), and the raw
Kaggle headers (no SOP class in the data set, no Modality).

The validators' only errors are about the sources' own UIDs, which the outputs must repeat (their
study) or reference (their images): the Kaggle UIDs ("100206310", "100206310.1.1") have no
registered root ("Illegal root for UID"), and dcentvfy, given two series of the study at once,
sees their repeated SOP Instance UIDs; it is therefore run on the outputs with one series at a time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmwrite
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.uid import EnhancedMRImageStorage

from dicom_node.results.kos import key_images_of
from dicom_node.results.writer import OutputKind, write_run
from inference.analyze import analyze_study
from inference.runtime import OnnxRunner
from tests.support.dicom_tools import (
    dcentvfy_errors,
    dciodvfy_errors,
    pixelmed_sr_report,
    pixelmed_unexpected,
)
from tests.support.kaggle import (
    assert_heatmaps_on_their_own_series,
    kaggle_study,
    make_kaggle_phantom,
    pacs_style_copy,
)
from tests.support.tools import lumbar_node

BIRTH = "1931-07-04"
BROKEN = {"PatientName": "Doe^Jane", "PatientBirthDate": BIRTH, "StudyTime": "12:30:00",
          "SpecificCharacterSet": "FOO_BAR", "WindowCenter": "abc", "AccessionNumber": "A1\\A2"}


@pytest.fixture(scope="module")
def kaggle_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return kaggle_study(make_kaggle_phantom(tmp_path_factory.mktemp("kaggle")))


@pytest.fixture(scope="module")
def pacs_copy(kaggle_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return pacs_style_copy(kaggle_files, tmp_path_factory.mktemp("pacs"))


def _raw(ds: pydicom.Dataset, keyword: str, text: str) -> None:
    """Set an element as a file holds it (not converted), so that its value may break its VR."""
    tag, value = tag_for_keyword(keyword), text.encode("latin-1")
    value += b" " * (len(value) % 2)
    ds[tag] = RawDataElement(tag, dictionary_VR(keyword), len(value), value, 0, False, True)


@pytest.fixture(scope="module")
def broken_copy(pacs_copy: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out, written = tmp_path_factory.mktemp("broken"), []
    for path in pacs_copy:
        ds = pydicom.dcmread(path)
        for keyword, text in BROKEN.items():
            _raw(ds, keyword, text)
        target = out / path.parent.name / path.name
        target.parent.mkdir(exist_ok=True)
        dcmwrite(target, ds, enforce_file_format=False)
        written.append(target)
    return written


def _predict(files: list[Path], out: Path) -> tuple[Path, str]:
    done = lumbar_node("predict", str(files[0].parent.parent), "--out", str(out))
    [folder] = list(out.iterdir())
    return folder, done.stderr


def _outputs(folder: Path) -> list[Path]:
    return [*folder.glob("SR_*.dcm"), *sorted((folder / "SC").glob("*.dcm")), *folder.glob("PDF_*.dcm"),
            *folder.glob("KOS_*.dcm")]


def _source_uids(files: list[Path]) -> set[str]:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    return {str(v) for ds in headers for v in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)}


def _own_errors(path: Path, source_uids: set[str]) -> list[str]:
    """dciodvfy's errors, but those about a source UID's root (the outputs must carry those UIDs)."""
    errors = dciodvfy_errors(path)
    root = re.compile(r"Illegal root for UID = <([0-9.]+)>")
    return [e for e in errors if not ((m := root.search(e)) and m.group(1) in source_uids)]


def _assert_valid(folder: Path, sources: list[Path]) -> None:
    uids = _source_uids(sources)
    outputs = _outputs(folder)
    assert len(outputs) >= 3
    for path in outputs:
        assert _own_errors(path, uids) == [], path
    for series in sorted({p.parent for p in sources}):
        assert dcentvfy_errors([*outputs, *sorted(series.glob("*.dcm"))]) == [], series


def test_a_pacs_style_kaggle_study_gets_valid_outputs_drawn_on_its_own_series(pacs_copy: list[Path],
                                                                               tmp_path: Path) -> None:
    folder, _ = _predict(pacs_copy, tmp_path / "out")
    _assert_valid(folder, pacs_copy)
    assert_heatmaps_on_their_own_series([pydicom.dcmread(p) for p in (folder / "SC").glob("*.dcm")],
                                        folder / "results.json", pacs_copy)
    sr = pydicom.dcmread(next(folder.glob("SR_*.dcm")))
    source = pydicom.dcmread(pacs_copy[0], stop_before_pixels=True)
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    for keyword in ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
                    "ReferringPhysicianName", "StudyID"):  # absent in the source: Type 2, written empty
        assert keyword in sr and not sr[keyword].value, keyword
    evidence = {(series.SeriesInstanceUID, ref.ReferencedSOPInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence for series in study.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence}
    labels = json.loads((folder / "results.json").read_text())["labels"]
    located = {(i["series_uid"], i["sop_instance_uid"]) for i in labels if i["assessed"]}
    assert located == evidence
    assert len({sop for _, sop in evidence}) < len(evidence)  # the same SOP Instance UID in two series, both listed
    report = pixelmed_sr_report(next(folder.glob("SR_*.dcm")))
    assert "Found Root Template TID_1500 (MeasurementReport)" in report
    assert pixelmed_unexpected(report) == [], report[:2000]


def test_attribute_values_that_break_their_vr_are_left_empty_and_named_in_the_log(broken_copy: list[Path],
                                                                                   tmp_path: Path) -> None:
    folder, log = _predict(broken_copy, tmp_path / "out")
    _assert_valid(folder, broken_copy)
    for path in _outputs(folder):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.PatientName == "Doe^Jane"  # valid: copied
        assert ds.PatientBirthDate == "" and ds.StudyTime == "" and ds.AccessionNumber == ""
        assert "SpecificCharacterSet" not in ds, path
    [line] = [json.loads(s) for s in log.splitlines() if "not valid for their VR" in s]
    assert set(line["attributes"]) >= {"PatientBirthDate", "StudyTime", "SpecificCharacterSet", "AccessionNumber"}
    assert BIRTH not in log and "12:30:00" not in log
    assert len(list((folder / "SC").glob("*.dcm"))) == 25  # WindowCenter "abc": a percentile window instead
    assert "WindowCenter/WindowWidth not usable" in log


def test_raw_kaggle_headers_without_sop_class_or_modality_get_valid_outputs(
        kaggle_files: list[Path], pacs_copy: list[Path], tmp_path: Path) -> None:
    """Graded from the PACS-style copy (the inference side reads the SOP class from the file meta
    in its own branch), written from the raw Kaggle headers: the outputs' references take the
    SOP class from the file meta (Enhanced MR Image Storage, as the files say)."""
    graded = [(pydicom.dcmread(p, stop_before_pixels=True), p) for p in pacs_copy]
    result = analyze_study(graded, OnnxRunner())
    raw = [(pydicom.dcmread(p, stop_before_pixels=True), p) for p in kaggle_files]
    assert "SOPClassUID" not in raw[0][0] and "Modality" not in raw[0][0]
    outputs = write_run(result, raw, tmp_path / "out")
    _assert_valid(tmp_path / "out", kaggle_files)
    kos = [f for f in outputs.files if f.kind is OutputKind.KOS]
    assert len(kos) == (1 if key_images_of(result) else 0)
    for f in outputs.files:
        ds = pydicom.dcmread(f.path, stop_before_pixels=True)
        if "SourceImageSequence" in ds:
            assert ds.SourceImageSequence[0].ReferencedSOPClassUID == EnhancedMRImageStorage
        if ds.Modality == "KO":  # the key images, by the same file-meta SOP class
            images = [i for i in ds.ContentSequence if i.ValueType == "IMAGE"]
            assert images and {i.ReferencedSOPSequence[0].ReferencedSOPClassUID for i in images} == \
                {EnhancedMRImageStorage}
