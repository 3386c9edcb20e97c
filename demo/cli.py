"""The ``demo`` command of ``lumbar-node`` (joined through the ``lumbar_node.commands`` entry points)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
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

    from demo.run import run_demo
    from dicom_node.cli import settings_of  # here: dicom_node.cli loads this module while it loads

    settings_of(ctx)  # validates the configuration and sets up logging
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the node and Orthanc on SIGTERM too
    shutil.rmtree(workdir, ignore_errors=True)
    try:
        run_demo(workdir, seed, click.echo, ctx.obj.get("config_file"))
    except (RuntimeError, TimeoutError, OSError) as exc:
        raise click.ClickException(f"demo failed: {exc}") from None
