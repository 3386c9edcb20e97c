"""The competition preset end to end: the real preset's networks exported to ONNX (verified against
PyTorch on every crop shape) and a real-size phantom study graded through ONNX Runtime as PyTorch
grades it; a cache prepared for one preset is refused by a training of another."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pydicom
import torch

from export.onnx_export import export_run
from inference.analyze import analyze_study
from inference.labels import ConditionGroup
from inference.model import ModelMetadata
from inference.runtime import OnnxRunner
from tests.support.tools import lumbar_node
from training.presets import PRESETS, Preset
from training.runner import MODEL_NAME, load_model, save_model

OFFSETS = {ConditionGroup.SPINAL: (0.0, 0.0, 0.0), ConditionGroup.FORAMINAL: (22.0, 5.0, 6.0),
           ConditionGroup.SUBARTICULAR: (0.0, 0.0, 0.0)}
SCORE_KEYS = ("total", "spinal", "foraminal", "subarticular", "any_severe_spinal")
NO_VALIDATION = {"studies": 0, "median_level_error_mm": None,
                 **{k: dict.fromkeys(SCORE_KEYS, float("nan")) for k in ("score", "class_prior_score")}}


def _instances(study: Path) -> list[tuple[pydicom.Dataset, Path]]:
    return [(pydicom.dcmread(p, stop_before_pixels=True), p) for p in sorted(study.rglob("*.dcm"))]


def test_the_competition_preset_exports_and_grades_a_real_size_study_as_pytorch_does(tmp_path: Path) -> None:
    data, run, model = tmp_path / "real", tmp_path / "run", tmp_path / "model"
    lumbar_node("phantom", "--studies", "1", "--seed", "5", "--matrix", "real", "--out", str(data))
    torch.manual_seed(0)
    config = PRESETS[Preset.COMPETITION]
    localiser, grader = config.networks.build()  # random weights: the graph, not the skill, is under test
    meta = ModelMetadata(MODEL_NAME, "test", "random weights (test)", OFFSETS,
                         preprocessing=config.spec.to_preprocessing(), preset=Preset.COMPETITION.value,
                         networks=config.networks.to_json(), validation=NO_VALIDATION)
    save_model(run / "model.pt", localiser, grader, meta)
    exported = export_run(run, model)
    check = exported.verification["fp32"]  # type: ignore[index]  # the export always sets verification
    assert check["crop_shapes"] == 3 and check["max_abs_diff_probabilities"] < 1e-4
    written = json.loads((model / "model.json").read_text())
    assert written["preset"] == "competition" and set(written["preprocessing"]["graders"]) == {g.value for g in
                                                                                              ConditionGroup}
    assert written["onnx"]["outputs"]["grader"][1].startswith("cam (B, 8, 8)")

    onnx, torch_runner = OnnxRunner(model), load_model(run / "model.pt")
    assert onnx.metadata.spec == config.spec
    instances = _instances(next((data / "train_images").iterdir()))
    t0 = time.perf_counter()
    served = analyze_study(instances, onnx, check_levels=False)
    seconds = time.perf_counter() - t0
    reference = analyze_study(instances, torch_runner, check_levels=False)
    assessed = served.assessed()
    print(f"competition preset, real-size study through ONNX Runtime: {seconds:.1f} s "
          f"({len(assessed)} labels graded; {served.seconds})")
    assert assessed and [r.label for r in assessed] == [r.label for r in reference.assessed()]
    for a, b in zip(assessed, reference.assessed(), strict=True):
        assert np.allclose(a.probabilities, b.probabilities, atol=1e-4)
        assert a.cam.shape == (8, 8) and a.location.crop.spec == config.spec.grader(a.label.condition.group)
        if a.cam.std() > 0:
            assert np.corrcoef(a.cam.ravel(), b.cam.ravel())[0, 1] > 0.99
    assert {r.label.condition.group for r in assessed} >= {ConditionGroup.SPINAL, ConditionGroup.FORAMINAL}


def test_a_cache_prepared_for_one_preset_is_refused_by_a_training_of_another(tmp_path: Path) -> None:
    data, cache = tmp_path / "phantom", tmp_path / "cache"
    lumbar_node("phantom", "--studies", "3", "--seed", "2", "--out", str(data))
    small_crops = ["--grader-crop", "spinal=64,32,3", "--grader-crop", "foraminal=64,32,5",
                   "--grader-crop", "subarticular=64,32,3"]
    lumbar_node("prepare", "--data", str(data), "--out", str(cache), "--workers", "0", "--preset", "competition",
                *small_crops)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["spec"]["model"]["neural_foraminal_narrowing"] == {"size_mm": 64.0, "pixels": 32, "n_slices": 5}
    study = next(p for p in (cache / "studies").iterdir() if (p / "windows_1.npy").exists())
    assert np.load(study / "windows.npy").shape[1:] == (5, 48, 48)  # spinal and subarticular: 8 px, 1 slice margins
    assert np.load(study / "windows_1.npy").shape[1:] == (7, 48, 48)  # foraminal
    refused = lumbar_node("train", "--cache", str(cache), "--out", str(tmp_path / "run"), check=False)
    assert refused.returncode != 0 and "for other crops" in refused.stderr and "--preset" in refused.stderr
