"""``lumbar-node train --folds 3`` on the phantom: disjoint validation folds covering every study, the
out-of-fold report; its ensemble exported, graded alike by ONNX Runtime and PyTorch, served by
``predict`` and ``evaluate --model``; ``export --ensemble`` of runs trained apart, and its refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.ensemble import load_ensemble
from inference.analyze import analyze_study
from inference.model import file_sha256
from inference.runtime import OnnxRunner
from tests.support.tools import lumbar_node
from training.cache import Manifest
from training.rsna import load_rsna, read_instances

FOLDS = 3


@pytest.fixture(scope="module")
def folds_run(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("folds")
    run, exported = root / "run", root / "ensemble"
    lumbar_node("train", "--data", str(phantom_dir), "--out", str(run), "--folds", str(FOLDS),
                "--localiser-epochs", "1", "--grader-epochs", "1", "--workers", "0")
    lumbar_node("export", str(run), "--out", str(exported))
    return run, exported


def test_folds_validate_every_study_once_and_the_report_scores_them_out_of_fold(folds_run: tuple[Path, Path],
                                                                               phantom_dir: Path) -> None:
    run, _ = folds_run
    usable = sorted(Manifest.load(run / "cache").ok())
    held_out = []
    for k in range(FOLDS):
        fold = run / f"fold-{k}"
        assert (fold / "model.pt").is_file()
        config = json.loads((fold / "config.json").read_text())
        assert (config["folds"], config["fold"]) == (FOLDS, k) and config["device_used"].startswith("cpu")
        with np.load(fold / "oof.npz") as oof:
            held_out.append(oof["study_ids"].tolist())
            assert oof["probabilities"].shape == oof["uncalibrated"].shape == (len(oof["study_ids"]), 25, 3)
    assert sorted(s for ids in held_out for s in ids) == usable  # disjoint, and every study once
    assert all(held_out)

    report = json.loads((run / "report.json").read_text())
    cv = report["cv_score"]
    assert cv["low"] <= cv["score"] <= cv["high"] and cv["score"] > 0
    assert report["studies"] == len(usable) and report["folds"] == FOLDS and report["preset"] == "small"
    assert report["bootstrap"]["draws"] == 1000
    assert [f["fold"] for f in report["per_fold"]] == list(range(FOLDS))
    assert {"spinal", "foraminal", "subarticular", "l4_l5"} <= set(report["scores"])
    assert report["timing"]["total_seconds"] > 0 and report["timing"]["epochs"] == {"localiser": 3, "grader": 3}
    text = (run / "report.md").read_text()
    assert "Preset: small" in text and f"{FOLDS}-fold cross-validation" in text and "Device: cpu" in text
    assert (run / "report.png").stat().st_size > 0

    again = lumbar_node("train", "--data", str(phantom_dir), "--out", str(run), "--folds", str(FOLDS),
                        "--localiser-epochs", "1", "--grader-epochs", "1", "--workers", "0")
    assert again.stderr.count("fold finished: skipped") == FOLDS
    one = lumbar_node("train", "--cache", str(run / "cache"), "--out", str(run), "--folds", str(FOLDS), "--fold", "1",
                      "--localiser-epochs", "1", "--grader-epochs", "1", "--workers", "0")
    assert one.stderr.count("fold finished: skipped") == 1 and '"fold": 1,' in one.stderr
    other = lumbar_node("train", "--cache", str(run / "cache"), "--out", str(run), "--folds", "4", check=False)
    assert other.returncode != 0 and "holds 3 folds" in other.stderr


def test_the_ensemble_lists_its_members_and_onnx_grades_like_pytorch(folds_run: tuple[Path, Path],
                                                                      phantom_dir: Path) -> None:
    run, exported = folds_run
    meta = json.loads((exported / "model.json").read_text())
    members = meta["members"]
    assert [m["fold"] for m in members] == list(range(FOLDS))
    assert [m["checkpoint_sha256"] for m in members] == [file_sha256(run / f"fold-{k}" / "model.pt")
                                                         for k in range(FOLDS)]
    cv = json.loads((run / "report.json").read_text())["cv_score"]["score"]
    assert all(m["cv_score"] == pytest.approx(cv) and m["preset"] == "small" for m in members)
    assert meta["validation"]["studies"] == len(Manifest.load(run / "cache").ok())
    assert meta["verification"]["fp32"]["max_abs_diff_probabilities"] <= 1e-4
    assert meta["verification"]["fp32"]["min_gradcam_correlation_vs_autograd"] >= 0.99

    onnx, (torch_runner, _) = OnnxRunner(exported, providers=("CPUExecutionProvider",)), load_ensemble([run])
    assert onnx.metadata.members is not None and len(onnx.metadata.members) == FOLDS
    assert np.allclose(onnx.metadata.temperatures, torch_runner.grader.temperature.numpy())
    record = load_rsna(phantom_dir)[0]
    instances = read_instances(record)
    with torch.no_grad():  # levels unchecked: one epoch's localiser may not pass the check, the crops are graded
        a, b = (analyze_study(instances, r, check_levels=False) for r in (onnx, torch_runner))
    pa, pb = a.probabilities(), b.probabilities()
    assert not np.isnan(pa).all()
    assert np.array_equal(np.isnan(pa), np.isnan(pb))
    assert np.nanmax(np.abs(pa - pb)) < 1e-4

    study = phantom_dir / "train_images" / str(record.study_id)
    [predicted] = json.loads(lumbar_node("predict", str(study), "--model", str(exported), "--json").stdout)
    assert len(predicted["labels"]) == 25


def test_evaluate_serves_the_ensemble_folder(folds_run: tuple[Path, Path], phantom_dir: Path, tmp_path: Path) -> None:
    run, exported = folds_run
    lumbar_node("evaluate", "--model", str(exported), "--data", str(phantom_dir), "--out", str(tmp_path))
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["studies"] == 8 and report["score"]["total"] > 0
    whole = lumbar_node("evaluate", str(run), "--data", str(phantom_dir), check=False)
    assert whole.returncode != 0 and "is a folds run" in whole.stderr


def test_export_ensemble_of_runs_trained_apart_and_its_refusals(folds_run: tuple[Path, Path],
                                                                 tmp_path: Path) -> None:
    run, _ = folds_run
    apart = tmp_path / "apart"
    lumbar_node("export", "--ensemble", str(run / "fold-0"), str(run / "fold-1"), "--tta", "--out", str(apart))
    meta = json.loads((apart / "model.json").read_text())
    assert meta["onnx"]["ensemble"]["tta"].startswith("spinal canal crops averaged with their left-right mirror")
    assert [m["fold"] for m in meta["members"]] == [None, None]
    assert meta["validation"]["fitted_on"].startswith("not fitted: the runs hold out 0 common studies")

    other = tmp_path / "other"
    other.mkdir()
    state = torch.load(run / "fold-2" / "model.pt", weights_only=False)
    state["meta"]["preprocessing"]["grader"]["pixels"] = 96
    torch.save(state, other / "model.pt")
    refused = lumbar_node("export", "--ensemble", str(run / "fold-0"), str(other), "--out", str(tmp_path / "x"),
                          check=False)
    assert refused.returncode != 0 and "differ in preprocessing (grader)" in refused.stderr
    several = lumbar_node("export", str(run / "fold-0"), str(run / "fold-1"), "--out", str(tmp_path / "y"),
                          check=False)
    assert several.returncode != 0 and "--ensemble" in several.stderr


def test_an_interrupted_fold_resumes_and_finished_ones_are_skipped(folds_run: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    run, _ = folds_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("cache"))
    history = (copy / "fold-1" / "history.json").read_text()
    for name in ("model.pt", "oof.npz"):  # fold 1 stopped after its last epoch, before its model was written
        (copy / "fold-1" / name).unlink()
    again = lumbar_node("train", "--cache", str(run / "cache"), "--out", str(copy), "--folds", str(FOLDS),
                        "--localiser-epochs", "1", "--grader-epochs", "1", "--workers", "0")
    assert again.stderr.count("fold finished: skipped") == FOLDS - 1
    assert again.stderr.count("resuming from checkpoint") == 1
    assert (copy / "fold-1" / "history.json").read_text() == history  # no epoch repeated
    assert (copy / "fold-1" / "model.pt").is_file() and (copy / "report.md").is_file()
