"""``lumbar-node train`` and ``lumbar-node evaluate``: training's commands, joined to
``lumbar-node`` by the entry-point group ``lumbar_node.commands`` (see pyproject.toml).

Importing this module imports neither torch nor the training code: the commands do, when run.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


def require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise click.ClickException("this command needs PyTorch: a serving-only install has none "
                                   "(run scripts/setup.sh without LUMBAR_NODE_NO_TORCH=1)") from None


@click.command("train")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder in the RSNA 2024 layout (the real data or `lumbar-node phantom` output).")
@click.option("--out", "run", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run folder: checkpoints, history, final model.pt. An existing run is resumed.")
@click.option("--localiser-epochs", type=click.IntRange(min=1), default=24, show_default=True)
@click.option("--grader-epochs", type=click.IntRange(min=1), default=24, show_default=True)
@click.option("--patience", type=click.IntRange(min=1), default=6, show_default=True,
              help="Epochs without validation improvement before stopping early.")
@click.option("--seed", type=int, default=0, show_default=True, help="Split and augmentation seed.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu or cuda.")
@click.option("--training-data", default=None,
              help="How to describe the training data in the model's metadata and outputs.")
def train_command(data: Path, run: Path, localiser_epochs: int, grader_epochs: int, patience: int, seed: int,
                  device: str, training_data: str | None) -> None:
    """Train the level localiser and the grader (PyTorch) on the RSNA 2024 layout.

    Splits by study, trains the localiser, measures its real error on validation, trains the
    grader on crops jittered by that error with the competition loss, calibrates a temperature
    per condition, and writes RUN/model.pt. Checkpoints every epoch; rerun to resume.
    """
    require_torch()
    from training.train import TrainConfig, train

    cfg = TrainConfig(localiser_epochs=localiser_epochs, grader_epochs=grader_epochs, patience=patience,
                      seed=seed, device=device)
    if training_data:
        cfg.training_data = training_data
    train(data, run, cfg)


@click.command("evaluate")
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Held-out studies in the RSNA layout.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write evaluation.json and the PNG plots (default: RUN/evaluation).")
@click.option("--onnx", "onnx_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Evaluate this exported ONNX model folder instead of RUN's PyTorch checkpoint.")
def evaluate_command(run: Path, data: Path, out: Path | None, onnx_dir: Path | None) -> None:
    """Score a trained run (or its ONNX export) on held-out studies, through the serving pipeline.

    Prints and writes the competition score and its four parts, the class-prior baseline's
    score on the same studies, per-condition log loss, accuracy, precision/recall/F1, AUC,
    confusion matrices, Severe recall per condition and level-localisation error in mm.
    """
    require_torch()
    from training.evaluate import evaluate
    from training.runner import load_model

    folder = run if run.is_dir() else run.parent
    torch_runner = load_model(run / "model.pt" if run.is_dir() else run)
    runner = torch_runner
    if onnx_dir is not None:
        from inference.runtime import OnnxRunner

        runner = OnnxRunner(onnx_dir)
    history_path = folder / "history.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    out = out or (folder / "evaluation")
    report = evaluate(runner, data, torch_runner.metadata.class_prior, out, history)
    click.echo(json.dumps({k: report[k] for k in ("studies", "score", "class_prior_baseline", "score_over_baseline",
                                                   "severe_recall", "level_error_mm")}, indent=1))
    click.echo(f"written: {out / 'evaluation.json'}", err=True)
