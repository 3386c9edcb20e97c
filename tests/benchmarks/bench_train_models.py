"""Benchmark of the model presets (issue 20): per preset, parameter counts; training throughput of
the grader and the localiser through the real training step (``training.precision.Stepper``: the
precision, channels-last on CUDA) on random batches of the preset's shapes, with the projected epoch
time on the RSNA 2024 set's size; ONNX Runtime grading time of one phantom study for one model and
for an ensemble of ``--ensemble`` members (random weights: the time, not the skill). Prints numbers;
asserts nothing.

    .venv/bin/python tests/benchmarks/bench_train_models.py [--preset small --preset competition]
        [--device cpu|cuda] [--precision fp32 --precision bf16] [--steps 3] [--batch-studies 2]
        [--matrix real|small] [--ensemble 5] [--threads N] [--no-onnx] [--json FILE]

On a GPU: ``--device cuda --precision bf16 --precision fp32`` (ONNX Runtime then uses the CUDA
execution provider, with the CPU one as fallback).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom
import torch

from export.ensemble import EnsembleGrader, EnsembleLocaliser
from export.onnx_export import _export, _grader_axes, export_run, shape_samples
from inference.analyze import analyze_study
from inference.labels import CONDITIONS, ConditionGroup
from inference.model import ModelMetadata
from inference.runtime import OnnxRunner
from training.precision import Stepper
from training.presets import PRESETS, Preset
from training.runner import MODEL_NAME, save_model
from training.train import _localiser_loss, grader_loss

# The RSNA 2024 training set, for the projections: studies, the share trained on (one fold of 5 or the
# default 0.2 validation), grader windows per study (25 labels, about 24 marked) and localiser images per
# study (two sagittal series, each at the served centre and shifted: training.data.study_samples).
RSNA_STUDIES = 1975
TRAIN_SHARE = 0.8
WINDOWS_PER_STUDY = 24
LOCALISER_IMAGES_PER_STUDY = 4
SCORES = {k: dict.fromkeys(("total", "spinal", "foraminal", "subarticular", "any_severe_spinal"), float("nan"))
          for k in ("score", "class_prior_score")}


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed_steps(step: Stepper, steps: int, run_one: Any, device: torch.device) -> float:
    """Seconds of ``steps`` training steps after one warm-up step."""
    seconds = 0.0
    for i in range(steps + 1):
        t0 = time.perf_counter()
        step.begin_epoch(1)
        with step.forward():
            loss = run_one()
        step.backward(loss)
        step.end_epoch()
        _sync(device)
        if i:
            seconds += time.perf_counter() - t0
    return seconds


def _stepper(net: torch.nn.Module, precision: str, device: torch.device) -> Stepper:
    """``net`` in training mode on ``device`` with AdamW, behind the training step helper."""
    net.to(device).train()
    return Stepper(net, torch.optim.AdamW(net.parameters(), lr=1e-4), device, precision)


def grader_rate(preset: Preset, precision: str, steps: int, studies: int, device: torch.device) -> float:
    """Grader samples/s: batches of ``studies`` studies' windows (WINDOWS_PER_STUDY each, the groups mixed
    as a study has them), the competition loss, one optimiser step per batch."""
    config = PRESETS[preset]
    torch.manual_seed(0)
    step = _stepper(config.networks.build()[1], precision, device)
    batch = studies * WINDOWS_PER_STUDY
    conditions = torch.tensor([i % len(CONDITIONS) for i in range(batch)])
    shapes: dict[tuple[int, int, int], list[int]] = {}
    for j, c in enumerate(conditions.tolist()):
        spec = config.spec.grader(CONDITIONS[c].group)
        shapes.setdefault((spec.n_slices, spec.pixels, spec.pixels), []).append(j)
    order = [j for js in shapes.values() for j in js]
    crops = [torch.rand(len(js), *shape) for shape, js in shapes.items()]
    targets = torch.randint(0, 3, (batch,))[order].to(device)
    cond, study = conditions[order].to(device), (torch.arange(batch) // WINDOWS_PER_STUDY)[order].to(device)
    seconds = _timed_steps(step, steps, lambda: grader_loss(step.net(*[step.input(x) for x in crops]), targets,
                                                            cond, study), device)
    return steps * batch / seconds


def grader_flops(preset: Preset) -> float:
    """Floating-point operations of one grader training sample (forward and backward), counted by
    ``torch.utils.flop_counter`` on one study's mix of crop shapes, per sample."""
    from torch.utils.flop_counter import FlopCounterMode

    config = PRESETS[preset]
    _, grader = config.networks.build()
    crops = []
    for c in CONDITIONS:
        spec = config.spec.grader(c.group)
        crops.append(torch.rand(1, spec.n_slices, spec.pixels, spec.pixels))
    with FlopCounterMode(display=False) as counter:
        torch.cat([grader.logits(x) for x in crops]).sum().backward()
    return counter.get_total_flops() / len(crops)


def localiser_rate(preset: Preset, precision: str, steps: int, batch: int, device: torch.device) -> float:
    """Localiser images/s on batches of ``batch`` images of the preset's grid."""
    config = PRESETS[preset]
    torch.manual_seed(0)
    step = _stepper(config.networks.build()[0], precision, device)
    loc = config.spec.localiser
    x = torch.rand(batch, loc.n_slices, loc.pixels, loc.pixels)
    y = torch.zeros(batch, 5, loc.pixels, loc.pixels, device=device)
    seconds = _timed_steps(step, steps, lambda: _localiser_loss(step.net(step.input(x)), y), device)
    return steps * batch / seconds


def _metadata(preset: Preset, members: int = 0) -> ModelMetadata:
    config = PRESETS[preset]
    return ModelMetadata(MODEL_NAME, "bench", "random weights (benchmark)",
                         dict.fromkeys(ConditionGroup, (0.0, 0.0, 0.0)), preprocessing=config.spec.to_preprocessing(),
                         preset=preset.value, networks=config.networks.to_json(), temperatures=(1.0,) * 5,
                         validation={"studies": 0, "median_level_error_mm": None, **SCORES},
                         members=tuple({"run": f"random-{i}", "fold": i, "preset": preset.value}
                                       for i in range(members)) or None)


def export_model(preset: Preset, out: Path, members: int) -> None:
    """A model folder of the preset with random weights: one model (exported and verified as
    ``lumbar-node export`` does) or an ensemble of ``members`` (the export's ensemble graphs)."""
    config = PRESETS[preset]
    torch.manual_seed(0)
    if members <= 1:
        localiser, grader = config.networks.build()
        save_model(out.parent / f"{out.name}-run" / "model.pt", localiser, grader, _metadata(preset))
        export_run(out.parent / f"{out.name}-run", out)
        return
    nets = [config.networks.build() for _ in range(members)]
    ens_loc = EnsembleLocaliser([n[0].eval() for n in nets]).eval()
    ens_grader = EnsembleGrader([n[1].eval() for n in nets], [1.0] * len(CONDITIONS)).eval()
    per_shape, images = shape_samples(config.spec, 4)
    crops, conditions = per_shape[0]
    out.mkdir(parents=True, exist_ok=True)
    _export(ens_loc, (torch.from_numpy(images),), out / "localiser.onnx", ["images"], ["heatmaps"])
    _export(ens_grader, (torch.from_numpy(crops), torch.from_numpy(conditions)), out / "grader.onnx",
            ["crops", "conditions"], ["probabilities", "cam"], _grader_axes(nets[0][1]))
    _metadata(preset, members).write(out / "model.json")


def study_seconds(model: Path, study: Path, providers: tuple[str, ...]) -> tuple[float, int, dict[str, float], str]:
    """One study through ``analyze_study`` with ONNX Runtime (levels not checked): seconds of the second
    run, labels graded, the pipeline's step times, the provider used."""
    instances = [(pydicom.dcmread(p, stop_before_pixels=True), p) for p in sorted(study.rglob("*.dcm"))]
    runner = OnnxRunner(model, providers)
    analyze_study(instances, runner, check_levels=False)  # warm-up: sessions, first-run allocations
    t0 = time.perf_counter()
    result = analyze_study(instances, runner, check_levels=False)
    return (time.perf_counter() - t0, len(result.assessed()), {k: round(v, 2) for k, v in result.seconds.items()},
            runner.providers[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=[p.value for p in Preset], action="append")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], action="append")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-studies", type=int, default=2, help="studies per grader batch")
    parser.add_argument("--localiser-batch", type=int, default=16)
    parser.add_argument("--matrix", choices=["small", "real"], default="real")
    parser.add_argument("--ensemble", type=int, default=5, help="ensemble members timed (0: none)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    if args.device == "cuda":
        providers = ("CUDAExecutionProvider", *providers)
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# bench_train_models: torch {torch.__version__}, {where}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.no_onnx:
            subprocess.run([str(Path(sys.executable).parent / "lumbar-node"), "phantom", "--studies", "1", "--seed",
                            "5", "--matrix", args.matrix, "--out", str(work / "data")], check=True, capture_output=True)
            study = next((work / "data" / "train_images").iterdir())
        for preset in [Preset(p) for p in (args.preset or [p.value for p in Preset])]:
            config = PRESETS[preset]
            localiser, grader = config.networks.build()
            flops = grader_flops(preset)
            print(f"\n## {preset.value}: grader {_params(grader):,} parameters, localiser {_params(localiser):,}; "
                  f"crops {config.spec.describe()}; {flops / 1e9:.2f} GFLOP per grader training sample "
                  f"(forward and backward; {flops * RSNA_STUDIES * TRAIN_SHARE * WINDOWS_PER_STUDY / 1e15:.2f} "
                  "PFLOP per grader epoch on the RSNA training studies)")
            rows.append({"preset": preset.value, "grader_parameters": _params(grader),
                         "localiser_parameters": _params(localiser), "grader_training_flops_per_sample": flops})
            for precision in args.precision or ["fp32"]:
                g = grader_rate(preset, precision, args.steps, args.batch_studies, device)
                lo = localiser_rate(preset, precision, args.steps, args.localiser_batch, device)
                train_studies = RSNA_STUDIES * TRAIN_SHARE
                epoch_g = train_studies * WINDOWS_PER_STUDY / g
                epoch_l = train_studies * LOCALISER_IMAGES_PER_STUDY / lo
                row = {"preset": preset.value, "device": where, "precision": precision, "grader_samples_s": g,
                       "localiser_images_s": lo, "projected_grader_epoch_s": epoch_g,
                       "projected_localiser_epoch_s": epoch_l}
                rows.append(row)
                print(f"- {precision} on {args.device}: grader {g:.1f} samples/s (batch of {args.batch_studies} "
                      f"studies = {args.batch_studies * WINDOWS_PER_STUDY} windows), localiser {lo:.1f} images/s; "
                      f"projected epoch on {int(train_studies)} RSNA training studies: grader {epoch_g / 60:.1f} min, "
                      f"localiser {epoch_l / 60:.1f} min (training steps only; validation and loading apart)")
            if args.no_onnx:
                continue
            for members in sorted({1, args.ensemble} - {0}):
                model = work / f"{preset.value}-{members}"
                export_model(preset, model, members)
                seconds, graded, steps, used = study_seconds(model, study, providers)
                rows.append({"preset": preset.value, "members": members, "provider": used,
                             "study_seconds": seconds, "labels_graded": graded, "steps": steps})
                what = "one model" if members == 1 else f"ensemble of {members}"
                print(f"- ONNX Runtime ({used}), {what}, one {args.matrix}-size phantom study: {seconds:.2f} s "
                      f"({graded} labels graded; steps {steps})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
