"""The bundled default model: present, small, honest about its data, and grading phantom studies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom

from inference.runtime import DEFAULT_MODEL_DIR, OnnxRunner
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
