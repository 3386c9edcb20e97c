"""Per preset: parameter counts, grader training throughput (samples/s over a few steps on random
crops of the preset's shapes, the competition loss), and ONNX Runtime grading time of one phantom
study (random weights: the time, not the skill). Prints numbers; asserts nothing.

    .venv/bin/python tests/benchmarks/bench_presets.py [--preset competition] [--steps 3] [--batch 16]
        [--device cpu] [--matrix real] [--threads N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import torch

from export.onnx_export import export_run
from inference.analyze import analyze_study
from inference.labels import CONDITIONS, ConditionGroup
from inference.model import ModelMetadata
from inference.runtime import OnnxRunner
from training.models import grader_logits
from training.presets import PRESETS, Preset
from training.runner import MODEL_NAME, save_model
from training.train import grader_loss

SCORES = {k: dict.fromkeys(("total", "spinal", "foraminal", "subarticular", "any_severe_spinal"), float("nan"))
          for k in ("score", "class_prior_score")}


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train_throughput(preset: Preset, steps: int, batch: int, device: torch.device) -> float:
    """Grader samples per second over ``steps`` optimiser steps (after one warm-up step); a batch
    mixes the groups as a study does (1 spinal : 2 foraminal : 2 subarticular)."""
    config = PRESETS[preset]
    _, grader = config.networks.build()
    grader.to(device).train()
    opt = torch.optim.AdamW(grader.parameters(), lr=1e-3)
    conditions = torch.tensor([i % len(CONDITIONS) for i in range(batch)])
    groups = [CONDITIONS[int(c)].group for c in conditions]
    shapes: dict[tuple[int, int, int], list[int]] = {}
    for j, g in enumerate(groups):
        spec = config.spec.grader(g)
        shapes.setdefault((spec.n_slices, spec.pixels, spec.pixels), []).append(j)
    order = [j for js in shapes.values() for j in js]
    crops = [torch.rand(len(js), *shape, device=device) for shape, js in shapes.items()]
    targets = torch.randint(0, 3, (batch,))[order].to(device)
    cond = conditions[order].to(device)
    studies = (torch.arange(batch) // 5)[order].to(device)
    seconds = 0.0
    for step in range(steps + 1):
        t0 = time.perf_counter()
        loss = grader_loss(grader_logits(grader, crops), targets, cond, studies)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            seconds += time.perf_counter() - t0
    return steps * batch / seconds


def onnx_study_seconds(preset: Preset, matrix: str, work: Path) -> tuple[float, int, dict[str, float]]:
    """Export the preset (random weights) and grade one phantom study with ONNX Runtime (levels not
    checked); (seconds of the second run, labels graded, the pipeline's own step times)."""
    config = PRESETS[preset]
    torch.manual_seed(0)
    localiser, grader = config.networks.build()
    meta = ModelMetadata(MODEL_NAME, "bench", "random weights (benchmark)", dict.fromkeys(ConditionGroup,
                         (0.0, 0.0, 0.0)), preprocessing=config.spec.to_preprocessing(), preset=preset.value,
                         networks=config.networks.to_json(), validation={"studies": 0, "median_level_error_mm": None,
                                                                          **SCORES})
    save_model(work / "run" / "model.pt", localiser, grader, meta)
    export_run(work / "run", work / "model")
    data = work / "data"
    subprocess.run([str(Path(sys.executable).parent / "lumbar-node"), "phantom", "--studies", "1", "--seed", "5",
                    "--matrix", matrix, "--out", str(data)], check=True, capture_output=True)
    study = next((data / "train_images").iterdir())
    instances = [(pydicom.dcmread(p, stop_before_pixels=True), p) for p in sorted(study.rglob("*.dcm"))]
    runner = OnnxRunner(work / "model")
    analyze_study(instances, runner, check_levels=False)  # warm-up: sessions, first-run allocations
    t0 = time.perf_counter()
    result = analyze_study(instances, runner, check_levels=False)
    return time.perf_counter() - t0, len(result.assessed()), {k: round(v, 2) for k, v in result.seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=[p.value for p in Preset], action="append")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--matrix", choices=["small", "real"], default="real")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for preset in [Preset(p) for p in (args.preset or [p.value for p in Preset])]:
        config = PRESETS[preset]
        localiser, grader = config.networks.build()
        print(f"[{preset.value}] parameters: grader {_params(grader):,}, localiser {_params(localiser):,}; "
              f"crops {config.spec.describe()}")
        rate = train_throughput(preset, args.steps, args.batch, device)
        print(f"[{preset.value}] grader training on {device} ({torch.get_num_threads()} threads): {rate:.1f} samples/s "
              f"(batch {args.batch}, {args.steps} steps)")
        if not args.no_onnx:
            with tempfile.TemporaryDirectory() as tmp:
                seconds, graded, steps = onnx_study_seconds(preset, args.matrix, Path(tmp))
            print(f"[{preset.value}] ONNX Runtime (CPU), one {args.matrix}-size phantom study: {seconds:.2f} s, "
                  f"{graded} labels graded; steps {steps}")


if __name__ == "__main__":
    main()
