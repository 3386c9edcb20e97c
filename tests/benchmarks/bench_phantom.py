"""Benchmark: phantom generation speed (run on demand, not by pytest).

    .venv/bin/python tests/benchmarks/bench_phantom.py [--studies 10] [--seed 0] [--style default|kaggle]
        [--matrix small|real] [--rle-encoder pylibjpeg|pydicom]

Prints seconds per study for drawing + rendering in memory and for writing the DICOM files, on one
core, and the wall time of `generate_dataset` with 1 and 2 worker processes. ``--rle-encoder``
(Kaggle style) picks pydicom's RLE encoder: pylibjpeg-rle (the default when installed) or
pydicom's own, to compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from phantom import MatrixSize, PhantomStyle, generate_dataset, make_study, write_study
from phantom import dicom as phantom_dicom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", choices=[s.value for s in PhantomStyle], default=PhantomStyle.DEFAULT.value)
    parser.add_argument("--matrix", choices=[m.value for m in MatrixSize], default=MatrixSize.SMALL.value)
    parser.add_argument("--rle-encoder", choices=["pylibjpeg", "pydicom"], default=None)
    args = parser.parse_args()
    style, matrix = PhantomStyle(args.style), MatrixSize(args.matrix)
    if args.rle_encoder is not None:  # this process only: the worker processes keep the default
        phantom_dicom.rle_encoding_plugin = lambda: args.rle_encoder
    make_study(args.seed, 0, matrix=matrix)  # warm up imports and caches
    render, write, images = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.studies):
            t0 = time.perf_counter()
            study = make_study(args.seed, i, matrix=matrix)
            t1 = time.perf_counter()
            write_study(study, Path(tmp), style)
            t2 = time.perf_counter()
            render.append(t1 - t0)
            write.append(t2 - t1)
            images += sum(len(s.planes) for s in study.series)
    print(f"machine: {os.cpu_count()} CPUs; {args.studies} studies, style {style}, matrix {matrix}, "
          f"RLE encoder {phantom_dicom.rle_encoding_plugin() if style is PhantomStyle.KAGGLE else '-'}; "
          f"{images / args.studies:.0f} images per study")
    print(f"draw + render per study: median {statistics.median(render):.3f} s, max {max(render):.3f} s")
    print(f"write DICOM per study:   median {statistics.median(write):.3f} s")
    total = [a + b for a, b in zip(render, write, strict=True)]
    print(f"total per study (1 core): median {statistics.median(total):.3f} s")
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            generate_dataset(Path(tmp), args.studies, args.seed, workers=workers, style=style, matrix=matrix)
            wall = time.perf_counter() - t0
        print(f"generate_dataset, {workers} worker(s): {wall:.2f} s wall, {wall / args.studies:.3f} s per study")


if __name__ == "__main__":
    main()
