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


if __name__ == "__main__":  # pragma: no cover
    main()
