"""Benchmark: phantom generation speed (run on demand, not by pytest).

    .venv/bin/python tests/benchmarks/bench_phantom.py [--studies 10] [--seed 0]

Prints seconds per study for drawing + rendering in memory and for writing the DICOM files, on one
core, and the wall time of `generate_dataset` with 1 and 2 worker processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from phantom import generate_dataset, make_study, write_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_study(args.seed, 0)  # warm up imports and caches
    render, write, images = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.studies):
            t0 = time.perf_counter()
            study = make_study(args.seed, i)
            t1 = time.perf_counter()
            write_study(study, Path(tmp))
            t2 = time.perf_counter()
            render.append(t1 - t0)
            write.append(t2 - t1)
            images += sum(len(s.planes) for s in study.series)
    print(f"machine: {os.cpu_count()} CPUs; {args.studies} studies, {images / args.studies:.0f} images per study")
    print(f"draw + render per study: median {statistics.median(render):.3f} s, max {max(render):.3f} s")
    print(f"write DICOM per study:   median {statistics.median(write):.3f} s")
    total = [a + b for a, b in zip(render, write, strict=True)]
    print(f"total per study (1 core): median {statistics.median(total):.3f} s")
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            generate_dataset(Path(tmp), args.studies, args.seed, workers=workers)
            wall = time.perf_counter() - t0
        print(f"generate_dataset, {workers} worker(s): {wall:.2f} s wall, {wall / args.studies:.3f} s per study")


if __name__ == "__main__":
    main()
