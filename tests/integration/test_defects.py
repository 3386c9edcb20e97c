"""A phantom study made malformed as the independent fuzz run did (issue 23) is graded with the bundled
model without the bad series or images, and says why: PixelSpacing 1e6 or one ImagePositionPatient on
every slice of a series leaves the labels read on it not assessed (never Severe from pixel (0, 0) of
an edge slice); images whose JPEG-LS codestream declares 20000 x 20000 are left out, the study graded
without them; a series of such images only is not assessed, with the reason."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from structlog.testing import capture_logs

from dicom_node.results import result_json
from inference.analyze import AssessedLabel, NotAssessedLabel, NotAssessedReason, StudyResult, analyze_study
from inference.instances import read_folder
from inference.labels import LABELS, SeriesRole
from inference.runtime import OnnxRunner
from tests.support.defects import Defect, apply


@pytest.fixture(scope="module")
def runner() -> OnnxRunner:
    return OnnxRunner()


def _study(phantom_dir: Path) -> Path:
    return sorted((phantom_dir / "train_images").iterdir())[0]


def _copy(study: Path, out: Path, defect: Defect, series: str, chosen: Callable[[int], bool] = lambda i: True) -> \
        tuple[Path, set[str], str]:
    """The study under ``out`` with ``defect`` on the chosen images (by index along the files) of the
    series whose description contains ``series``; the SOP Instance UIDs changed and that series' UID."""
    changed, series_uid, first = set(), "", None
    files = sorted(study.rglob("*.dcm"), key=lambda p: (p.parent.name, int(p.stem)))
    index = 0
    for path in files:
        ds = pydicom.dcmread(path)
        if series in str(ds.SeriesDescription):
            series_uid = str(ds.SeriesInstanceUID)
            first = first or list(ds.ImagePositionPatient)
            if chosen(index):
                apply(defect, ds, first)
                changed.add(str(ds.SOPInstanceUID))
            index += 1
        target = out / path.relative_to(study)
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
    return out, changed, series_uid


def _grade(folder: Path, runner: OnnxRunner) -> StudyResult:
    [instances] = read_folder(folder).values()
    return analyze_study(instances, runner)


def _assessed_on(result: StudyResult, series_uid: str) -> list[AssessedLabel]:
    return [r for r in result.assessed() if r.location.series_uid == series_uid]


@pytest.mark.parametrize(("defect", "series", "role", "why"), [
    (Defect.HUGE_SPACING, "Axial", SeriesRole.AX_T2, "PixelSpacing 1e+06 x 1e+06 mm is outside 0.1 to 5 mm"),
    (Defect.SAME_POSITION, "Axial", SeriesRole.AX_T2, "slices lie at 1 distinct position along the slice normal"),
    (Defect.SAME_POSITION, "Sagittal T2", SeriesRole.SAG_T2, "slices lie at 1 distinct position"),
])
def test_a_series_with_impossible_geometry_is_not_assessed_and_the_rest_is_graded(
        phantom_dir: Path, tmp_path: Path, runner: OnnxRunner, defect: Defect, series: str, role: SeriesRole,
        why: str) -> None:
    folder, _, bad_series = _copy(_study(phantom_dir), tmp_path / "study", defect, series)
    result = _grade(folder, runner)
    assert not _assessed_on(result, bad_series), "graded from a series whose geometry is impossible"
    needing = [lb for lb in LABELS if lb.condition.series_role is role]
    for label in needing:
        r = result.result(label)
        assert isinstance(r, NotAssessedLabel) and r.why is NotAssessedReason.UNUSABLE_SERIES, r
        assert r.reason.startswith(f"{role.value} series unusable: implausible geometry: ") and why in r.reason
    assert len(result.assessed()) >= 10  # the other series still graded
    reasons = {item["label"]: item.get("reason", "") for item in result_json(result)["labels"]}  # results.json
    assert all("implausible geometry" in reasons[lb.column] for lb in needing)


def test_images_whose_codestream_lies_about_their_size_are_left_out(phantom_dir: Path, tmp_path: Path,
                                                                   runner: OnnxRunner) -> None:
    folder, liars, axial = _copy(_study(phantom_dir), tmp_path / "study", Defect.LYING_JPEG_LS, "Axial",
                                 chosen=lambda i: i in (3, 8, 13))
    assert len(liars) == 3
    with capture_logs() as logs:
        result = _grade(folder, runner)
    left_out = [e for e in logs if e["event"] == "images left out: not decodable"]
    assert [e["images"] for e in left_out] == [3]
    assert "CodestreamMismatch: the JPEG-LS codestream declares 20000 x 20000" in left_out[0]["example"]
    assert not {r.location.sop_instance_uid for r in result.assessed()} & liars
    assert _assessed_on(result, axial), "the axial series was not graded without the three images"


def test_a_series_of_lying_codestreams_only_is_not_assessed(phantom_dir: Path, tmp_path: Path,
                                                            runner: OnnxRunner) -> None:
    folder, _, axial = _copy(_study(phantom_dir), tmp_path / "study", Defect.LYING_JPEG_LS, "Axial")
    result = _grade(folder, runner)
    assert not _assessed_on(result, axial)
    subarticular = [result.result(lb) for lb in LABELS if lb.condition.series_role is SeriesRole.AX_T2]
    assert all(isinstance(r, NotAssessedLabel) and r.why is NotAssessedReason.UNUSABLE_SERIES for r in subarticular)
    assert "CodestreamMismatch: the JPEG-LS codestream declares 20000 x 20000" in subarticular[0].reason
