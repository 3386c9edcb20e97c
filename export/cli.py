"""``lumbar-node export``: the export's command, joined to ``lumbar-node`` by the entry-point
group ``lumbar_node.commands`` (see pyproject.toml). Importing it imports no torch."""

from __future__ import annotations

from pathlib import Path

import click

from training.cli import require_torch


@click.command("export")
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
    require_torch()
    from export.onnx_export import ExportError, export_run

    try:
        meta = export_run(run, out, fp16=fp16)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"exported {out} (checkpoint sha256 {(meta.checkpoint_sha256 or '')[:12]})")
