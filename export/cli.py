"""``lumbar-node export``: the export's command, joined to ``lumbar-node`` by the entry-point
group ``lumbar_node.commands`` (see pyproject.toml). Importing it imports no torch."""

from __future__ import annotations

from pathlib import Path

import click

from training.cli import require_torch


@click.command("export")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Model folder to write (localiser.onnx, grader.onnx, model.json).")
@click.option("--fp16", is_flag=True, help="Also write fp16 models for GPUs (verified where CUDA is present).")
@click.option("--ensemble", is_flag=True,
              help="Export the RUNs given (trained apart; each may be a folds run) as one ensemble model.")
@click.option("--tta", is_flag=True,
              help="Flip test-time augmentation in the graph: spinal canal crops averaged with their left-right "
                   "mirror (sided crops are not mirrored: their mirror is the other side). Exports as an ensemble "
                   "(of one member for a plain run).")
def export_command(runs: tuple[Path, ...], out: Path, fp16: bool, ensemble: bool, tta: bool) -> None:
    """Export a trained run to ONNX (opset 17, dynamic batch) with in-graph Grad-CAM, and verify it.

    Fails unless ONNX Runtime matches PyTorch (probabilities within 1e-4) and the in-graph
    Grad-CAM correlates >= 0.99 with an autograd Grad-CAM. Drop the folder into the node with
    models.dir in the configuration.

    A folds run (`train --folds K`: RUN/fold-0 ...) exports as an ensemble of its folds;
    `export --ensemble RUN_A RUN_B ... --out MODEL` exports runs trained apart as one ensemble:
    mean heatmap, mean probabilities calibrated after averaging, mean Grad-CAM, members listed
    in model.json.
    """
    require_torch()
    from export.onnx_export import ExportError, export_run
    from training.report import fold_folders

    folds_run = len(runs) == 1 and runs[0].is_dir() and bool(fold_folders(runs[0]))
    if len(runs) > 1 and not ensemble:
        raise click.UsageError("several RUNs are exported together only with --ensemble")
    try:
        if ensemble or folds_run or tta:
            if fp16:
                raise click.UsageError("--fp16 is not offered for ensembles yet (export the fp32 ensemble)")
            from export.ensemble import export_ensemble

            meta = export_ensemble(list(runs), out, tta)
            click.echo(f"exported {out}: an ensemble of {len(meta.members or ())} members "
                       f"(temperatures fitted on {meta.validation.get('studies')} out-of-fold studies)")
            return
        meta = export_run(runs[0], out, fp16=fp16)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"exported {out} (checkpoint sha256 {(meta.checkpoint_sha256 or '')[:12]})")
