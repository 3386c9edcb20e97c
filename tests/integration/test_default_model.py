"""The bundled default model: present, small, honest about its data, and grading phantom studies."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom

from inference.geometry import ImagePlane
from inference.rsna_layout import COORDINATES_CSV, IMAGES_DIR, TRAIN_CSV
from inference.runtime import DEFAULT_MODEL_DIR, OnnxRunner
from tests.support.kaggle import kaggle_study
from tests.support.tools import lumbar_node


def test_default_model_is_bundled_small_and_says_what_it_is() -> None:
    files = {p.name: p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"localiser.onnx", "grader.onnx", "model.json", "MODEL_CARD.md"} <= set(files)
    assert sum(files.values()) < 8_000_000
    meta = json.loads((DEFAULT_MODEL_DIR / "model.json").read_text())
    assert "phantom" in meta["training_data"] and "not clinical" in meta["training_data"]
    assert "not for clinical use" in (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text().lower()
    runner = OnnxRunner()
    assert runner.providers[-1] == "CPUExecutionProvider"


def _without_series(study: Path, description: str, dst: Path) -> Path:
    shutil.copytree(study, dst)
    for series in list(dst.iterdir()):
        first = next(series.glob("*.dcm"))
        if pydicom.dcmread(first, stop_before_pixels=True).SeriesDescription == description:
            shutil.rmtree(series)
    return dst


def _complete_study(phantom_dir: Path) -> Path:
    for study in sorted((phantom_dir / "train_images").iterdir()):
        descriptions = {pydicom.dcmread(next(s.glob("*.dcm")), stop_before_pixels=True).SeriesDescription
                        for s in study.iterdir()}
        if len(descriptions) == 3:
            return study
    raise AssertionError("no complete study")


def test_default_model_grades_every_label_of_a_complete_study(phantom_dir: Path) -> None:
    out = lumbar_node("predict", str(_complete_study(phantom_dir)), "--json").stdout
    [result] = json.loads(out)
    assert all(item["assessed"] for item in result["labels"]), [i.get("reason") for i in result["labels"]]


def test_study_without_axial_t2_gets_subarticular_not_assessed(phantom_dir: Path, tmp_path: Path) -> None:
    study = _without_series(_complete_study(phantom_dir), "Axial T2", tmp_path / "study")
    [result] = json.loads(lumbar_node("predict", str(study), "--json").stdout)
    for item in result["labels"]:
        if "subarticular" in item["label"]:
            assert not item["assessed"] and "Axial T2" in item["reason"]
        else:
            assert item["assessed"], item


def test_default_model_grades_a_real_size_kaggle_study(kaggle_real_dir: Path) -> None:
    """A study at the RSNA 2024 set's sizes (sagittal up to 768 px, 0.4-0.7 mm, RLE, Kaggle
    encoding): every label assessed, each found where the phantom's reader marked it, most grades
    the truth."""
    files = kaggle_study(kaggle_real_dir)
    study_id = files[0].parent.parent.name
    [result] = json.loads(lumbar_node("predict", str(files[0].parent.parent), "--json").stdout)
    assert all(item["assessed"] for item in result["labels"]), [i.get("reason") for i in result["labels"]]
    with open(kaggle_real_dir / TRAIN_CSV, newline="") as f:
        truth = next(row for row in csv.DictReader(f) if row["study_id"] == study_id)
    with open(kaggle_real_dir / COORDINATES_CSV, newline="") as f:
        marks = {(r["condition"], r["level"]): r for r in csv.DictReader(f) if r["study_id"] == study_id}
    errors_mm, right, graded = [], 0, 0
    for item in result["labels"]:
        column = f"{item['condition']} {item['level']}".lower().replace(" ", "_").replace("/", "_")
        if truth[column]:
            graded += 1
            right += item["grade"] == truth[column]
        mark = marks.get((item["condition"], item["level"]))
        if mark is not None:
            path = kaggle_real_dir / IMAGES_DIR / study_id / mark["series_id"] / f"{mark['instance_number']}.dcm"
            plane = ImagePlane.from_dataset(pydicom.dcmread(path, stop_before_pixels=True))
            point = (plane.position + float(mark["x"]) * plane.col_spacing * plane.row_dir
                     + float(mark["y"]) * plane.row_spacing * plane.col_dir)
            errors_mm.append(float(np.linalg.norm(np.asarray(item["patient_xyz"]) - point)))
    assert len(errors_mm) >= 20 and graded >= 20
    assert np.median(errors_mm) < 6.0 and max(errors_mm) < 15.0, sorted(errors_mm)
    assert right >= 0.8 * graded, (right, graded)
