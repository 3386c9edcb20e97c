"""Training end to end on a few phantom studies (one short epoch), export with its parity checks,
the competition loss, and ``predict``, through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.onnx_export import ExportError, autograd_gradcam, sample_inputs, verify
from inference.labels import CONDITIONS, LABEL_COLUMNS, LABELS, ConditionGroup
from tests.support.kaggle import make_kaggle_phantom
from tests.support.tools import lumbar_node
from training.metrics import competition_score
from training.models import CONDITION_GROUP, Grader
from training.runner import load_model
from training.train import fit_temperatures, grader_loss


@pytest.fixture(scope="module")
def trained(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("model")
    run, exported = root / "run", root / "onnx"
    lumbar_node("train", "--data", str(phantom_dir), "--out", str(run), "--localiser-epochs", "1",
                "--grader-epochs", "1")
    lumbar_node("export", str(run), "--out", str(exported))
    return run, exported


def test_training_writes_a_resumable_run_and_a_model(trained: tuple[Path, Path], phantom_dir: Path) -> None:
    run, _ = trained
    assert (run / "model.pt").is_file() and (run / "state.pt").is_file()
    history = json.loads((run / "history.json").read_text())
    assert [h["stage"] for h in history] == ["localiser", "grader"]
    meta = load_model(run / "model.pt").metadata
    assert meta.label_columns == LABEL_COLUMNS
    assert set(meta.offsets_mm) == set(ConditionGroup)
    assert len(meta.temperatures) == len(CONDITIONS)
    assert meta.validation["score"]["total"] > 0
    # running again over the same run folder resumes from its checkpoint: no epoch is repeated
    again = lumbar_node("train", "--data", str(phantom_dir), "--out", str(run), "--localiser-epochs", "1",
                        "--grader-epochs", "1")
    assert "resuming" in again.stderr
    assert json.loads((run / "history.json").read_text()) == history


def test_export_metadata_and_verification(trained: tuple[Path, Path]) -> None:
    _, exported = trained
    meta = json.loads((exported / "model.json").read_text())
    assert meta["onnx"]["opset"] >= 17
    assert meta["label_columns"] == list(LABEL_COLUMNS)
    assert "phantom" in meta["training_data"]
    checks = meta["verification"]["fp32"]
    assert checks["max_abs_diff_probabilities"] <= 1e-4
    assert checks["min_gradcam_correlation_vs_autograd"] >= 0.99
    grader = onnx.load(str(exported / "grader.onnx"))
    assert grader.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch
    assert [o.name for o in grader.graph.output] == ["probabilities", "cam"]


def test_export_fails_loudly_when_the_graph_differs(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, exported = trained
    runner = load_model(run / "model.pt")
    with torch.no_grad():
        runner.grader.head.bias[0] += 0.5  # the checkpoint no longer matches the exported graph
    with pytest.raises(ExportError, match="probabilities differ"):
        verify(exported, runner)


def test_in_graph_gradcam_equals_autograd_gradcam() -> None:
    torch.manual_seed(0)
    grader = Grader().eval()
    crops, conditions, _ = sample_inputs(10)
    _, cam = grader(torch.from_numpy(crops), torch.from_numpy(conditions))
    auto = autograd_gradcam(grader, torch.from_numpy(crops), torch.from_numpy(conditions))
    for a, b in zip(cam.detach().numpy(), auto.numpy(), strict=True):
        if a.max() > 0:
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999


def test_the_training_loss_is_the_competition_metric() -> None:
    """With every label present, the loss on logits equals the metric on their softmax."""
    rng = np.random.default_rng(1)
    n_studies = 3
    logits = torch.from_numpy(rng.normal(0, 1.5, (n_studies * 25, 3, 3)).astype(np.float32))
    targets = torch.from_numpy(rng.choice(3, n_studies * 25, p=[0.6, 0.25, 0.15]))
    conditions = torch.tensor([CONDITIONS.index(lb.condition) for lb in LABELS] * n_studies)
    studies = torch.arange(n_studies).repeat_interleave(25)
    loss = float(grader_loss(logits, targets, conditions, studies))
    group = torch.tensor(CONDITION_GROUP)[conditions]
    own = logits[torch.arange(len(logits)), group]
    probs = torch.softmax(own, dim=1).numpy().reshape(n_studies, 25, 3)
    score = competition_score(probs, targets.numpy().reshape(n_studies, 25))
    assert loss == pytest.approx(score.total, rel=1e-4)


def test_temperature_calibration_fixes_overconfidence() -> None:
    rng = np.random.default_rng(0)
    targets = rng.choice(3, (200, 25), p=[0.7, 0.2, 0.1])
    right = rng.random((200, 25)) < 0.7
    predicted = np.where(right, targets, rng.choice(3, (200, 25)))
    probs = np.full((200, 25, 3), 0.01)
    np.put_along_axis(probs, predicted[..., None], 0.98, axis=2)  # overconfident
    temps = fit_temperatures(probs, targets)
    assert all(t > 1.5 for t in temps)


def test_predict_prints_json_for_a_study(trained: tuple[Path, Path], phantom_dir: Path) -> None:
    _, exported = trained
    study = sorted((phantom_dir / "train_images").iterdir())[0]
    out = lumbar_node("predict", str(study), "--model", str(exported), "--json").stdout
    [result] = json.loads(out)
    assert len(result["labels"]) == 25
    assert "not for diagnosis" in result["disclaimer"]
    for item in result["labels"]:
        if item["assessed"]:
            assert sum(item["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        else:
            assert item["reason"]


def test_predict_reports_a_folder_without_dicom_clearly(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    result = lumbar_node("predict", str(tmp_path), check=False)
    assert result.returncode != 0 and "no DICOM images" in result.stderr



def test_runner_grades_in_evaluation_mode_even_after_training_mode(trained: tuple[Path, Path]) -> None:
    """The training loop switches the shared modules to train(); validation must not see dropout
    or batch statistics."""
    run, _ = trained
    runner = load_model(run / "model.pt")
    crops, conditions, _ = sample_inputs(25)
    runner.grader.train()
    first, _ = runner.grade(crops, conditions)
    runner.grader.train()
    single, _ = runner.grade(crops[:1], conditions[:1])
    assert np.allclose(first[:1], single, atol=1e-5)  # batch composition does not matter


def test_a_kaggle_style_phantom_trains_exports_evaluates_and_predicts(tmp_path: Path) -> None:
    """The RSNA 2024 files as Kaggle ships them (no SOP class in the data set, repeated SOP Instance
    UIDs across series, a frame of reference per series, RLE) through every command an ML engineer runs."""
    data, run, exported = tmp_path / "kaggle", tmp_path / "run", tmp_path / "onnx"
    make_kaggle_phantom(data, studies=8, seed=11)
    lumbar_node("train", "--data", str(data), "--out", str(run), "--localiser-epochs", "1", "--grader-epochs", "1")
    lumbar_node("export", str(run), "--out", str(exported))
    assert "level_check" in json.loads((exported / "model.json").read_text())
    evaluation = tmp_path / "evaluation"
    scored = lumbar_node("evaluate", "--model", str(exported), "--data", str(data), "--out", str(evaluation))
    report = json.loads((evaluation / "evaluation.json").read_text())
    assert report["studies"] == 8 and report["score"]["total"] > 0, scored.stdout
    out = tmp_path / "predicted"
    predicted = lumbar_node("predict", str(data / "train_images"), "--model", str(exported), "--json",
                            "--out", str(out))
    results = json.loads(predicted.stdout)
    assert len(results) == 8
    for result in results:  # each study is reported, or says why not (one epoch may not find the levels)
        assert all(lb["assessed"] or lb["reason"] for lb in result["labels"])
        reported = (out / result["study_uid"]).is_dir()
        assert reported != ("no_report" in result), result.get("no_report")
