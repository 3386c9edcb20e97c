"""``lumbar-node train`` and ``lumbar-node evaluate``: training's commands, joined to
``lumbar-node`` by the entry-point group ``lumbar_node.commands`` (see pyproject.toml).

Importing this module imports neither torch nor the training code: the commands do, when run.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import click


def require_torch() -> None:
    try:
        import torch  # noqa: F401 - imported to learn whether it can be
    except ImportError:
        raise click.ClickException("this command needs PyTorch: a serving-only install has none "
                                   "(run scripts/setup.sh without LUMBAR_NODE_NO_TORCH=1)") from None


PRESET_CHOICE = click.Choice(["small", "competition"])


def _preset_options(f):  # noqa: ANN001, ANN202 - a click decorator
    """``--preset`` and ``--grader-crop``, shared by prepare and train."""
    f = click.option("--grader-crop", "grader_crop", multiple=True, metavar="GROUP=SIZE_MM,PIXELS,SLICES",
                     help="Override one group's grader crop (GROUP: spinal, foraminal, subarticular), e.g. "
                          "spinal=64,128,7; repeat for several. Recorded in RUN/config.json.")(f)
    return click.option("--preset", type=PRESET_CHOICE, default="small", show_default=True,
                        help="Model size (training/presets.py): small (the bundled model's networks and crops) or "
                             "competition (128 px crops, 5-9 slices per group, per-slice ResNet-34 with an "
                             "attention head across slices, 256 px localiser grid).")(f)


def _prepare_spec(preset: str, grader_crop: tuple[str, ...]):  # noqa: ANN202 - training.cache.PrepareSpec
    """The cache spec of a preset with its overrides, or a one-line usage error."""
    from training.cache import PrepareSpec
    from training.presets import resolve

    try:
        return PrepareSpec(model=resolve(preset, grader_crop).spec)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--grader-crop") from None


@click.command("prepare")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Folder in the RSNA 2024 layout (the Kaggle download, or `lumbar-node phantom` output).")
@click.option("--out", "cache", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Cache folder: one folder of arrays per study and manifest.json. An existing cache is "
                   "brought up to date (unchanged studies are skipped; an interrupted run resumes).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Processes reading the studies (0: in this process)  [default: min(4, CPU count)]")
@_preset_options
def prepare_command(data: Path, cache: Path, workers: int | None, preset: str, grader_crop: tuple[str, ...]) -> None:
    """Read every study once into a training cache (what `lumbar-node train --cache` reads).

    Per study: the localiser images and the canal points on them, the crop window of every
    labelled finding (with room for the jitter), the labels and the marked points, as
    memory-mappable .npy arrays, for the crops of --preset. A study that cannot be used is left out
    with its reason (no coordinates, no readable images, ...). Prints a one-line summary.
    """
    _rsna_folder(data)
    spec = _prepare_spec(preset, grader_crop)
    from training.cache import CacheError
    from training.prepare import prepare
    from training.rsna import LayoutError

    try:
        summary = prepare(data, cache, workers, spec=spec)
    except (LayoutError, CacheError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write the cache {cache}: {exc}") from None
    click.echo(summary.line())


@click.command("train")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Folder in the RSNA 2024 layout (the real data or `lumbar-node phantom` output): "
                   "prepared first (into --cache, else RUN/cache; up-to-date studies are skipped).")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A cache made by `lumbar-node prepare`: training reads only it (validation reads the "
                   "validation studies' DICOM files from the data folder it was prepared from).")
@click.option("--out", "run", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run folder: checkpoints, history, final model.pt. An existing run is resumed.")
@click.option("--localiser-epochs", type=click.IntRange(min=1), default=24, show_default=True)
@click.option("--grader-epochs", type=click.IntRange(min=1), default=24, show_default=True)
@click.option("--patience", type=click.IntRange(min=1), default=6, show_default=True,
              help="Epochs without validation improvement before stopping early.")
@click.option("--seed", type=int, default=0, show_default=True, help="Split and augmentation seed.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu or cuda.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader worker processes (0: load in the training process), and prepare's "
                   "processes with --data  [default: min(4, CPU count)]")
@click.option("--augment", "augment", default="default", show_default=True,
              help="Training augmentation (training/augment.py): default, legacy (jitter, slice shift, intensity "
                   "scale and noise only), off, or a JSON object of settings that change the default, e.g. "
                   "'{\"mirror_p\": 0, \"rotate_deg\": 5}'. Recorded in RUN/config.json.")
@click.option("--training-data", default=None,
              help="How to describe the training data in the model's metadata and outputs.")
@click.option("--folds", type=click.IntRange(min=2), default=None,
              help="K-fold cross-validation: K models on disjoint validation folds (by study, from --seed) in "
                   "RUN/fold-0 ... RUN/fold-<K-1>, scored together out of fold in RUN/report.md. A rerun skips "
                   "finished folds and resumes the interrupted one.")
@click.option("--fold", type=click.IntRange(min=0), default=None,
              help="With --folds K: train only this fold (0 to K-1), e.g. one fold per GPU as separate jobs into "
                   "the same RUN; the report is written once every fold is finished.")
@_preset_options
@click.option("--init-weights", "init_weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Start the grader's backbone (competition preset) from this state dict: torchvision's ResNet-34 "
                   "layout, a .pth/.pt file or .safetensors, matched by name and shape. Nothing is downloaded.")
@click.option("--batch-studies", type=click.IntRange(min=1), default=8, show_default=True,
              help="Studies per grader batch (every labelled window of each): the global batch, whatever --nproc.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Training precision: auto is bf16 on a GPU that supports it, else fp16 with a gradient "
                   "scaler, and fp32 on CPU.")
@click.option("--accumulate", type=click.IntRange(min=1), default=1, show_default=True,
              help="Gradient accumulation: micro-batches per optimiser step.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the training forward pass.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Training processes on this machine (distributed data parallel under torch.distributed.run: "
                   "one per GPU on CUDA, gloo on CPU). Across machines run this command under your own torchrun.")
def train_command(data: Path | None, cache: Path | None, run: Path, localiser_epochs: int, grader_epochs: int,
                  patience: int, seed: int, device: str, workers: int | None, augment: str,
                  training_data: str | None, folds: int | None, fold: int | None, preset: str,
                  grader_crop: tuple[str, ...],
                  init_weights: Path | None, batch_studies: int, precision: str, accumulate: int, compile_: bool,
                  nproc: int) -> None:
    """Train the level localiser and the grader (PyTorch) on a prepared cache or an RSNA 2024 folder.

    Splits by study, trains the localiser, measures its real error on validation, trains the
    grader on crops jittered by that error with the competition loss, calibrates a temperature
    per condition, and writes RUN/model.pt. Checkpoints every epoch; rerun to resume (with any --nproc).
    With --folds K: K such runs in RUN/fold-<i>. Ends with RUN/report.md (what the model is, its
    out-of-fold score with bootstrap intervals).
    """
    if fold is not None and (folds is None or fold >= folds):
        raise click.BadParameter("needs --folds K with K above it", param_hint="--fold")
    if data is None and cache is None:
        raise click.UsageError("give --data RSNA_DIR (prepared first) or --cache CACHE (from `lumbar-node prepare`)")
    require_torch()
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if under_torchrun and nproc > 1:
        raise click.UsageError("--nproc starts torchrun itself: under your own torchrun leave it out")
    if under_torchrun and data is not None:
        raise click.UsageError("under torchrun give --cache (prepare it first with `lumbar-node prepare`), "
                               "not --data: the processes would all prepare it")
    if data is not None:
        _rsna_folder(data)
    from training.cache import CacheError
    from training.distributed import World
    from training.folds import FoldsError, fold_folder, train_folds
    from training.init_weights import InitWeightsError
    from training.precision import resolve_precision
    from training.prepare import prepare
    from training.report import OOF_FILE, write_report
    from training.rsna import LayoutError
    from training.runner import device_of
    from training.train import TrainConfig, train

    spec = _prepare_spec(preset, grader_crop)
    if init_weights is not None and not init_weights.is_file():
        raise click.BadParameter(f"{init_weights} is not a file", param_hint="--init-weights")
    try:
        resolve_precision(precision, device_of(device))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--precision") from None
    cfg = TrainConfig(localiser_epochs=localiser_epochs, grader_epochs=grader_epochs, patience=patience,
                      seed=seed, device=device, augment=_augment_config(augment), preset=preset,
                      grader_crop=tuple(grader_crop),
                      init_weights=str(init_weights.resolve()) if init_weights else None,
                      batch_studies=batch_studies, precision=precision, accumulate=accumulate, compile=compile_)
    if workers is not None:
        cfg.workers = workers
    if training_data:
        cfg.training_data = training_data
    try:
        if data is not None:
            cache = cache or run / "cache"
            click.echo(prepare(data, cache, cfg.workers, spec=spec).line(), err=True)
        assert cache is not None
        if nproc > 1:
            _launch(nproc, cache)
        elif folds:
            train_folds(cache, run, cfg, folds, only=fold)
        else:
            train(cache, run, cfg)
    except (LayoutError, CacheError, FoldsError, InitWeightsError) as exc:
        raise click.ClickException(str(exc)) from None
    if not World.from_env().main:
        return  # rank 0 (or the launcher) writes the report
    if fold is not None and not all((fold_folder(run, k) / OOF_FILE).is_file() for k in range(folds or 0)):
        click.echo(f"fold {fold} of {folds} finished; {run / 'report.md'} is written when every fold is", err=True)
        return
    report = write_report(run)
    click.echo(f"CV score {report['cv_score']['score']:.3f} (95% interval {report['cv_score']['low']:.3f} to "
               f"{report['cv_score']['high']:.3f}, {report['studies']} studies): {run / 'report.md'}", err=True)


def _launch(nproc: int, cache: Path) -> None:
    """Run this train command again in ``nproc`` processes under torch.distributed.run: the same
    arguments without --nproc, and the prepared ``cache`` in place of --data."""
    from training.distributed import launch

    args = _without(_without(sys.argv[1:], "--nproc"), "--data")
    if "--cache" not in args and not any(a.startswith("--cache=") for a in args):
        args += ["--cache", str(cache)]
    if launch(nproc, args) != 0:
        raise click.ClickException(f"training failed in one of its {nproc} processes (their output is above)")


def _without(args: Sequence[str], option: str) -> list[str]:
    """``args`` without ``option`` and its value (``--option VALUE`` or ``--option=VALUE``)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def _augment_config(text: str):  # noqa: ANN202 - training.augment.AugmentConfig, imported lazily
    """``--augment``'s value as an AugmentConfig, or a one-line usage error."""
    from training.augment import AugmentConfig

    named = {"default": AugmentConfig, "legacy": AugmentConfig.legacy, "off": AugmentConfig.off}
    if text in named:
        return named[text]()
    try:
        changes = json.loads(text)
        if not isinstance(changes, dict):
            raise ValueError("not a JSON object")
        return AugmentConfig.from_dict({**AugmentConfig().to_dict(), **changes})
    except ValueError as exc:
        raise click.BadParameter(f"{exc} (give default, legacy, off or a JSON object of settings)",
                                 param_hint="--augment") from None


def _existing_dir(path: Path, what: str) -> Path:
    """``path`` when it is a folder, else a one-line error naming it."""
    if not path.exists():
        raise click.ClickException(f"{what} {path} does not exist")
    if not path.is_dir():
        raise click.ClickException(f"{what} {path} is not a folder")
    return path


def _rsna_folder(data: Path) -> Path:
    """The data folder when it is in the RSNA layout (its train.csv there), else a one-line error."""
    from inference.rsna_layout import TRAIN_CSV

    _existing_dir(data, "data folder")
    if not (data / TRAIN_CSV).is_file():
        raise click.ClickException(f"data folder {data} is not in the RSNA 2024 layout: no {TRAIN_CSV} "
                                   "(make one with `lumbar-node phantom`, or give the competition folder)")
    return data


def _onnx_runner(model_dir: Path):  # noqa: ANN202 - inference.runtime.OnnxRunner, imported lazily
    """The exported model folder's ONNX Runtime runner, or a one-line error."""
    from inference.model import ModelError
    from inference.runtime import OnnxRunner

    _existing_dir(model_dir, "model folder")
    try:
        return OnnxRunner(model_dir)
    except (ModelError, OSError, ValueError) as exc:
        raise click.ClickException(f"model folder {model_dir}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors (a corrupt .onnx file) have no common base
        raise click.ClickException(f"model folder {model_dir}: cannot load the ONNX model: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


@click.command("evaluate")
@click.argument("run", type=click.Path(path_type=Path), required=False)
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Evaluate an exported ONNX model folder alone (no run, no PyTorch needed): the "
                   "bundled default or one you received. Its model.json holds the class prior.")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Held-out studies in the RSNA layout.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write evaluation.json and the PNG plots (default: RUN/evaluation; "
                   "with --model, nothing is written unless --out is given).")
@click.option("--onnx", "onnx_dir", type=click.Path(path_type=Path), default=None,
              help="With RUN: evaluate this exported ONNX model folder instead of RUN's PyTorch checkpoint.")
def evaluate_command(run: Path | None, model_dir: Path | None, data: Path, out: Path | None,
                     onnx_dir: Path | None) -> None:
    """Score a trained run, its ONNX export, or an exported model folder alone on held-out
    studies, through the serving pipeline.

    `lumbar-node evaluate RUN --data DIR` scores RUN's checkpoint (PyTorch);
    `lumbar-node evaluate --model MODEL_DIR --data DIR` scores an ONNX model folder with ONNX
    Runtime only. Prints (and writes) the competition score and its four parts, the class-prior
    baseline's score on the same studies, per-condition log loss, accuracy, precision/recall/F1,
    AUC, confusion matrices, Severe recall per condition and level-localisation error in mm.
    """
    if (run is None) == (model_dir is None):
        raise click.UsageError("give either RUN (a training run) or --model MODEL_DIR (an exported model folder)")
    if model_dir is not None and onnx_dir is not None:
        raise click.UsageError("--onnx goes with RUN; with --model the folder itself is evaluated")
    _rsna_folder(data)
    history: list = []
    if model_dir is not None:
        runner = _onnx_runner(model_dir)
        class_prior = runner.metadata.class_prior
        if len(class_prior) != 25:
            raise click.ClickException(f"model folder {model_dir}: model.json has no class_prior "
                                       "(25 rows, written by training): it cannot be scored alone")
    else:
        assert run is not None
        require_torch()
        from training.runner import load_model

        checkpoint = run / "model.pt" if run.is_dir() else run
        if not checkpoint.is_file():
            if (run / "fold-0").is_dir():
                raise click.ClickException(f"{run} is a folds run: evaluate one fold (RUN/fold-<i>), or export the "
                                           "ensemble (`lumbar-node export RUN --out MODEL`) and evaluate --model MODEL")
            raise click.ClickException(f"no trained model at {checkpoint} (train one with `lumbar-node train`)")
        folder = checkpoint.parent
        try:
            torch_runner = load_model(checkpoint)
        except Exception as exc:  # noqa: BLE001 - torch.load's errors (a truncated or foreign file) vary
            raise click.ClickException(f"cannot read the checkpoint {checkpoint}: "
                                       f"{type(exc).__name__}: {exc}") from None
        runner = torch_runner if onnx_dir is None else _onnx_runner(onnx_dir)
        class_prior = torch_runner.metadata.class_prior
        history_path = folder / "history.json"
        history = json.loads(history_path.read_text()) if history_path.is_file() else []
        out = out or (folder / "evaluation")
    from training.evaluate import evaluate
    from training.rsna import LayoutError

    try:
        report = evaluate(runner, data, class_prior, out, history)
    except LayoutError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({k: report[k] for k in ("studies", "score", "class_prior_baseline", "score_over_baseline",
                                                   "severe_recall", "level_error_mm")}, indent=1))
    if out is not None:
        click.echo(f"written: {out / 'evaluation.json'}", err=True)


@click.command("calibrate-levels")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="The model's training data in the RSNA layout (its validation split is used).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="The split seed training used (`lumbar-node train --seed`).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="The validation fraction training used.")
def calibrate_levels_command(model_dir: Path, data: Path, seed: int, val_fraction: float) -> None:
    """Fit the level check of an exported model folder and write it into its model.json.

    For a model whose training run is not kept (the bundled default): the decoded levels of the
    validation split of its training data (the same split function, fraction and seed as
    training) are measured with ONNX Runtime, and the thresholds (weakest heatmap peak, spacing
    and direction of adjacent levels) fitted on the correctly localised studies with the
    documented margins (inference/level_check.py). Training fits them itself.
    """
    _rsna_folder(data)
    runner = _onnx_runner(model_dir)
    from inference.model import ModelMetadata
    from training.level_calibration import calibrate_levels, update_model_card, with_level_check
    from training.rsna import LayoutError

    try:
        fit = calibrate_levels(runner, data, val_fraction, seed)
    except LayoutError as exc:
        raise click.ClickException(str(exc)) from None
    if fit.correct == 0:
        raise click.ClickException(f"no validation study of {data} was localised correctly: nothing to fit "
                                   "(is it the model's training data?)")
    meta: ModelMetadata = with_level_check(runner.metadata, fit)
    meta.write(model_dir / "model.json")
    update_model_card(model_dir / "MODEL_CARD.md", meta)
    click.echo(json.dumps({"level_check": fit.check.to_json(), **fit.as_dict()}, indent=1))
    click.echo(f"written: {model_dir / 'model.json'}", err=True)
