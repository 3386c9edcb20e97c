"""Values from the network checked before they touch the disk, and the bounds on what they may cost."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node.ingest import InflateProblem, image_size_problem, inflate, series_size_of
from dicom_node.store.paths import UnsafePath, remove_tree, uid_problem, under
from inference.geometry import ImagePlane
from inference.series import group_series


@pytest.mark.parametrize("uid", ["1.2.3", "0", "1.2.840.10008.5.1.4.1.1.4", "2.25." + "9" * 39])
def test_valid_uids_pass(uid: str) -> None:
    assert uid_problem(uid, "UID") is None


@pytest.mark.parametrize(("uid", "why"), [
    ("", "empty"), ("../../x", "not a UID"), ("/tmp/x", "not a UID"), (".", "not a UID"),
    ("1.02.3", "not a UID"), ("1." + "2" * 70, "characters long"), ("1.2.3 ", "not a UID"), ("1.2..3", "not a UID"),
    ("1.2.3\u00e9", "not a UID"), (None, "empty"),
])
def test_hostile_uids_are_named(uid: str, why: str) -> None:
    problem = uid_problem(uid, "StudyInstanceUID")
    assert problem is not None and problem.startswith("StudyInstanceUID") and why in problem


def test_paths_stay_under_their_root(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    root.mkdir()
    assert under(root, "1.2.3", "4.5.dcm") == (root / "1.2.3" / "4.5.dcm").resolve()
    for parts in (("..", "x"), ("/tmp/x",), ("1.2", "..", "..", "x"), (".",), ("",), ("1.2/../..",), ("1.2\0",)):
        with pytest.raises(UnsafePath):
            under(root, *parts)


def test_nothing_outside_the_root_is_removed(tmp_path: Path) -> None:
    results, victim = tmp_path / "results", tmp_path / "victim" / "run-1"
    victim.mkdir(parents=True)
    (results / "1.2.3" / "run-1").mkdir(parents=True)
    with pytest.raises(UnsafePath):
        remove_tree(results, results / ".." / "victim" / "run-1")
    with pytest.raises(UnsafePath):
        remove_tree(results, results)
    assert victim.is_dir()
    remove_tree(results, results / "1.2.3" / "run-1")
    assert not (results / "1.2.3" / "run-1").exists() and (results / "1.2.3").is_dir()


def _image(rows: int, columns: int, frames: int | None = None) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns, ds.PixelData = rows, columns, b"\x00" * 16
    if frames is not None:
        ds.NumberOfFrames = frames
    return ds


def test_declared_image_size_is_bounded_before_decoding() -> None:
    assert image_size_problem(_image(512, 512), 2**25) is None
    assert "pixels" in (image_size_problem(_image(65535, 65535), 2**25) or "")
    assert "pixels" in (image_size_problem(_image(4096, 4096, frames=4), 2**25) or "")
    assert image_size_problem(Dataset(), 2**25) is None  # no pixels, nothing to bound


def test_a_deflate_bomb_is_refused_without_inflating_it_whole() -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = packer.compress(bytes(300 * 2**20)) + packer.flush()
    assert len(bomb) < 400 * 2**10
    with pytest.raises(InflateProblem, match="inflates beyond 64 MiB") as refused:
        inflate(io.BytesIO(bomb).read, 64 * 2**20)
    assert refused.value.too_large
    small = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = io.BytesIO()
    assert inflate(io.BytesIO(small.compress(b"x" * 1000) + small.flush()).read, 64 * 2**20, out) == 1000
    assert out.getvalue() == b"x" * 1000
    with pytest.raises(InflateProblem, match="does not inflate") as refused:
        inflate(io.BytesIO(b"\xff" * 100).read, 64 * 2**20)
    assert not refused.value.too_large


@pytest.mark.parametrize(("value", "expected"), [("12", 12), ("12345678901234567890", None), ("-3", None),
                                                 ("", None), (None, None)])
def test_images_in_acquisition_is_range_checked(value: str | None, expected: int | None) -> None:
    ds = Dataset()
    if value is not None:
        ds.ImagesInAcquisition = value
    assert series_size_of(ds, 1000) == expected


@pytest.mark.parametrize(("position", "orientation"), [
    ([0, 0, 0], [float("nan"), 1, 0, 0, 0, -1]),
    ([0, 0, 0], [0, 2, 0, 0, 0, -1]),  # not a unit vector
    ([1e300, 0, 0], [0, 1, 0, 0, 0, -1]),
    ([float("nan"), 0, 0], [0, 1, 0, 0, 0, -1]),
])
def test_unusable_geometry_is_rejected(position: list[float], orientation: list[float]) -> None:
    with pytest.raises(ValueError):
        ImagePlane.from_attributes(position, orientation, [0.5, 0.5], 256, 256)


def test_an_image_with_broken_geometry_is_left_out_of_its_series() -> None:
    def image(uid: str, orientation: list[float]) -> tuple[Dataset, None]:
        ds = Dataset()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.3", uid
        ds.ImageOrientationPatient, ds.ImagePositionPatient = orientation, [0, 0, 0]
        ds.PixelSpacing, ds.Rows, ds.Columns = [0.5, 0.5], 64, 64
        return ds, None

    sagittal = [0, 1, 0, 0, 0, -1]
    [series] = group_series([image("1", sagittal), image("2", sagittal), image("3", [float("nan")] * 6)])
    assert series.orientation == "sagittal" and [ds.SOPInstanceUID for ds, _ in series.instances] == ["1", "2"]


def test_the_localiser_runs_in_batches_with_the_same_result() -> None:
    import tempfile

    from inference.analyze import AnalysisLimits, analyze_study
    from inference.instances import read_folder
    from inference.runtime import OnnxRunner
    from phantom.generate import make_study, write_study

    with tempfile.TemporaryDirectory() as tmp:
        write_study(make_study(5, 0), Path(tmp))
        [instances] = read_folder(Path(tmp)).values()
        runner = OnnxRunner()
        one = analyze_study(instances, runner, AnalysisLimits(localiser_batch=1))
        all_at_once = analyze_study(instances, runner, AnalysisLimits(localiser_batch=1000))
    assert np.allclose(one.probabilities(), all_at_once.probabilities(), atol=1e-5, equal_nan=True)
    assert one.levels.keys() == all_at_once.levels.keys()
