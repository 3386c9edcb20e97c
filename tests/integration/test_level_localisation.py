"""Level localisation that knows when it failed, with the bundled model: real non-lumbar MR (the
pydicom and pydicom-data files), phantom studies with the spine removed or shifted out of the field,
pure noise, absurd positions: nothing graded, the reason said in the JSON, the table and the SR.
Normal phantom studies of seeds the model was not trained on are still graded in full."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from structlog.testing import capture_logs

from dicom_node.results import codes as C
from dicom_node.results.sr import build_sr
from dicom_node.results.text import result_json, result_table
from inference.analyze import NotAssessedLabel, NotAssessedReason, StudyResult, analyze_study
from inference.geometry import ImagePlane
from inference.labels import LEVELS, SeriesRole
from inference.runtime import DEFAULT_MODEL_DIR, OnnxRunner
from phantom import make_study
from phantom.acquisition import SeriesSpec
from tests.support.tools import lumbar_node

NOT_LOCALISED = NotAssessedReason.LEVELS_NOT_LOCALISED
# Real MR of other body parts, as the wheels ship them: head (MR_small, emri_small: Enhanced MR,
# 10 frames), shoulder (MR2_*), abdomen (MR-SIEMENS), in several transfer syntaxes.
REAL_MR = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm",
           "MR2_UNCR.dcm", "MR2_J2KI.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "emri_small.dcm", "emri_small_RLE.dcm"]
PIXELS_OF = ["MR_small.dcm", "MR2_UNCR.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "emri_small.dcm"]

Instances = list[tuple[Dataset, Path | None]]
Edit = Callable[[SeriesSpec, Dataset], None]


@cache
def _runner() -> OnnxRunner:
    return OnnxRunner()


@cache
def _study(seed: int, index: int) -> tuple:
    st = make_study(seed, index)
    return st, tuple(st.datasets())


def _complete(seed: int) -> int:
    """The first study of ``seed`` with its three series."""
    for i in range(20):
        st = make_study(seed, i, render=False)
        if {s.role for s in st.series} == set(SeriesRole):
            return i
    raise AssertionError("no complete study")


def _edited(edit: Edit, seed: int = 11) -> Instances:
    """The first complete phantom study of ``seed``, each image edited in a copy."""
    _, datasets = _study(seed, _complete(seed))
    out: Instances = []
    for spec, original in datasets:
        ds = copy.deepcopy(original)
        edit(spec, ds)
        out.append((ds, None))
    return out


def _not_localised(result: StudyResult) -> None:
    assert not result.assessed() and not result.levels
    for r in result.labels:
        assert isinstance(r, NotAssessedLabel) and r.why is NOT_LOCALISED
        assert r.reason.startswith("the disc levels could not be localised (")


def _sagittal(spec: SeriesSpec) -> bool:
    return spec.role is not SeriesRole.AX_T2


@pytest.mark.parametrize("name", REAL_MR)
def test_real_non_lumbar_mr_files_are_not_graded(name: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name))
    result = analyze_study([(ds, None)], _runner())
    assert not result.assessed()
    assert {r.why for r in result.labels} <= {NotAssessedReason.NO_SAGITTAL, NOT_LOCALISED}


def test_real_non_lumbar_mr_files_together_are_not_graded() -> None:
    instances = [(pydicom.dcmread(get_testdata_file(n)), None) for n in REAL_MR]
    assert not analyze_study(instances, _runner()).assessed()


def _real_frames(name: str) -> np.ndarray:
    pixels = pydicom.dcmread(get_testdata_file(name)).pixel_array.astype(np.float32)
    return pixels if pixels.ndim == 3 else pixels[None]


@pytest.mark.parametrize("name", PIXELS_OF)
def test_real_head_shoulder_and_abdomen_images_in_a_lumbar_study_are_not_graded(name: str) -> None:
    """Every image of a complete lumbar study replaced by real head, shoulder or abdomen MR pixels:
    series roles and geometry are a lumbar study's, what the localiser sees is not a spine."""
    frames, count = _real_frames(name), iter(range(10**6))

    def replace(spec: SeriesSpec, ds: Dataset) -> None:
        img = cv2.resize(frames[next(count) % len(frames)], (int(ds.Columns), int(ds.Rows)))
        img = (img - img.min()) / max(float(img.max() - img.min()), 1.0) * 3000
        ds.PixelData = img.astype(np.uint16).tobytes()

    _not_localised(analyze_study(_edited(replace), _runner()))


def _remove_spine(seed: int) -> Edit:
    st, _ = _study(seed, _complete(seed))
    canal = np.array([st.anatomy.canal_point(lv) for lv in LEVELS])
    rng = np.random.default_rng(0)

    def edit(spec: SeriesSpec, ds: Dataset) -> None:
        if not _sagittal(spec):
            return
        pixels = ds.pixel_array.astype(np.float32)
        grid = ImagePlane.from_dataset(ds).pixel_grid()
        y, z = grid[..., 1], grid[..., 2]  # posterior, head
        spine = ((z <= canal[0, 2] + 60) & (z >= canal[-1, 2] - 60)
                 & (y >= canal[:, 1].min() - 90) & (y <= canal[:, 1].max() + 60))  # bodies to spinous processes
        fill = float(np.median(pixels[~spine]))
        pixels[spine] = fill + rng.normal(0, 0.03 * fill, int(spine.sum()))
        ds.PixelData = np.clip(pixels, 0, 65535).astype(np.uint16).tobytes()
    return edit


@pytest.mark.parametrize("seed", [11, 7])
def test_a_study_with_the_spine_removed_is_not_graded(seed: int) -> None:
    _not_localised(analyze_study(_edited(_remove_spine(seed), seed), _runner()))


@pytest.mark.parametrize("rows, columns", [(0.6, 0.0), (-0.6, 0.0), (0.0, 0.5)])
def test_a_study_with_the_spine_shifted_out_of_the_field_is_not_graded(rows: float, columns: float) -> None:
    """The sagittal pixels moved by a share of the image (to the feet, the head, posterior)."""
    def shift(spec: SeriesSpec, ds: Dataset) -> None:
        if not _sagittal(spec):
            return
        a = ds.pixel_array
        n_rows, n_cols = a.shape
        dr, dc = int(rows * n_rows), int(columns * n_cols)
        out = np.full_like(a, int(np.median(a[:, : n_cols // 8])))
        src = a[max(0, -dr): n_rows - max(0, dr), max(0, -dc): n_cols - max(0, dc)]
        out[max(0, dr): max(0, dr) + src.shape[0], max(0, dc): max(0, dc) + src.shape[1]] = src
        ds.PixelData = out.tobytes()

    _not_localised(analyze_study(_edited(shift), _runner()))


def _noise(seed: int) -> Edit:
    rng = np.random.default_rng(seed)

    def edit(spec: SeriesSpec, ds: Dataset) -> None:
        ds.PixelData = rng.integers(0, 4096, int(ds.Rows) * int(ds.Columns), dtype=np.uint16).tobytes()
    return edit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_three_series_of_uniform_noise_are_not_graded(seed: int) -> None:
    """What a fuzz run found graded as a spine (12 of 25 labels, SR sent)."""
    _not_localised(analyze_study(_edited(_noise(seed)), _runner()))


def test_positions_of_1e300_are_not_graded() -> None:
    """What a fuzz run found graded 25 of 25: every image at ImagePositionPatient 1e300."""
    def far(spec: SeriesSpec, ds: Dataset) -> None:
        ds.ImagePositionPatient = [1e300, 1e300, 1e300]

    result = analyze_study(_edited(far), _runner())
    assert not result.assessed()
    assert {r.why for r in result.labels} <= {NotAssessedReason.NO_SAGITTAL, NOT_LOCALISED}


def test_a_study_placed_metres_from_the_patient_origin_is_not_graded() -> None:
    """Every image moved 50 m head-wards (consistent geometry, within what a header may say):
    the localiser finds the spine, the geometry is no patient's."""
    def far(spec: SeriesSpec, ds: Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 50_000.0]

    result = analyze_study(_edited(far), _runner())
    _not_localised(result)
    assert "from the patient origin" in result.labels[0].reason


@pytest.mark.parametrize("seed", [7, 23, 4242])
def test_normal_phantom_studies_are_still_graded(seed: int) -> None:
    """Seeds the bundled model was not trained on (it was on seed 1): every label of a complete
    study graded, nothing rejected by the level check in the first studies of the seed."""
    for index in range(3):
        st, datasets = _study(seed, index)
        result = analyze_study([(ds, None) for _, ds in datasets], _runner())
        assert all(r.why is not NOT_LOCALISED for r in result.labels if isinstance(r, NotAssessedLabel))
        if {s.role for s in st.series} == set(SeriesRole):
            assert len(result.assessed()) == 25


def test_the_json_the_table_and_the_sr_say_why() -> None:
    instances = _edited(_noise(5))
    result = analyze_study(instances, _runner())
    for item in result_json(result)["labels"]:
        assert not item["assessed"] and item["reason"].startswith("the disc levels could not be localised")
    rows = result_table(result).splitlines()[3:]
    assert len(rows) == 25 and all("not assessed" in r and "could not be localised" in r for r in rows)
    sr = build_sr(result, {str(ds.SOPInstanceUID): ds for ds, _ in instances})
    codes = {item.ConceptCodeSequence[0].CodeValue for item in _content(sr) if "ConceptCodeSequence" in item}
    assert C.REASONS[NOT_LOCALISED].value in codes


def _content(ds: Dataset) -> list[Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        out += [item, *_content(item)]
    return out


def test_predict_on_noise_says_the_levels_could_not_be_localised(tmp_path: Path) -> None:
    for k, (ds, _) in enumerate(_edited(_noise(6))):
        ds.save_as(tmp_path / f"{k}.dcm", enforce_file_format=True)
    [study] = json.loads(lumbar_node("predict", str(tmp_path), "--json").stdout)
    assert {item["reason"].split(" (")[0] for item in study["labels"]} == {"the disc levels could not be localised"}


def test_an_older_model_json_checks_with_the_defaults_and_says_so_once(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    meta = json.loads((model / "model.json").read_text())
    meta.pop("level_check", None)
    (model / "model.json").write_text(json.dumps(meta))
    with capture_logs() as logs:
        runner = OnnxRunner(model)
        for seed in (7, 8):
            _not_localised(analyze_study(_edited(_noise(seed)), runner))
        graded = analyze_study(_edited(lambda spec, ds: None), runner)
    assert runner.metadata.level_check is None
    assert sum(e["event"].startswith("model.json has no level_check") for e in logs) == 1
    assert len(graded.assessed()) == 25  # the defaults do not reject a good study
