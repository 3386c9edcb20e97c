"""The ``lumbar-node`` command line."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import yaml

from dicom_node import __version__
from dicom_node.config import ConfigError, Settings, load_settings
from dicom_node.logconfig import configure_logging, get_logger


def _settings(ctx: click.Context) -> Settings:
    """Load (once) the settings named by ``--config`` and the environment; configure logging."""
    obj = ctx.ensure_object(dict)
    if "settings" not in obj:
        try:
            obj["settings"] = load_settings(obj.get("config_file"))
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        log = obj["settings"].logging
        configure_logging(log.format, log.level)
    return obj["settings"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lumbar-node")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="LUMBAR_NODE_CONFIG",
    help="YAML file merged over conf/default.yaml (env: LUMBAR_NODE_CONFIG). "
    "Keys can also be set as LUMBAR_NODE__SECTION__KEY=value.",
)
@click.pass_context
def main(ctx: click.Context, config_file: Path | None) -> None:
    """AI DICOM node for lumbar spine MRI.

    Receives lumbar spine MRI studies from a PACS, grades spinal canal stenosis, neural
    foraminal narrowing and subarticular stenosis at L1/L2 to L5/S1, and returns a DICOM
    Structured Report and Grad-CAM images into the same study.

    Models trained on the synthetic phantom prove the pipeline; they are not clinical models.
    """
    ctx.ensure_object(dict)["config_file"] = config_file


@main.command("config")
@click.pass_context
def show_config(ctx: click.Context) -> None:
    """Validate the configuration and print the effective settings (defaults, file, environment)."""
    settings = _settings(ctx)
    click.echo(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False), nl=False)


@main.command()
@click.option("--studies", "n_studies", type=click.IntRange(min=1), default=10, show_default=True,
              help="Number of studies to make.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder; gets train.csv, train_label_coordinates.csv, "
              "train_series_descriptions.csv and train_images/.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed; the same seed gives the same studies.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes to render studies with.")
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a PNG montage of the first study, with labelled points and grades.")
def phantom(n_studies: int, out: Path, seed: int, workers: int, preview: Path | None) -> None:
    """Write synthetic lumbar spine MRI studies in the RSNA 2024 layout.

    Real DICOM (MR Image Storage): Sagittal T1, Sagittal T2/STIR and Axial T2 per study, with
    consistent patient geometry, RSNA-like grades visible in the pixels and the quirks of the real
    data (a missing series now and then, two axial series, InstanceNumber out of position order,
    a few missing labels). Synthetic data: no patient, not for clinical use.
    """
    from training.phantom import generate_dataset, make_study
    from training.phantom.preview import preview as write_preview

    configure_logging("auto", "INFO")
    log = get_logger("lumbar_node.phantom")
    started = time.perf_counter()
    done = 0

    def report(study: object) -> None:
        nonlocal done
        done += 1
        if sys.stderr.isatty():
            click.echo(f"\r{done}/{n_studies} studies", err=True, nl=done == n_studies)

    studies = generate_dataset(out, n_studies, seed, workers=workers, progress=report)
    elapsed = time.perf_counter() - started
    n_series = sum(len(st.series) for st in studies)
    n_images = sum(len(s.planes) for st in studies for s in st.series)
    log.info("phantom written", out=str(out), studies=n_studies, series=n_series, images=n_images,
             seed=seed, seconds=round(elapsed, 2), seconds_per_study=round(elapsed / n_studies, 3))
    if preview is not None:
        write_preview(make_study(seed, 0), preview)
        log.info("preview written", path=str(preview), study_id=studies[0].study_id)


@main.command("train")
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
    from training.train import TrainConfig, train

    cfg = TrainConfig(localiser_epochs=localiser_epochs, grader_epochs=grader_epochs, patience=patience,
                      seed=seed, device=device)
    if training_data:
        cfg.training_data = training_data
    train(data, run, cfg, log=lambda msg: click.echo(msg, err=True))


@main.command("evaluate")
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
    import json

    from training.evaluate import evaluate
    from training.runner import load_model

    torch_runner = load_model(run / "model.pt" if run.is_dir() else run)
    runner = torch_runner
    if onnx_dir is not None:
        from inference.runtime import OnnxRunner

        runner = OnnxRunner(onnx_dir)
    history_path = (run if run.is_dir() else run.parent) / "history.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    out = out or ((run if run.is_dir() else run.parent) / "evaluation")
    report = evaluate(runner, data, torch_runner.meta["class_prior"], out, history,  # type: ignore[attr-defined]
                      log=lambda msg: click.echo(msg, err=True))
    click.echo(json.dumps({k: report[k] for k in ("studies", "score", "class_prior_baseline", "score_over_baseline",
                                                   "severe_recall", "level_error_mm")}, indent=1))
    click.echo(f"written: {out / 'evaluation.json'}", err=True)


@main.command("export")
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Model folder to write (localiser.onnx, grader.onnx, model.json).")
@click.option("--fp16", is_flag=True, help="Also write fp16 models for GPUs (verified where CUDA is present).")
def export_command(run: Path, out: Path, fp16: bool) -> None:
    """Export a trained run to ONNX (opset 17, dynamic batch) with in-graph Grad-CAM, and verify it.

    Fails unless ONNX Runtime matches PyTorch (probabilities within 1e-4) and the in-graph
    Grad-CAM correlates >= 0.99 with an autograd Grad-CAM. Drop the folder into the node with
    models.dir in the configuration.
    """
    from export.onnx_export import ExportError, export_run

    try:
        meta = export_run(run, out, fp16=fp16, log=lambda msg: click.echo(msg, err=True))
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"exported {out} (checkpoint sha256 {meta['checkpoint_sha256'][:12]})")


@main.command("predict")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Exported model folder (default: the configured models.dir, else the bundled model).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write each study's DICOM SR and Grad-CAM Secondary Captures under OUT/<StudyInstanceUID>/.")
@click.pass_context
def predict_command(ctx: click.Context, folder: Path, model_dir: Path | None, as_json: bool, out: Path | None) -> None:
    """Grade the lumbar spine MRI studies in a folder of DICOM files and print the results.

    Synthetic-phantom models are not clinical models: results are not for diagnosis.
    """
    from dicom_node.predict import predict_folder

    settings = _settings(ctx)
    model_dir = model_dir or settings.models.dir
    try:
        predict_folder(folder, model_dir, tuple(settings.models.providers), as_json, click.echo, out)
    except Exception as exc:
        if isinstance(exc, click.ClickException):
            raise
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None


@main.command("serve")
@click.pass_context
def serve_command(ctx: click.Context) -> None:
    """Run the DICOM node until SIGTERM or Ctrl-C.

    Answers C-ECHO and C-STORE from the configured peers, spools each instance (fsync) and records
    it in the ledger before answering, releases a study after the quiet time (earlier when it is
    complete), grades it in worker processes, and sends the SR and Grad-CAM images to every
    destination, retrying with backoff. A restart resumes whatever was not finished.
    """
    import signal
    import threading
    from concurrent.futures.process import BrokenProcessPool

    from dicom_node.node import Node, run_until_signalled

    settings = _settings(ctx)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        run_until_signalled(Node(settings), stop)
    except (OSError, BrokenProcessPool) as exc:  # the port is taken, the spool unwritable, the model unloadable
        raise click.ClickException(f"cannot start the node: {type(exc).__name__}: {exc}") from None


@main.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("data/demo-node"),
              show_default=True, help="Folder for the phantom study, Orthanc's storage and the node's spool/results.")
@click.option("--seed", type=int, default=7, show_default=True, help="Phantom seed of the study sent.")
@click.pass_context
def demo_command(ctx: click.Context, workdir: Path, seed: int) -> None:
    """The whole loop on this machine: Orthanc as the PACS, the node, a phantom study.

    Starts a real Orthanc (Debian's package) that routes stable studies to the node, sends it a
    phantom lumbar spine MRI, waits until the node's SR and Grad-CAM images are back in the same
    study in Orthanc, and prints the graded table with the paths of the SR and SC.
    Phantom data and a phantom-trained model: not for diagnosis.
    """
    import shutil
    import signal

    from dicom_node.demo import run_demo

    _settings(ctx)  # validates the configuration and sets up logging
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the node and Orthanc on SIGTERM too
    shutil.rmtree(workdir, ignore_errors=True)
    try:
        run_demo(workdir, seed, click.echo, ctx.obj.get("config_file"))
    except (RuntimeError, TimeoutError, OSError) as exc:
        raise click.ClickException(f"demo failed: {exc}") from None


@main.command("reprocess")
@click.argument("study_uid")
@click.pass_context
def reprocess_command(ctx: click.Context, study_uid: str) -> None:
    """Grade a study the node holds again (after a failure, a skip or a new model).

    The running node picks it up at its next sweep; the new report supersedes the previous one.
    """
    from dicom_node.ledger import Ledger

    settings = _settings(ctx)
    ledger = Ledger(settings.storage.ledger_path)
    try:
        if not ledger.reopen(study_uid):
            raise click.ClickException(f"the ledger does not know study {study_uid}")
    finally:
        ledger.close()
    click.echo(f"study {study_uid} queued for grading")


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def status_command(ctx: click.Context, as_json: bool) -> None:
    """The studies the node knows, their states and reasons, from the ledger (storage.ledger_path)."""
    import json
    from datetime import datetime, timezone

    from dicom_node.ledger import Ledger

    settings = _settings(ctx)
    if not settings.storage.ledger_path.exists():
        raise click.ClickException(f"no ledger at {settings.storage.ledger_path}: the node has not received anything yet")
    ledger = Ledger(settings.storage.ledger_path)
    try:
        studies = ledger.studies()
    finally:
        ledger.close()
    if as_json:
        click.echo(json.dumps([s.__dict__ for s in studies], indent=1))
        return
    click.echo(f"{'study instance UID':64}  {'state':10} {'images':>6}  {'last received (UTC)':19}  reason")
    for s in studies:
        when = datetime.fromtimestamp(s.last_received, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{s.study_uid:64}  {s.state:10} {s.instances:>6}  {when}  {s.reason or ''}")


if __name__ == "__main__":  # pragma: no cover
    main()
