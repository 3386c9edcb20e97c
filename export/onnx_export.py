"""Checkpoint -> ONNX (localiser and grader with in-graph Grad-CAM), verified against PyTorch.

The export fails loudly (``ExportError``) unless, on sample inputs, ONNX Runtime's probabilities
and heatmaps are within 1e-4 of PyTorch's (fp32) and its Grad-CAM correlates >= 0.99 with an
autograd Grad-CAM of the same class.
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

from inference.levels import GRADER_SPEC, LOCALISER_SPEC
from inference.model import ModelMetadata, file_sha256
from inference.runtime import usable_providers
from training.level_calibration import card_line
from training.models import CONDITION_GROUP, N_CLASSES, N_GROUPS, Grader
from training.runner import TorchRunner, load_model

log = structlog.stdlib.get_logger(__name__)

OPSET = 17
PROB_TOLERANCE = 1e-4
CAM_MIN_CORRELATION = 0.99
FP16_PROB_TOLERANCE = 2e-2


class ExportError(RuntimeError):
    """The exported graph does not reproduce the checkpoint."""


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str],
            outputs: list[str]) -> None:
    axes = {name: {0: "batch"} for name in inputs + outputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(onnx.load(str(path)))


def autograd_gradcam(grader: Grader, crops: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """Reference Grad-CAM with autograd: ReLU(sum_k mean(d logit_c / d A_k) * A_k), c = predicted class."""
    maps = grader.features(crops).detach().requires_grad_(True)
    logits = grader.head(maps.mean(dim=(2, 3))).view(-1, N_GROUPS, N_CLASSES)
    group = torch.tensor(CONDITION_GROUP)[conditions]
    own = logits[torch.arange(len(crops)), group]
    chosen = own.gather(1, own.argmax(dim=1, keepdim=True)).sum()
    (grads,) = torch.autograd.grad(chosen, maps)
    return torch.relu((grads.mean(dim=(2, 3), keepdim=True) * maps).sum(dim=1)).detach()


def _correlation(a: NDArray[np.float32], b: NDArray[np.float32]) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 1.0 if den == 0 else float(a @ b) / den


def sample_inputs(n: int = 25, seed: int = 0) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.float32]]:
    """Deterministic sample inputs: smooth random images in the normalised intensity range."""
    rng = np.random.default_rng(seed)

    def smooth(shape: tuple[int, ...]) -> NDArray[np.float32]:
        base = rng.normal(0.4, 0.35, shape).astype(np.float32)
        return np.clip(base + np.roll(base, 1, -1) + np.roll(base, 1, -2), -0.5, 2.5) / 3 + 0.2
    crops = smooth((n, GRADER_SPEC.n_slices, GRADER_SPEC.pixels, GRADER_SPEC.pixels))
    conditions = (np.arange(n) % 5).astype(np.int64)
    images = smooth((2, LOCALISER_SPEC.n_slices, LOCALISER_SPEC.pixels, LOCALISER_SPEC.pixels))
    return crops, conditions, images


def verify(model_dir: Path, runner: TorchRunner, precision: str = "fp32") -> dict[str, float]:
    """Compare the ONNX models in ``model_dir`` with the PyTorch runner; raise ExportError on failure."""
    suffix = "" if precision == "fp32" else f".{precision}"
    providers = ["CPUExecutionProvider"] if precision == "fp32" else ["CUDAExecutionProvider"]
    crops, conditions, images = sample_inputs()
    grader = ort.InferenceSession(str(model_dir / f"grader{suffix}.onnx"), providers=providers)
    localiser = ort.InferenceSession(str(model_dir / f"localiser{suffix}.onnx"), providers=providers)
    probs, cam = grader.run(None, {"crops": crops, "conditions": conditions})
    heatmaps = localiser.run(None, {"images": images})[0]
    ref_probs, ref_cam = runner.grade(crops, conditions)
    ref_heatmaps = runner.localise(images)
    auto = autograd_gradcam(runner.grader.cpu(), torch.from_numpy(crops), torch.from_numpy(conditions)).numpy()
    result = {
        "max_abs_diff_probabilities": float(np.abs(probs - ref_probs).max()),
        "max_abs_diff_heatmaps": float(np.abs(heatmaps - ref_heatmaps).max()),
        "min_gradcam_correlation_vs_autograd": min(_correlation(c, a) for c, a in zip(cam, auto, strict=True)),
        "min_gradcam_correlation_vs_torch": min(_correlation(c, a) for c, a in zip(cam, ref_cam, strict=True)),
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
    crops, conditions, images = sample_inputs(4)
    _export(runner.localiser, (torch.from_numpy(images),), out / "localiser.onnx", ["images"], ["heatmaps"])
    _export(runner.grader, (torch.from_numpy(crops), torch.from_numpy(conditions)), out / "grader.onnx",
            ["crops", "conditions"], ["probabilities", "cam"])
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
              "inputs": {"localiser": ["images (B, 3, 128, 128) float32"],
                         "grader": ["crops (B, 3, 48, 48) float32", "conditions (B,) int64, index in conditions"]},
              "outputs": {"localiser": ["heatmaps (B, 5, 128, 128)"],
                          "grader": ["probabilities (B, 3) calibrated",
                                     "cam (B, 6, 6) Grad-CAM of the predicted class"]}},
        verification=checks,
    )
    meta.write(out / "model.json")
    evaluation = checkpoint.parent / "evaluation" / "evaluation.json"
    card = model_card(meta, json.loads(evaluation.read_text()) if evaluation.is_file() else None)
    (out / "MODEL_CARD.md").write_text(card)
    return meta


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
    pre = meta.preprocessing
    lines = [
        f"# Model card: {meta.name} {meta.version}",
        "",
        "**Not for clinical use.** This model was trained on a synthetic lumbar MRI phantom that the",
        "project generates (`lumbar-node phantom`). It proves that the pipeline learns; it says nothing",
        "about real patients.",
        "",
        f"- Training data: {meta.training_data}; {meta.train_studies} training and "
        f"{val['studies']} validation studies (split by study, seed {meta.seed}).",
        "- Networks: a U-Net level localiser (5 disc heatmaps on the three central sagittal slices, "
        f"{pre['localiser']['size_mm'] / pre['localiser']['pixels']:g} mm grid) and",
        "  one residual grader shared by all levels, sides (right mirrored) and conditions, on 2.5D crops",
        f"  of {pre['grader']['size_mm']} mm ({pre['grader']['pixels']} px, "
        f"{pre['grader']['n_slices']} slices); Grad-CAM computed in the graph.",
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
