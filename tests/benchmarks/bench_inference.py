"""Benchmark: per-study inference time, ONNX Runtime against PyTorch eager, same inputs, same run.

    .venv/bin/python tests/benchmarks/bench_inference.py --run runs/default [--model DIR] [--studies 5] \
        [--device cpu|cuda]

Times the whole ``analyze_study`` (headers in memory, pixels decoded inside) and the two networks
alone (localiser batch 1, grader batch 25), as medians over repeats. With --device cuda, ONNX
Runtime uses the CUDA execution provider and PyTorch the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import torch

from inference.analyze import analyze_study
from inference.runtime import OnnxRunner
from phantom import generate_dataset
from training.runner import load_model


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="training run folder with model.pt")
    parser.add_argument("--model", type=Path, default=None, help="ONNX model folder (default: bundled)")
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    cpu = ("CPUExecutionProvider",)
    providers = ("CUDAExecutionProvider", *cpu) if args.device == "cuda" else cpu
    onnx_runner = OnnxRunner(args.model, providers)
    torch_runner = load_model(args.run / "model.pt", torch.device(args.device))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"ONNX Runtime providers {onnx_runner.providers}")
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(Path(tmp), args.studies, seed=9090)
        studies = []
        for folder in sorted((Path(tmp) / "train_images").iterdir()):
            studies.append([(pydicom.dcmread(f), f) for f in sorted(folder.rglob("*.dcm"))])
    rows = {"onnxruntime": [], "torch eager": []}
    for k, instances in enumerate(studies):
        pair = [("onnxruntime", onnx_runner), ("torch eager", torch_runner)]
        for name, runner in pair if k % 2 == 0 else pair[::-1]:  # alternate who goes first
            rows[name].append(_median_time(lambda r=runner, i=instances: analyze_study(i, r), args.repeats))
    for name, times in rows.items():
        print(f"whole study ({name:11}): median {statistics.median(times) * 1000:7.1f} ms over {len(times)} studies")

    rng = np.random.default_rng(0)
    images = rng.random((1, 3, 128, 128), dtype=np.float32)
    crops = rng.random((25, 3, 48, 48), dtype=np.float32)
    conditions = np.arange(25, dtype=np.int64) % 5
    for name, runner in (("onnxruntime", onnx_runner), ("torch eager", torch_runner)):
        loc = _median_time(lambda r=runner: r.localise(images), args.repeats * 4)
        grade = _median_time(lambda r=runner: r.grade(crops, conditions), args.repeats * 4)
        print(f"networks    ({name:11}): localiser {loc * 1000:6.2f} ms, grader x25 {grade * 1000:6.2f} ms")


if __name__ == "__main__":
    main()
