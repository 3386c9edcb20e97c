"""Several trained models as ONE model folder the node serves unchanged: ``lumbar-node export RUN``
on a folds run, ``lumbar-node export --ensemble RUN_A RUN_B ...`` for runs trained apart.

- ``localiser.onnx``: the members' mean heatmap.
- ``grader.onnx``: each member's uncalibrated probabilities softmax(own logits) through the graders'
  common interface ``class_maps``, averaged, then calibrated: softmax(log(mean) / T) with one
  temperature per condition fitted on out-of-fold predictions (``fit_calibration``). Grad-CAM: the
  mean of the members' class activation maps of the ensemble's predicted class (resized to the
  largest member's map where they differ).
- ``model.json``: member 0's metadata with ``members`` (run, fold, checkpoint sha256, CV score,
  preset), the fitted temperatures, the mean crop offsets, the mean class prior, and the level check
  that passes what any member's check passes (the loosest threshold of each; the mean heatmap's peaks
  are lower than a single member's where members disagree).

Members must share the preprocessing (model.json ``preprocessing``): the export refuses otherwise.
Parity of ONNX Runtime with the PyTorch ensemble is checked as ``export.onnx_export.verify`` does.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import onnxruntime as ort
import structlog
import torch
from numpy.typing import NDArray
from torch import Tensor, nn
from torch.nn import functional as F

from export.onnx_export import (
    CAM_MIN_CORRELATION,
    OPSET,
    PROB_TOLERANCE,
    ExportError,
    _correlation,
    _export,
    _grader_axes,
    _io_text,
    model_card,
    shape_samples,
)
from inference.labels import CONDITIONS, LABELS
from inference.level_check import LevelCheck
from inference.model import ModelInfo, ModelMetadata, file_sha256
from training.metrics import competition_score
from training.models import CONDITION_GROUP, GraderNetwork, calibrated
from training.report import DEFAULT_PRESET, Oof, fold_folders, fold_of, read_oof
from training.report import calibrated as at_temperatures
from training.runner import TorchRunner, load_model
from training.train import fit_temperatures

log = structlog.stdlib.get_logger(__name__)

MIN_CALIBRATION_STUDIES = 5  # fewer common out-of-fold studies: the members' mean temperatures
MIN_CALIBRATION_ROWS = 5  # a condition with fewer assessed, labelled rows keeps the members' mean (as fit_temperatures)


class ClassMaps(Protocol):
    """What an ensemble needs of a member grader (``training.models.Grader.class_maps``)."""

    def class_maps(self, crops: Tensor, conditions: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class Member:
    """One member network pair: the run folder it was given in, its fold (None: a plain run)."""

    run: Path
    fold: int | None
    checkpoint: Path
    runner: TorchRunner


def members_of(runs: list[Path]) -> list[Member]:
    """The members of the runs given: a folds run's ``fold-<i>`` models, a plain run's model.pt."""
    out = []
    for run in runs:
        folds = fold_folders(run) if run.is_dir() else []
        for folder in folds or [run]:
            checkpoint = folder / "model.pt" if folder.is_dir() else folder
            if not checkpoint.is_file():
                raise ExportError(f"no trained model at {checkpoint} (an unfinished fold? rerun its training)")
            out.append(Member(run, fold_of(folder) if folds else None, checkpoint, load_model(checkpoint)))
    if not out:
        raise ExportError("no members to export")
    return out


def check_preprocessing(members: list[Member]) -> None:
    """Refuse members whose preprocessing (crop sizes, slices, intensity) differs from member 0's."""
    first = members[0].runner.metadata.preprocessing
    for m in members[1:]:
        got = m.runner.metadata.preprocessing
        if got != first:
            diff = sorted(k for k in set(first) | set(got) if first.get(k) != got.get(k))
            mine, theirs = {k: first.get(k) for k in diff}, {k: got.get(k) for k in diff}
            raise ExportError(f"members differ in preprocessing ({', '.join(diff)}): {members[0].checkpoint} has "
                              f"{mine}, {m.checkpoint} has {theirs}; an ensemble's members must read the same crops")


# ---- the networks ------------------------------------------------------------------------------------


class EnsembleLocaliser(nn.Module):
    """The members' mean heatmap."""

    def __init__(self, localisers: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(localisers)

    def forward(self, images: Tensor) -> Tensor:
        return torch.stack([m(images) for m in self.members]).mean(dim=0)


class EnsembleGrader(nn.Module):
    """Mean of the members' uncalibrated probabilities, calibrated after averaging; Grad-CAM the mean
    of the members' maps of the predicted class. Members offer ``class_maps(crops, conditions)``.

    ``tta``: flip test-time augmentation of the spinal canal crops only (see ``views``)."""

    temperature: Tensor
    condition_group: Tensor

    def __init__(self, graders: list[nn.Module], temperatures: list[float], tta: bool = False):
        super().__init__()
        self.members = nn.ModuleList(graders)
        self.tta = tta
        self.register_buffer("temperature", torch.tensor(temperatures, dtype=torch.float32))
        self.register_buffer("condition_group", torch.tensor(CONDITION_GROUP, dtype=torch.long))

    def views(self, crops: Tensor, conditions: Tensor) -> list[Tensor]:
        """The crops, and with ``tta`` their left-right mirror where that is the same finding: a spinal
        canal crop is sagittal with its 2.5D slices running left to right (``inference.levels.crop_axes``),
        so its mirror is the slices in reverse order, in the same in-plane frame (the maps average as they
        are). Sided crops are left as they are: mirrored, a left crop is the right side's frame (right crops
        are served mirrored), another finding."""
        if not self.tta:
            return [crops]
        spinal = (self.condition_group[conditions] == 0).view(-1, 1, 1, 1)
        return [crops, torch.where(spinal, crops.flip(1), crops)]

    def averaged(self, crops: Tensor, conditions: Tensor) -> tuple[Tensor, Tensor]:
        """(mean uncalibrated probabilities (B, 3), mean class maps (B, 3, h, w)) over members and views."""
        probs, cams = [], []
        for view in self.views(crops, conditions):
            for member in self.members:
                own, maps = cast(ClassMaps, member).class_maps(view, conditions)
                probs.append(torch.softmax(own, dim=1))
                cams.append(maps)
        size = max(tuple(int(s) for s in c.shape[-2:]) for c in cams)
        cams = [c if tuple(int(s) for s in c.shape[-2:]) == size else
                F.interpolate(c, size=size, mode="bilinear", align_corners=False) for c in cams]
        return torch.stack(probs).mean(dim=0), torch.stack(cams).mean(dim=0)

    def forward(self, crops: Tensor, conditions: Tensor) -> tuple[Tensor, Tensor]:
        mean, cams = self.averaged(crops, conditions)
        return calibrated(torch.log(mean.clamp_min(1e-12)), cams, self.temperature[conditions])


class EnsembleRunner:
    """The PyTorch ensemble behind ``inference.analyze.Runner`` (what the export's parity is checked on)."""

    def __init__(self, localiser: EnsembleLocaliser, grader: EnsembleGrader, info: ModelInfo):
        self.localiser, self.grader, self.info = localiser.eval(), grader.eval(), info

    @property
    def metadata(self) -> ModelMetadata:
        return self.info.metadata

    @torch.no_grad()
    def localise(self, images: NDArray[np.float32]) -> NDArray[np.float32]:
        return self.localiser(torch.from_numpy(np.ascontiguousarray(images, np.float32))).numpy()

    @torch.no_grad()
    def grade(self, crops: NDArray[np.float32],
              conditions: NDArray[np.int64]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        probs, cam = self.grader(torch.from_numpy(np.ascontiguousarray(crops, np.float32)),
                                 torch.from_numpy(conditions))
        return probs.numpy(), cam.numpy()


# ---- calibration and metadata --------------------------------------------------------------------------


def fit_calibration(runs: list[Path], members: list[Member]) -> tuple[list[float], dict[str, Any]]:
    """Temperatures per condition for the averaged probabilities, and what they were fitted on.

    Each run's out-of-fold predictions (a folds run: every study graded by the fold that did not
    train on it; a plain run: its validation split) at temperature 1 are averaged over the runs on
    the studies every run held out, and the temperatures fitted there (``train.fit_temperatures``).
    Within a folds run a study is graded by one member, not by the average of all (which is less
    confident): the temperatures are those of single members' out-of-fold predictions. Runs that hold
    out fewer than MIN_CALIBRATION_STUDIES common studies (e.g. folds exported as runs trained apart)
    get the mean of the members' own temperatures instead, and so does a condition with fewer than
    MIN_CALIBRATION_ROWS assessed, labelled rows there."""
    mean_temps = [float(x) for x in np.mean([m.runner.metadata.temperatures for m in members], axis=0)]
    try:
        oofs = [read_oof(r) for r in runs]
    except FileNotFoundError as exc:
        return mean_temps, _not_fitted(f"no out-of-fold predictions ({exc})")
    common = sorted(set.intersection(*(set(o.study_ids.tolist()) for o in oofs)))
    if len(common) < MIN_CALIBRATION_STUDIES:
        return mean_temps, _not_fitted(f"the runs hold out {len(common)} common studies "
                                       f"(< {MIN_CALIBRATION_STUDIES})")
    rows = [_rows(o, common) for o in oofs]
    mean = np.mean([o.uncalibrated[r] for o, r in zip(oofs, rows, strict=True)], axis=0)
    targets, prior = oofs[0].targets[rows[0]], np.mean([o.prior[r] for o, r in zip(oofs, rows, strict=True)], axis=0)
    temperatures = fit_temperatures(mean, targets)
    unfitted = [c for c in range(len(CONDITIONS)) if _scored_rows(mean, targets, c) < MIN_CALIBRATION_ROWS]
    for c in unfitted:  # too few assessed, labelled rows: that condition keeps the members' mean temperature
        temperatures[c] = mean_temps[c]
    probs = at_temperatures(mean, temperatures)
    filled = np.where(np.isnan(probs).any(axis=-1, keepdims=True), prior, probs)
    what = ("out-of-fold predictions of the folds (each study graded by the fold that did not train on it)"
            if len(runs) == 1 else "the mean of the runs' out-of-fold probabilities on the studies every run held out")
    return temperatures, {"fitted_on": what, "studies": len(common),
                          "members_mean_temperature": [CONDITIONS[c].key for c in unfitted],
                          "score": competition_score(filled, targets).as_dict(),
                          "class_prior_score": competition_score(prior, targets).as_dict()}


def _scored_rows(probs: NDArray[np.float64], targets: NDArray[np.int64], condition: int) -> int:
    """The assessed, labelled rows of a condition (what ``fit_temperatures`` fits on)."""
    cols = [i for i, lb in enumerate(LABELS) if lb.condition == CONDITIONS[condition]]
    return int(((targets[:, cols] >= 0) & ~np.isnan(probs[:, cols]).any(axis=-1)).sum())


def _rows(oof: Oof, study_ids: list[int]) -> NDArray[np.int64]:
    where = {int(s): i for i, s in enumerate(oof.study_ids)}
    return np.array([where[s] for s in study_ids], np.int64)


def _not_fitted(why: str) -> dict[str, Any]:
    none = dict.fromkeys(("total", "spinal", "foraminal", "subarticular", "any_severe_spinal"))
    return {"fitted_on": f"not fitted: {why}; the mean of the members' temperatures", "studies": 0,
            "score": none, "class_prior_score": none}


def _loosest(checks: list[LevelCheck | None]) -> LevelCheck | None:
    """The level check passing what any member's passes (None when a member has none: built-in defaults)."""
    if not checks or any(c is None for c in checks):
        return None
    cs = [c for c in checks if c is not None]
    return LevelCheck(min_peak=min(c.min_peak for c in cs), min_gap_mm=min(c.min_gap_mm for c in cs),
                      max_gap_mm=max(c.max_gap_mm for c in cs),
                      max_step_angle_deg=max(c.max_step_angle_deg for c in cs),
                      max_coordinate_mm=max(c.max_coordinate_mm for c in cs),
                      max_outside_image_mm=max(c.max_outside_image_mm for c in cs),
                      fitted_on=sum(c.fitted_on for c in cs))


def _offset(values: NDArray[np.float64]) -> tuple[float, float, float]:
    """Three numbers (an offset in mm, a class prior row)."""
    return float(values[0]), float(values[1]), float(values[2])


def _run_cv_score(run: Path) -> float | None:
    """A run's CV score: its report's, else its out-of-fold predictions scored now."""
    report = run / "report.json"
    if report.is_file():
        return float(json.loads(report.read_text())["cv_score"]["score"])
    try:
        oof = read_oof(run)
    except FileNotFoundError:
        return None
    return competition_score(oof.filled(), oof.targets).total


def _preset(member: Member) -> str:
    config = member.checkpoint.parent / "config.json"
    return str(json.loads(config.read_text()).get("preset", DEFAULT_PRESET)) if config.is_file() else DEFAULT_PRESET


def ensemble_metadata(runs: list[Path], members: list[Member], temperatures: list[float],
                      calibration: dict[str, Any]) -> ModelMetadata:
    """model.json's metadata of the ensemble (before the export adds its ONNX fields)."""
    metas = [m.runner.metadata for m in members]
    first = metas[0]
    cv = {r: _run_cv_score(r) for r in runs}
    member_rows = tuple({"run": str(m.run), "fold": m.fold, "checkpoint_sha256": m.runner.info.sha256,
                         "cv_score": cv[m.run], "validation_score": meta.validation.get("score", {}).get("total"),
                         "preset": _preset(m)} for m, meta in zip(members, metas, strict=True))
    offsets = {g: _offset(np.mean([meta.offsets_mm[g] for meta in metas], axis=0)) for g in first.offsets_mm}
    prior = np.mean([np.asarray(meta.class_prior, np.float64) for meta in metas], axis=0)
    data = sorted({meta.training_data for meta in metas})
    validation = {**calibration, "median_level_error_mm": None,
                  "note": "scores of the calibrated average on the out-of-fold studies (see fitted_on)"}
    return replace(first, training_data="; ".join(data), offsets_mm=offsets,
                   temperatures=tuple(temperatures), class_prior=tuple(_offset(row) for row in prior),
                   level_check=_loosest([meta.level_check for meta in metas]), validation=validation,
                   train_studies=max(meta.train_studies + int(meta.validation.get("studies", 0)) for meta in metas),
                   created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), members=member_rows)


# ---- verification ------------------------------------------------------------------------------------


def reference_gradcam(graders: list[nn.Module], views: list[Tensor], conditions: Tensor, classes: Tensor) -> Tensor:
    """The members' autograd Grad-CAM of the ensemble's classes on each view of the crops, resized to
    the largest, averaged."""
    cams = [cast(GraderNetwork, g).reference_cam(crops, conditions, classes) for crops in views for g in graders]
    size = max(tuple(c.shape[-2:]) for c in cams)
    cams = [c if tuple(c.shape[-2:]) == size else
            F.interpolate(c[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] for c in cams]
    return torch.stack(cams).mean(dim=0)


def verify_ensemble(model_dir: Path, runner: EnsembleRunner) -> dict[str, float]:
    """ONNX Runtime against the PyTorch ensemble on sample inputs of every crop shape; ExportError
    unless within tolerance."""
    per_shape, images = shape_samples(runner.metadata.spec)
    providers = ["CPUExecutionProvider"]
    grader = ort.InferenceSession(str(model_dir / "grader.onnx"), providers=providers)
    heatmaps = ort.InferenceSession(str(model_dir / "localiser.onnx"), providers=providers).run(
        None, {"images": images})[0]
    diffs, vs_auto, vs_torch = [], [], []
    for crops, conditions in per_shape:
        probs, cam = grader.run(None, {"crops": crops, "conditions": conditions})
        ref_probs, ref_cam = runner.grade(crops, conditions)
        x, c = torch.from_numpy(crops), torch.from_numpy(conditions)
        auto = reference_gradcam(list(runner.grader.members), runner.grader.views(x, c), c,
                                 torch.from_numpy(ref_probs.argmax(axis=1))).numpy()
        diffs.append(float(np.abs(probs - ref_probs).max()))
        vs_auto += [_correlation(a, b) for a, b in zip(cam, auto, strict=True)]
        vs_torch += [_correlation(a, b) for a, b in zip(cam, ref_cam, strict=True)]
    result = {
        "max_abs_diff_probabilities": max(diffs),
        "max_abs_diff_heatmaps": float(np.abs(heatmaps - runner.localise(images)).max()),
        "min_gradcam_correlation_vs_autograd": min(vs_auto),
        "min_gradcam_correlation_vs_torch": min(vs_torch),
    }
    failures = [f"{k} {v:.2e} > {PROB_TOLERANCE:g}" for k, v in result.items()
                if k.startswith("max_abs") and v > PROB_TOLERANCE]
    failures += [f"{k} {v:.4f} < {CAM_MIN_CORRELATION}" for k, v in result.items()
                 if k.startswith("min_gradcam") and v < CAM_MIN_CORRELATION]
    if failures:
        raise ExportError(f"ensemble export of {model_dir} failed verification: " + "; ".join(failures))
    return result


# ---- the export -------------------------------------------------------------------------------------


def load_ensemble(runs: list[Path], tta: bool = False) -> tuple[EnsembleRunner, list[Member]]:
    """The PyTorch ensemble of the runs (folds runs expanded into their folds), calibrated; ``tta``:
    spinal crops averaged with their mirror (``EnsembleGrader.views``)."""
    members = members_of(runs)
    check_preprocessing(members)
    temperatures, calibration = fit_calibration(runs, members)
    meta = ensemble_metadata(runs, members, temperatures, calibration)
    localiser = EnsembleLocaliser([m.runner.localiser.cpu() for m in members])
    grader = EnsembleGrader([m.runner.grader.cpu() for m in members], temperatures, tta)
    digest = hashlib.sha256("".join(m.runner.info.sha256 for m in members).encode()).hexdigest()
    return EnsembleRunner(localiser, grader, ModelInfo(meta, digest)), members


def export_ensemble(runs: list[Path], out: Path, tta: bool = False) -> ModelMetadata:
    """Write the ensemble of ``runs`` to ``out`` (localiser.onnx, grader.onnx, model.json, MODEL_CARD.md)."""
    runner, members = load_ensemble(runs, tta)
    out.mkdir(parents=True, exist_ok=True)
    per_shape, images = shape_samples(runner.metadata.spec, 4)
    crops, conditions = per_shape[0]
    _export(runner.localiser, (torch.from_numpy(images),), out / "localiser.onnx", ["images"], ["heatmaps"])
    _export(runner.grader, (torch.from_numpy(crops), torch.from_numpy(conditions)), out / "grader.onnx",
            ["crops", "conditions"], ["probabilities", "cam"],
            _grader_axes(members[0].runner.grader))
    checks = {"fp32": verify_ensemble(out, runner)}
    log.info("ensemble export verified", model_dir=str(out), members=len(members), **checks["fp32"])
    io = _io_text(cast(TorchRunner, runner), runner.metadata.spec)
    io["outputs"]["localiser"].append("the members' mean")
    cam = io["outputs"]["grader"][1].split(")")[0] + ")"
    io["outputs"]["grader"] = ["probabilities (B, 3): the members' mean, calibrated after averaging",
                               f"{cam}: the members' mean map of the predicted class"]
    meta = replace(
        runner.metadata,
        checkpoint_sha256=runner.info.sha256,
        onnx={"opset": OPSET, "files": {p.name: file_sha256(p) for p in sorted(out.glob("*.onnx"))}, **io,
              "ensemble": {"members": len(members), "checkpoint_sha256": "sha256 of the members' sha256s in order",
                           "tta": ("spinal canal crops averaged with their left-right mirror (slices reversed); "
                                   "temperatures fitted without it") if tta else None}},
        verification=checks,
    )
    meta.write(out / "model.json")
    (out / "MODEL_CARD.md").write_text(ensemble_card(meta))
    return meta


def ensemble_card(meta: ModelMetadata) -> str:
    """The model card with the members and the calibration."""
    lines = [model_card(meta, None).rstrip(), "", "## Ensemble", "",
             f"{len(meta.members or ())} members; the grader averages their uncalibrated probabilities, then "
             "calibrates with one temperature per condition fitted on "
             f"{meta.validation.get('fitted_on')} ({meta.validation.get('studies')} studies); the localiser "
             "averages their heatmaps; Grad-CAM is their mean map of the predicted class. Crop offsets and class "
             "prior: the members' mean; level check: the loosest of the members'.", "",
             "| run | fold | CV score | own validation score | preset | checkpoint sha256 |",
             "|---|---|---|---|---|---|"]
    for m in meta.members or ():
        cv, own = m.get("cv_score"), m.get("validation_score")
        lines.append(f"| {m['run']} | {m['fold'] if m['fold'] is not None else '-'} | "
                     f"{'n/a' if cv is None else f'{cv:.3f}'} | {'n/a' if own is None else f'{own:.3f}'} | "
                     f"{m['preset']} | `{m['checkpoint_sha256'][:12]}` |")
    return "\n".join(lines) + "\n"
