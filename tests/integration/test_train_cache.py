"""``lumbar-node train --cache`` end to end on a prepared phantom cache, with DataLoader worker
processes: the run, its recorded configuration, and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.support.tools import lumbar_node
from training.augment import AugmentConfig, replace_fields
from training.cache import MANIFEST, Manifest, PrepareSpec
from training.runner import load_model


def test_train_from_a_prepared_cache_with_loader_workers_and_resume(phantom_dir: Path, tmp_path: Path) -> None:
    cache, run = tmp_path / "cache", tmp_path / "run"
    lumbar_node("prepare", "--data", str(phantom_dir), "--out", str(cache), "--workers", "2")
    args = ("train", "--cache", str(cache), "--out", str(run), "--localiser-epochs", "1", "--grader-epochs", "1",
            "--workers", "2", "--augment", '{"mirror_p": 0.25}')
    lumbar_node(*args)
    history = json.loads((run / "history.json").read_text())
    assert [h["stage"] for h in history] == ["localiser", "grader"]
    assert history[1]["loss"] > 0 and history[0]["val_median_error_mm"] >= 0
    meta = load_model(run / "model.pt").metadata
    assert meta.validation["score"]["total"] > 0 and len(meta.temperatures) == 5
    assert meta.train_studies + meta.validation["studies"] == len(Manifest.load(cache).ok())
    config = json.loads((run / "config.json").read_text())
    assert config["workers"] == 2 and config["cache"] == str(cache.resolve())
    assert config["spec_hash"] == Manifest.load(cache).spec.hash
    assert AugmentConfig.from_dict(config["augment"]) == replace_fields(AugmentConfig(), mirror_p=0.25)
    assert not (run / "cache").exists()  # --cache given: nothing prepared beside the run
    report = (run / "report.md").read_text()  # a single run's report: what the model is, its validation score
    assert "Preset: small" in report and "one run" in report and "Device: cpu" in report
    with np.load(run / "oof.npz") as oof:
        assert len(oof["study_ids"]) == meta.validation["studies"]

    again = lumbar_node(*args)
    assert "resuming" in again.stderr
    assert json.loads((run / "history.json").read_text()) == history


def test_train_says_what_to_do_with_a_missing_or_unfinished_cache(tmp_path: Path) -> None:
    missing = lumbar_node("train", "--cache", str(tmp_path / "none"), "--out", str(tmp_path / "run"), check=False)
    assert missing.returncode != 0 and "lumbar-node prepare" in missing.stderr
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / MANIFEST).write_text(json.dumps(
        {"spec": PrepareSpec().to_json(), "data": str(tmp_path), "complete": False, "studies": {}}))
    unfinished = lumbar_node("train", "--cache", str(tmp_path / "half"), "--out", str(tmp_path / "run"), check=False)
    assert unfinished.returncode != 0 and "did not finish" in unfinished.stderr
    neither = lumbar_node("train", "--out", str(tmp_path / "run"), check=False)
    assert neither.returncode != 0 and "--data" in neither.stderr and "--cache" in neither.stderr

