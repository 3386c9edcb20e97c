"""``lumbar-node evaluate --model``: an exported model folder scored alone (no run, no torch),
``calibrate-levels`` on a model folder, and one-line errors for wrong paths, through the real command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from inference.runtime import DEFAULT_MODEL_DIR
from tests.support.tools import lumbar_node

# The command line of a serving-only install: torch and matplotlib cannot be imported.
WITHOUT_TORCH = ("import sys; sys.modules['torch'] = None; sys.modules['matplotlib'] = None; "
                 "from dicom_node.cli import main; main(sys.argv[1:])")


def test_evaluate_scores_the_bundled_model_folder_alone(phantom_dir: Path, tmp_path: Path) -> None:
    result = lumbar_node("evaluate", "--model", str(DEFAULT_MODEL_DIR), "--data", str(phantom_dir),
                         "--out", str(tmp_path))
    printed = json.loads(result.stdout)
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert printed["studies"] == report["studies"] == 8
    assert 0 < report["score"]["total"] < report["class_prior_baseline"]["total"]  # better than the prior
    assert (tmp_path / "confusion_matrices.png").is_file()
    assert not (DEFAULT_MODEL_DIR / "evaluation").exists()  # nothing written into the model folder


def test_evaluate_model_needs_neither_torch_nor_matplotlib(phantom_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "evaluate", "--model", str(DEFAULT_MODEL_DIR),
                             "--data", str(phantom_dir), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "evaluation.json").read_text())["studies"] == 8
    assert not list(tmp_path.glob("*.png")) and "PNG plots skipped" in result.stderr
    # a run still needs torch, and says so in one line
    run = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "evaluate", str(tmp_path), "--data", str(phantom_dir)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and "needs PyTorch" in run.stderr and "Traceback" not in run.stderr


def _one_line_error(*args: str) -> str:
    result = lumbar_node(*args, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    [error] = [line for line in result.stderr.splitlines() if not line.startswith("{")]  # beside JSON log lines
    assert error.startswith("Error: "), result.stderr
    return error


def test_wrong_paths_are_one_line_errors(phantom_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "file").write_text("x")
    data = str(phantom_dir)
    assert "does not exist" in _one_line_error("evaluate", "--model", str(tmp_path / "nope"), "--data", data)
    assert "no model.json" in _one_line_error("evaluate", "--model", str(empty), "--data", data)
    assert "is not a folder" in _one_line_error("evaluate", "--model", str(tmp_path / "file"), "--data", data)
    assert "does not exist" in _one_line_error("evaluate", "--model", str(DEFAULT_MODEL_DIR), "--data",
                                               str(tmp_path / "nope"))
    assert "no train.csv" in _one_line_error("evaluate", "--model", str(DEFAULT_MODEL_DIR), "--data", str(empty))
    assert "no trained model" in _one_line_error("evaluate", str(empty), "--data", data)
    assert "no trained model" in _one_line_error("evaluate", str(tmp_path / "nope"), "--data", data)
    assert "no train.csv" in _one_line_error("calibrate-levels", str(DEFAULT_MODEL_DIR), "--data", str(empty))
    broken = tmp_path / "broken"
    shutil.copytree(DEFAULT_MODEL_DIR, broken)
    (broken / "grader.onnx").write_bytes(b"not a graph")
    assert "cannot load the ONNX model" in _one_line_error("evaluate", "--model", str(broken), "--data", data)
    usage = lumbar_node("evaluate", "--data", data, check=False)
    assert usage.returncode == 2 and "either RUN" in usage.stderr


def test_calibrate_levels_fits_and_writes_the_check(phantom_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    meta = json.loads((model / "model.json").read_text())
    meta.pop("level_check", None)
    (model / "model.json").write_text(json.dumps(meta))
    out = lumbar_node("calibrate-levels", str(model), "--data", str(phantom_dir), "--val-fraction", "0.75").stdout
    fitted = json.loads((model / "model.json").read_text())
    check = fitted["level_check"]
    assert json.loads(out)["level_check"] == check
    assert check["fitted_on"] >= 5 and 0 < check["min_peak"] < 0.8 and check["min_gap_mm"] < check["max_gap_mm"]
    assert fitted["validation"]["level_check"]["rejected_correct"] == 0
    assert {k: v for k, v in fitted.items() if k not in ("level_check", "validation")} == \
        {k: v for k, v in meta.items() if k != "validation"}  # nothing else changed
    card = (model / "MODEL_CARD.md").read_text()
    assert card.count("- Level check: ") == 1 and f"fitted on {check['fitted_on']}" in card
