"""Checkpoint -> ONNX (localiser and grader with in-graph Grad-CAM), verified against PyTorch.

The export fails loudly (``ExportError``) unless, on sample inputs of every crop shape of the
model's spec, ONNX Runtime's probabilities and heatmaps are within 1e-4 of PyTorch's (fp32) and its
Grad-CAM correlates >= 0.99 with an autograd Grad-CAM of the same class (the grader's
``reference_cam``; for the sequence grader with its attention weights held fixed).

The sequence grader's graph takes any slice count and crop size (dynamic axes), so one
grader.onnx serves every group's crops; the residual grader's takes its spec's shape.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import structlog
import torch
from numpy.typing import NDArray

from inference.labels import CONDITIONS
from inference.model import ModelMetadata, file_sha256
from inference.runtime import usable_providers
from inference.specs import ModelSpec, Shape
from training.level_calibration import card_line
from training.models import GraderNetwork, SequenceGrader
from training.runner import TorchRunner, load_model

log = structlog.stdlib.get_logger(__name__)

OPSET = 17
PROB_TOLERANCE = 1e-4
CAM_MIN_CORRELATION = 0.99
FP16_PROB_TOLERANCE = 2e-2


class ExportError(RuntimeError):
    """The exported graph does not reproduce the checkpoint."""


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str],
            outputs: list[str], axes: dict[str, dict[int, str]] | None = None) -> None:
    axes = {**{name: {0: "batch"} for name in inputs + outputs}, **(axes or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(onnx.load(str(path)))


def autograd_gradcam(grader: GraderNetwork, crops: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """Reference Grad-CAM with autograd of the predicted class (the grader's ``reference_cam``)."""
    return grader.reference_cam(crops, conditions)


def _grader_axes(grader: GraderNetwork) -> dict[str, dict[int, str]]:
    """The sequence grader takes any slice count and crop size: those axes are dynamic too."""
    if not isinstance(grader, SequenceGrader):
        return {}
    return {"crops": {0: "batch", 1: "slices", 2: "height", 3: "width"}, "cam": {0: "batch", 1: "cam_h", 2: "cam_w"}}


def _correlation(a: NDArray[np.float32], b: NDArray[np.float32]) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 1.0 if den == 0 else float(a @ b) / den


SAMPLE_VOXELS = 25 * 3 * 48 * 48  # the verification's crops per shape: 25 of the small preset's, as many voxels


def samples_per_shape(shape: Shape, cap: int = 25) -> int:
    """How many sample crops of a shape the verification grades: 25 small crops' voxels, 4 to ``cap``."""
    return int(np.clip(SAMPLE_VOXELS // int(np.prod(shape)), 4, cap))


def sample_inputs(n: int = 25, seed: int = 0) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.float32]]:
    """The small preset's sample inputs: ``n`` crops (3, 48, 48), their conditions, two localiser
    images (``shape_samples`` of the small spec)."""
    [(crops, conditions)], images = shape_samples(ModelSpec(), n, seed)
    return crops, conditions, images


def shape_samples(spec: ModelSpec, n: int = 25, seed: int = 0) \
        -> tuple[list[tuple[NDArray[np.float32], NDArray[np.int64]]], NDArray[np.float32]]:
    """Deterministic sample inputs: smooth random images in the normalised intensity range. Per
    crop shape of ``spec``, (crops, conditions of the groups that take that shape), at most ``n``
    crops (``samples_per_shape``); and two localiser images on the spec's grid."""
    rng = np.random.default_rng(seed)

    def smooth(shape: tuple[int, ...]) -> NDArray[np.float32]:
        base = rng.normal(0.4, 0.35, shape).astype(np.float32)
        return np.clip(base + np.roll(base, 1, -1) + np.roll(base, 1, -2), -0.5, 2.5) / 3 + 0.2
    out = []
    for shape in spec.shapes():
        wanted = [i for i, c in enumerate(CONDITIONS)
                  if (spec.grader(c.group).n_slices, spec.grader(c.group).pixels) == shape[:2]]
        k = samples_per_shape(shape, n)
        out.append((smooth((k, *shape)), np.array([wanted[i % len(wanted)] for i in range(k)], np.int64)))
    loc = spec.localiser
    return out, smooth((2, loc.n_slices, loc.pixels, loc.pixels))


def verify(model_dir: Path, runner: TorchRunner, precision: str = "fp32") -> dict[str, float]:
    """Compare the ONNX models in ``model_dir`` with the PyTorch runner; raise ExportError on failure."""
    suffix = "" if precision == "fp32" else f".{precision}"
    providers = ["CPUExecutionProvider"] if precision == "fp32" else ["CUDAExecutionProvider"]
    per_shape, images = shape_samples(runner.metadata.spec)
    grader = ort.InferenceSession(str(model_dir / f"grader{suffix}.onnx"), providers=providers)
    localiser = ort.InferenceSession(str(model_dir / f"localiser{suffix}.onnx"), providers=providers)
    heatmaps = localiser.run(None, {"images": images})[0]
    ref_heatmaps = runner.localise(images)
    diffs, vs_auto, vs_torch = [], [], []
    for crops, conditions in per_shape:
        probs, cam = grader.run(None, {"crops": crops, "conditions": conditions})
        ref_probs, ref_cam = runner.grade(crops, conditions)
        auto = autograd_gradcam(runner.grader.cpu(), torch.from_numpy(crops), torch.from_numpy(conditions)).numpy()
        diffs.append(float(np.abs(probs - ref_probs).max()))
        vs_auto += [_correlation(c, a) for c, a in zip(cam, auto, strict=True)]
        vs_torch += [_correlation(c, a) for c, a in zip(cam, ref_cam, strict=True)]
    result = {
        "max_abs_diff_probabilities": max(diffs),
        "max_abs_diff_heatmaps": float(np.abs(heatmaps - ref_heatmaps).max()),
        "min_gradcam_correlation_vs_autograd": min(vs_auto),
        "min_gradcam_correlation_vs_torch": min(vs_torch),
        "crop_shapes": len(per_shape),
    }
    tolerance = PROB_TOLERANCE if precision == "fp32" else FP16_PROB_TOLERANCE
    failures = []
    if result["max_abs_diff_probabilities"] > tolerance:
        failures.append(f"probabilities differ by {result['max_abs_diff_probabilities']:.2e} > {tolerance:g}")
    if result["max_abs_diff_heatmaps"] > tolerance:
        failures.append(f"heatmaps differ by {result['max_abs_diff_heatmaps']:.2e} > {tolerance:g}")
    if result["min_gradcam_correlation_vs_autograd"] < CAM_MIN_CORRELATION:
        failures.append(f"Grad-CAM correlation {result['min_gradcam_correlation_vs_autograd']:.4f} "
                        f"< {CAM_MIN_CORRELATION}")
    if failures:
        raise ExportError(f"{precision} export of {model_dir} failed verification: " + "; ".join(failures))
    return result


def export_run(run: Path, out: Path, fp16: bool = False) -> ModelMetadata:
    """Export ``run/model.pt`` to ``out`` (localiser.onnx, grader.onnx, model.json) and verify it."""
    checkpoint = run / "model.pt" if run.is_dir() else run
    runner = load_model(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    spec = runner.metadata.spec
    per_shape, images = shape_samples(spec, 4)
    crops, conditions = per_shape[0]
    _export(runner.localiser, (torch.from_numpy(images),), out / "localiser.onnx", ["images"], ["heatmaps"])
    _export(runner.grader, (torch.from_numpy(crops), torch.from_numpy(conditions)), out / "grader.onnx",
            ["crops", "conditions"], ["probabilities", "cam"], _grader_axes(runner.grader))
    checks = {"fp32": verify(out, runner)}
    log.info("fp32 export verified", model_dir=str(out), **checks["fp32"])
    if fp16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        for name in ("localiser", "grader"):
            half = convert_float_to_float16(onnx.load(str(out / f"{name}.onnx")), keep_io_types=True)
            onnx.save(half, str(out / f"{name}.fp16.onnx"))
        if "CUDAExecutionProvider" in usable_providers():
            checks["fp16"] = verify(out, runner, "fp16")
            log.info("fp16 export verified on CUDA", model_dir=str(out), **checks["fp16"])
        else:
            log.warning("fp16 written but not verified: no CUDA execution provider here (fp16 is for GPUs)")
    meta = replace(
        runner.metadata,
        checkpoint_sha256=file_sha256(checkpoint),
        onnx={"opset": OPSET, "files": {p.name: file_sha256(p) for p in sorted(out.glob("*.onnx"))},
              **_io_text(runner, spec)},
        verification=checks,
    )
    meta.write(out / "model.json")
    evaluation = checkpoint.parent / "evaluation" / "evaluation.json"
    card = model_card(meta, json.loads(evaluation.read_text()) if evaluation.is_file() else None)
    (out / "MODEL_CARD.md").write_text(card)
    return meta


def _io_text(runner: TorchRunner, spec: ModelSpec) -> dict[str, Any]:
    """model.json's ``onnx.inputs`` and ``onnx.outputs``, from the spec (and the CAM size the grader gives)."""
    loc = spec.localiser
    shapes = spec.shapes()
    cams = []
    for shape in shapes:
        with torch.no_grad():
            _, cam = runner.grader.cpu().eval()(torch.zeros(1, *shape), torch.zeros(1, dtype=torch.int64))
        cams.append(f"{cam.shape[1]}, {cam.shape[2]}")
    crops = " or ".join(f"(B, {s}, {p}, {q})" for s, p, q in shapes)
    return {"inputs": {"localiser": [f"images (B, {loc.n_slices}, {loc.pixels}, {loc.pixels}) float32"],
                       "grader": [f"crops {crops} float32 (one shape per call)",
                                  "conditions (B,) int64, index in conditions"]},
            "outputs": {"localiser": [f"heatmaps (B, 5, {loc.pixels}, {loc.pixels})"],
                        "grader": ["probabilities (B, 3) calibrated",
                                   f"cam (B, {' or '.join(dict.fromkeys(cams))}) Grad-CAM of the predicted class"]}}


def _networks_lines(meta: ModelMetadata) -> list[str]:
    """The model card's networks item: preset, grader kind and each group's crops."""
    spec = meta.spec
    loc = spec.localiser
    sequence = (meta.networks or {}).get("grader", {}).get("kind") == "sequence"
    grader = ("one per-slice ResNet grader with an attention head across the slices (bidirectional GRU)" if sequence
              else "one residual grader")
    if spec.uniform:
        g = spec.spinal
        crops = f"of {g.size_mm} mm ({g.pixels} px, {g.n_slices} slices)"
    else:
        crops = "of " + ", ".join(f"{group.name.lower()} {c.size_mm:g} mm ({c.pixels} px, {c.n_slices} slices)"
                                  for group, c in spec.graders.items())
    return [f"- Networks (preset {meta.preset or 'small'}): a U-Net level localiser (5 disc heatmaps on the "
            f"{loc.n_slices} central sagittal slices, {loc.size_mm / loc.pixels:g} mm grid) and",
            f"  {grader} shared by all levels, sides (right mirrored) and conditions, on 2.5D crops",
            f"  {crops}; Grad-CAM computed in the graph."]


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def _row(*cells: object) -> str:
    """One row of a Markdown table."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _scores(score: dict[str, float], baseline: dict[str, float]) -> list[str]:
    """The table's score columns: total, baseline total, then per group and any severe spinal."""
    return [_fmt(score["total"]), _fmt(baseline["total"]),
            *(_fmt(score[k]) for k in ("spinal", "foraminal", "subarticular", "any_severe_spinal"))]


def model_card(meta: ModelMetadata, evaluation: dict[str, Any] | None) -> str:
    """A short model card: what it is, what data, which numbers on which studies, and its limits."""
    val = meta.validation
    lines = [
        f"# Model card: {meta.name} {meta.version}",
        "",
        "**Not for clinical use.** This model was trained on a synthetic lumbar MRI phantom that the",
        "project generates (`lumbar-node phantom`). It proves that the pipeline learns; it says nothing",
        "about real patients.",
        "",
        f"- Training data: {meta.training_data}; {meta.train_studies} training and "
        f"{val['studies']} validation studies (split by study, seed {meta.seed}).",
        *_networks_lines(meta),
        f"- Calibration: temperature per condition {[round(x, 2) for x in meta.temperatures]} (validation).",
        *([card_line(meta.level_check)] if meta.level_check is not None else []),
        f"- Checkpoint sha256: `{meta.checkpoint_sha256 or ''}`",
        "",
        "## Numbers",
        "",
        _row("data", "studies", "score (lower is better)", "class-prior baseline", "spinal", "foraminal",
             "subarticular", "any severe spinal", "median level error (mm)"),
        _row(*["---"] * 9),
        _row("validation split (phantom)", val["studies"], *_scores(val["score"], val["class_prior_score"]),
             _fmt(val["median_level_error_mm"])),
    ]
    if evaluation is not None:
        lines.append(_row(f"held-out phantom studies (`{evaluation['data']}`)", evaluation["studies"],
                          *_scores(evaluation["score"], evaluation["class_prior_baseline"]),
                          _fmt(evaluation["level_error_mm"]["median"])))
        lines += ["", "Recall of Severe per condition on the held-out studies: "
                  + ", ".join(f"{k} {_fmt(v)}" for k, v in evaluation["severe_recall"].items()) + "."]
    lines += ["", "Score: the RSNA 2024 competition metric as implemented in `training/metrics.py`; the baseline",
              "predicts the training split's class frequencies for every row. Reproduce with the commands in the",
              "README, section \"The bundled default model\".", ""]
    return "\n".join(lines)
