"""``lumbar-node phantom``: the phantom's command, joined to ``lumbar-node`` by the entry-point
group ``lumbar_node.commands`` (see pyproject.toml)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import structlog

from phantom.acquisition import MatrixSize
from phantom.dicom import PhantomStyle

log = structlog.stdlib.get_logger("lumbar_node.phantom")


@click.command("phantom")
@click.option("--studies", "n_studies", type=click.IntRange(min=1), default=10, show_default=True,
              help="Number of studies to make.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder; gets train.csv, train_label_coordinates.csv, "
              "train_series_descriptions.csv and train_images/.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed; the same seed gives the same studies.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes to render studies with.")
@click.option("--style", type=click.Choice([s.value for s in PhantomStyle]), default=PhantomStyle.DEFAULT.value,
              show_default=True, help="File encoding: the project's tidy MR Image Storage (default), or as the "
              "RSNA 2024 Kaggle files are encoded (kaggle: no SOP class in the data set, Enhanced MR in the "
              "file meta, no Modality or patient name, the same SOP Instance UIDs in every series, RLE Lossless).")
@click.option("--matrix", type=click.Choice([m.value for m in MatrixSize]), default=MatrixSize.SMALL.value,
              show_default=True, help="Image sizes: small (sagittal 256-384 px, axial 224-320 px, about 0.5-1.25 mm; "
              "quick to make and train on) or real, as the RSNA 2024 files (sagittal 384-768 px and 15-20 slices, "
              "axial 256-320 px and 40-60 slices, 0.4-0.7 mm). The same seed gives the same anatomy, series, "
              "grades and labels at either size.")
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a PNG montage of the first study, with labelled points and grades.")
def phantom_command(n_studies: int, out: Path, seed: int, workers: int, style: str, matrix: str,
                    preview: Path | None) -> None:
    """Write synthetic lumbar spine MRI studies in the RSNA 2024 layout.

    Real DICOM (MR Image Storage): Sagittal T1, Sagittal T2/STIR and Axial T2 per study, with
    consistent patient geometry, RSNA-like grades visible in the pixels and the quirks of the real
    data (a missing series now and then, two axial series, InstanceNumber out of position order,
    a few missing labels). Synthetic data: no patient, not for clinical use.
    """
    from phantom.generate import generate_dataset, make_study
    from phantom.preview import preview as write_preview

    started = time.perf_counter()
    done = 0

    def report(study: object) -> None:
        nonlocal done
        done += 1
        if sys.stderr.isatty():
            click.echo(f"\r{done}/{n_studies} studies", err=True, nl=done == n_studies)

    studies = generate_dataset(out, n_studies, seed, workers=workers, progress=report, style=PhantomStyle(style),
                               matrix=MatrixSize(matrix))
    elapsed = time.perf_counter() - started
    n_series = sum(len(st.series) for st in studies)
    n_images = sum(len(s.planes) for st in studies for s in st.series)
    log.info("phantom written", out=str(out), studies=n_studies, series=n_series, images=n_images,
             seed=seed, style=style, matrix=matrix, seconds=round(elapsed, 2),
             seconds_per_study=round(elapsed / n_studies, 3))
    if preview is not None:
        write_preview(make_study(seed, 0, matrix=MatrixSize(matrix)), preview)
        log.info("preview written", path=str(preview), study_id=studies[0].study_id)
