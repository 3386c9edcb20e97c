"""Phantom studies in the RSNA 2024 Kaggle layout.

    train.csv                       study_id + the 25 label columns
    train_label_coordinates.csv     study_id,series_id,instance_number,condition,level,x,y
    train_series_descriptions.csv   study_id,series_id,series_description
    train_images/<study_id>/<series_id>/<instance_number>.dcm

Each study is drawn from ``numpy.random.default_rng([seed, index])``: the same seed gives the same
files, and study ``i`` does not depend on how many studies are made. The real set's image sizes
(``MatrixSize.REAL``) are drawn from a stream of their own, ``[seed, index, 2]``: a study has the
same anatomy, series, grades and labels at either size.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray
from pydicom import dcmwrite
from pydicom.dataset import Dataset

from inference.geometry import nearest_plane
from inference.labels import LABEL_COLUMNS, LABELS, Label, SeriesRole, Severity
from inference.rsna_layout import (
    COORDINATE_COLUMNS,
    COORDINATES_CSV,
    IMAGES_DIR,
    SERIES_COLUMNS,
    SERIES_CSV,
    TRAIN_CSV,
    Coordinate,
)
from phantom.acquisition import (
    MatrixSize,
    SeriesSpec,
    axial_series,
    render_series,
    sagittal_series,
)
from phantom.anatomy import Anatomy, sample_anatomy
from phantom.dicom import PhantomStyle, StudyInfo, phantom_dataset, study_info

# How often the real data's quirks occur.
P_MISSING_SERIES = {SeriesRole.AX_T2: 0.03, SeriesRole.SAG_T1: 0.02, SeriesRole.SAG_T2: 0.02}
P_TWO_AXIAL_SERIES = 0.08
P_CONTINUOUS_AXIAL = 0.35
P_MISSING_LABEL = 0.01


@dataclass
class PhantomStudy:
    """A generated study: its truth, its series with pixels, its labels and label coordinates."""

    info: StudyInfo
    anatomy: Anatomy
    series: list[SeriesSpec]
    pixels: dict[int, list[NDArray[np.uint16]]]  # series_id -> images in plane order
    labels: dict[Label, Severity | None]
    coordinates: list[Coordinate] = field(default_factory=list)

    @property
    def study_id(self) -> int:
        return self.info.study_id

    def datasets(self, style: PhantomStyle = PhantomStyle.DEFAULT) -> Iterable[tuple[SeriesSpec, Dataset]]:
        """Every instance as a pydicom Dataset, series by series, encoded in ``style``."""
        for spec in self.series:
            for i, pixels in enumerate(self.pixels[spec.series_id]):
                yield spec, phantom_dataset(style, self.info, spec, i, pixels)


def make_study(seed: int, index: int, render: bool = True, matrix: MatrixSize = MatrixSize.SMALL) -> PhantomStudy:
    """Draw and render study number ``index`` of the set made with ``seed``, its images of the
    ``matrix`` sizes. With ``render`` False, everything but the pixels (geometry, labels,
    coordinates), much faster."""
    rng = np.random.default_rng([seed, index])
    real = np.random.default_rng([seed, index, 2]) if matrix is MatrixSize.REAL else None
    study_id = int(rng.integers(10**6, 4 * 10**9))
    info = study_info(study_id, seed, rng)
    anat = sample_anatomy(rng)
    field_strength = float(rng.choice([1.5, 3.0]))

    missing = None
    for role, p in P_MISSING_SERIES.items():
        if rng.random() < p:
            missing = role
            break
    series: list[SeriesSpec] = []
    number = 1
    for role in (SeriesRole.SAG_T1, SeriesRole.SAG_T2):
        spec = sagittal_series(anat, rng, role, number, field_strength, real)
        number += 1
        if role is not missing:
            series.append(spec)
    axial = axial_series(anat, rng, number, field_strength, continuous=rng.random() < P_CONTINUOUS_AXIAL, real=real)
    if missing is not SeriesRole.AX_T2:
        if rng.random() < P_TWO_AXIAL_SERIES:
            series += _split_axial(axial, rng)
        else:
            series.append(axial)
    used: set[int] = set()
    for spec in series:
        spec.series_id = int(rng.integers(10**8, 4 * 10**9))
        while spec.series_id in used:
            spec.series_id += 1
        used.add(spec.series_id)

    labels: dict[Label, Severity | None] = {
        label: (None if rng.random() < P_MISSING_LABEL else anat.grades[label]) for label in LABELS
    }
    pixels = {}
    if render:  # noise has its own stream, so that skipping pixels changes nothing else
        noise_rng = np.random.default_rng([seed, index, 1])
        pixels = {spec.series_id: render_series(anat, spec, noise_rng) for spec in series}
    study = PhantomStudy(info, anat, series, pixels, labels)
    study.coordinates = label_coordinates(study)
    return study


def _split_axial(spec: SeriesSpec, rng: np.random.Generator) -> list[SeriesSpec]:
    """Two Axial T2 series, upper and lower lumbar spine, overlapping by a slice or two."""
    n = len(spec.planes)
    cut = n // 2 + int(rng.integers(-1, 2))
    overlap = int(rng.integers(0, 3))
    parts = [spec.planes[: cut + overlap], spec.planes[cut:]]
    out = []
    for k, planes in enumerate(parts):
        part = SeriesSpec(spec.role, spec.contrast, planes, spec.thickness, spec.spacing,
                          spec.series_number + k, gain=spec.gain * rng.uniform(0.9, 1.1),
                          noise=spec.noise, bias=spec.bias, field_strength=spec.field_strength)
        part.instance_numbers = list(range(1, len(planes) + 1))
        out.append(part)
    return out


def label_coordinates(study: PhantomStudy) -> list[Coordinate]:
    """Where a reader marks each labelled finding: canal on Sagittal T2/STIR, foramina on
    Sagittal T1, subarticular zones on the Axial T2 slice nearest the disc (any axial series)."""
    rows = []
    for label in LABELS:
        if study.labels[label] is None:
            continue
        role = label.condition.series_role
        candidates = [(spec, i) for spec in study.series if spec.role is role for i in range(len(spec.planes))]
        if not candidates:
            continue
        point = study.anatomy.label_point(label)
        # Axial readers pick the slice through the disc, then mark the zone on it.
        anchor = study.anatomy.canal_point(label.level) if role is SeriesRole.AX_T2 else point
        try:
            best, _ = nearest_plane([spec.planes[i] for spec, i in candidates], anchor)
        except ValueError:
            continue  # the point lies outside every image of the series: no reader could mark it
        spec, i = candidates[best]
        x, y, _ = spec.planes[i].to_pixel(point)
        rows.append(Coordinate(label, spec.series_id, spec.instance_numbers[i], float(x), float(y)))
    return rows


def write_study(study: PhantomStudy, root: Path, style: PhantomStyle = PhantomStyle.DEFAULT) -> None:
    """Write the DICOM files of one study under ``root/train_images``, encoded in ``style``.
    Kaggle-style files are written with their file meta as it is (no group length, as the real
    files have none)."""
    for spec, ds in study.datasets(style):
        folder = root / IMAGES_DIR / str(study.study_id) / str(spec.series_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{ds.InstanceNumber}.dcm"
        if style is PhantomStyle.KAGGLE:
            dcmwrite(path, ds, enforce_file_format=False)
        else:
            ds.save_as(path, enforce_file_format=True)


def write_csvs(studies: list[PhantomStudy], root: Path) -> None:
    """Write the three RSNA CSV files for these studies."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / TRAIN_CSV, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_id", *LABEL_COLUMNS])
        for st in studies:
            w.writerow([st.study_id, *(_grade_text(st.labels[label]) for label in LABELS)])
    with open(root / COORDINATES_CSV, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COORDINATE_COLUMNS)
        for st in studies:
            for c in st.coordinates:
                w.writerow([st.study_id, c.series_id, c.instance_number, c.label.condition.display,
                            c.label.level.value, f"{c.x:.3f}", f"{c.y:.3f}"])
    with open(root / SERIES_CSV, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SERIES_COLUMNS)
        for st in studies:
            for spec in st.series:
                w.writerow([st.study_id, spec.series_id, spec.description])


def _grade_text(grade: Severity | None) -> str:
    return "" if grade is None else grade.display


def _single_threaded() -> None:
    """One thread per worker process: the processes are the parallelism."""
    cv2.setNumThreads(1)


# Read by OpenBLAS and OpenMP when numpy loads, so set for the worker processes as they start. Two
# BLAS threads per worker on a busy 2-core machine made one (N, 3) x (3, 3) product 50 times slower.
_ONE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextmanager
def _one_thread_children() -> Iterator[None]:
    """Processes started inside start with one BLAS and OpenMP thread; this process is unchanged."""
    saved = {key: os.environ.get(key) for key in _ONE_THREAD_ENV}
    os.environ.update(_ONE_THREAD_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _make_and_write(args: tuple[int, int, Path, PhantomStyle, MatrixSize]) -> PhantomStudy:
    seed, index, out, style, matrix = args
    study = make_study(seed, index, matrix=matrix)
    write_study(study, out, style)
    study.pixels = {}  # keep memory flat: the files hold the pixels now
    return study


def generate_dataset(out: Path, n_studies: int, seed: int, workers: int = 1,
                     progress: Callable[[PhantomStudy], None] | None = None,
                     style: PhantomStyle = PhantomStyle.DEFAULT,
                     matrix: MatrixSize = MatrixSize.SMALL) -> list[PhantomStudy]:
    """Make ``n_studies`` phantom studies in the RSNA layout under ``out``, on ``workers``
    processes (worker processes of one thread each, one at least, from two studies on), their files
    encoded in ``style``, their images of the ``matrix`` sizes; returns them without their pixels.
    The files do not depend on ``workers``; the style changes the encoding only (same anatomy,
    pixels, CSVs)."""
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, index, out, style, matrix) for index in range(n_studies)]
    studies: list[PhantomStudy] = []
    if n_studies > 1:  # worker processes (one at least), each single-threaded
        with _one_thread_children():
            pool = multiprocessing.get_context("spawn").Pool(min(workers, n_studies), initializer=_single_threaded)
        with pool:
            for study in pool.imap(_make_and_write, jobs):
                studies.append(study)
                if progress:
                    progress(study)
    else:
        for job in jobs:
            studies.append(_make_and_write(job))
            if progress:
                progress(studies[-1])
    ids = [st.study_id for st in studies]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"study_id collision with seed {seed}: choose another seed")
    write_csvs(studies, out)
    return studies
