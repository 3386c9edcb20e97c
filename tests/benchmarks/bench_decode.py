"""Benchmark: decoding real-size studies, pydicom's own RLE decoder against the default plugins.

    .venv/bin/python tests/benchmarks/bench_decode.py [--data DIR] [--studies 2] [--repeats 3] [--seed 5]

Without --data, makes ``--studies`` Kaggle-style phantom studies at the RSNA 2024 set's sizes
(``lumbar-node phantom --style kaggle --matrix real``: RLE Lossless, sagittal up to 768 px) in a
temporary folder; with --data, uses the studies of an RSNA-layout folder (``train_images/<study>/``)
as they are. For each decoder choice (LUMBAR_NODE_DECODER=pydicom, the old path, and auto) it prints:

- decode alone: ``inference.volume.decode`` of every image already read into memory, the median
  over ``--repeats`` passes: ms per image and seconds per study;
- ``lumbar-node predict STUDY --json`` per study as a user runs it (a process each time: start,
  model load, read, decode, grade): the median wall time over ``--repeats`` runs, and what the
  command reports itself: the study's load (decode included) and its whole analysis.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

from inference.decoders import DECODER_ENV, DecoderChoice
from inference.rsna_layout import IMAGES_DIR
from inference.volume import decode

CHOICES = (DecoderChoice.PYDICOM, DecoderChoice.AUTO)
LUMBAR_NODE = Path(sys.executable).with_name("lumbar-node")


def _decode_pass(datasets: list[pydicom.Dataset]) -> float:
    t0 = time.perf_counter()
    for ds in datasets:
        decode(ds)
    return time.perf_counter() - t0


def _predict(study: Path, choice: DecoderChoice) -> tuple[float, float, float]:
    """(wall seconds, the study's load seconds, its analysis seconds in all) of one ``predict`` run."""
    env = {**os.environ, DECODER_ENV: choice.value}
    t0 = time.perf_counter()
    out = subprocess.run([str(LUMBAR_NODE), "predict", str(study), "--json"], env=env, capture_output=True,
                         text=True, check=True, timeout=900)
    wall = time.perf_counter() - t0
    [result] = json.loads(out.stdout)
    seconds = result["seconds"]  # load (read pixels, decode, volumes), localise, grade
    return wall, float(seconds["load"]), float(sum(seconds.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help="RSNA-layout folder (default: make real-size phantom studies)")
    parser.add_argument("--studies", type=int, default=2, help="studies to make or to take from --data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp)
            subprocess.run([str(LUMBAR_NODE), "phantom", "--style", "kaggle", "--matrix", "real", "--studies",
                            str(args.studies), "--seed", str(args.seed), "--out", str(data)],
                           check=True, capture_output=True, timeout=3600)
        studies = sorted(p for p in (data / IMAGES_DIR).iterdir() if p.is_dir())[: args.studies]
        source = "phantom --matrix real" if args.data is None else data
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"Python {platform.python_version()}, pydicom {pydicom.__version__}; "
              f"{len(studies)} studies from {source}")
        for study in studies:
            files = sorted(study.rglob("*.dcm"))
            t0 = time.perf_counter()
            datasets = [pydicom.dcmread(f) for f in files]
            read_s = time.perf_counter() - t0
            sizes = sorted({(ds.Rows, ds.Columns) for ds in datasets})
            syntaxes = sorted({ds.file_meta.TransferSyntaxUID.name for ds in datasets})
            megapixels = sum(ds.Rows * ds.Columns for ds in datasets) / 1e6
            print(f"\nstudy {study.name}: {len(files)} images, {megapixels:.1f} Mpixel, sizes {sizes}, "
                  f"{syntaxes}; read (dcmread) {read_s:.2f} s")
            decode_s: dict[DecoderChoice, list[float]] = {c: [] for c in CHOICES}
            predict: dict[DecoderChoice, list[tuple[float, float, float]]] = {c: [] for c in CHOICES}
            for k in range(args.repeats):
                for choice in CHOICES if k % 2 == 0 else CHOICES[::-1]:  # alternate who goes first
                    os.environ[DECODER_ENV] = choice.value
                    decode_s[choice].append(_decode_pass(datasets))
                    predict[choice].append(_predict(study, choice))
            os.environ.pop(DECODER_ENV, None)
            for choice in CHOICES:
                d = statistics.median(decode_s[choice])
                wall, load, analysis = (statistics.median(run[i] for run in predict[choice]) for i in range(3))
                print(f"  {DECODER_ENV}={choice.value:8s} decode {1000 * d / len(files):6.2f} ms/image, "
                      f"{d:5.2f} s/study; "
                      f"predict {wall:5.2f} s wall (study load {load:5.2f} s, analysis {analysis:5.2f} s), "
                      f"median of {args.repeats}")
            old, new = (statistics.median(decode_s[c]) for c in CHOICES)
            old_p, new_p = (statistics.median(run[0] for run in predict[c]) for c in CHOICES)
            print(f"  decode {old / new:.1f}x faster, predict {old_p / new_p:.2f}x faster with auto")


if __name__ == "__main__":
    main()
