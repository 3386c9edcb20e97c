"""Training: level localiser, then grader on crops jittered by the localiser's real error, then
temperature calibration per condition. Checkpoints every epoch; early stopping; resumable.

    RUN/state.pt     everything needed to resume (stage, epoch, weights, optimiser, history)
    RUN/model.pt     the final model with its metadata (what ``export`` and ``evaluate`` read)
    RUN/history.json per-epoch losses and validation metrics
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import structlog
import torch
from numpy.typing import NDArray
from torch.nn import functional as F
from tqdm import tqdm

from inference import __version__
from inference.analyze import AssessedLabel, StudyResult, analyze_study
from inference.labels import (
    CONDITIONS,
    LABELS,
    LEVELS,
    SEVERITY_WEIGHTS,
    ConditionGroup,
)
from inference.levels import GRADER_SPEC, LOCALISER_SPEC
from inference.model import ModelInfo, ModelMetadata, Offset
from training.data import (
    JITTER_PX,
    StudySamples,
    crop_center,
    level_error_mm,
    local_components,
    study_samples,
    window_crop,
)
from training.level_calibration import LevelFit, fit_on_results, with_level_check
from training.metrics import competition_score, fill_not_assessed, prior_baseline
from training.models import CONDITION_GROUP, Grader, Localiser
from training.rsna import LayoutError, StudyRecord, load_rsna, read_instances, split_studies
from training.runner import MODEL_NAME, TorchRunner, device_of, save_model

log = structlog.stdlib.get_logger(__name__)

WEIGHTS = torch.tensor(SEVERITY_WEIGHTS)

Instances = list[tuple[pydicom.Dataset, Path]]
LocaliserPair = tuple[NDArray[np.float16], NDArray[np.float16]]  # (image, heatmap target)


class Stage(StrEnum):
    """The stage a checkpoint is in; its value is what state.pt and history.json store."""

    LOCALISER = "localiser"
    GRADER = "grader"


_BEST_KEY = {Stage.LOCALISER: "error", Stage.GRADER: "score"}  # the best number's key in state.pt


@dataclass
class TrainConfig:
    localiser_epochs: int = 24
    grader_epochs: int = 24
    patience: int = 6
    batch_studies: int = 8
    localiser_batch: int = 16
    lr: float = 2e-3
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    training_data: str = "synthetic lumbar MRI phantom (lumbar-node phantom); not clinical data"


# ---- losses, batches, calibration ------------------------------------------------------------------


def _localiser_loss(pred_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred = torch.sigmoid(pred_logits)
    return ((pred - target) ** 2 * (1 + 30 * target)).mean()


def grader_loss(logits: torch.Tensor, targets: torch.Tensor, conditions: torch.Tensor,
                studies: torch.Tensor) -> torch.Tensor:
    """The competition loss: class-weighted cross-entropy per condition group (normalised by the
    weights) plus the any-severe-spinal binary term per study; the mean of the four parts."""
    group = torch.tensor(CONDITION_GROUP, device=logits.device)[conditions]
    own = logits[torch.arange(len(logits)), group]
    logp = F.log_softmax(own, dim=1)
    w = WEIGHTS.to(logits.device)[targets]
    nll = -logp[torch.arange(len(logp)), targets]
    parts = []
    for g in range(3):
        m = group == g
        if m.any():
            parts.append((w[m] * nll[m]).sum() / w[m].sum())
    spinal = group == 0
    if spinal.any():
        p_severe = logp[:, 2].exp()
        terms, weights = [], []
        for sid in studies[spinal].unique():
            m = spinal & (studies == sid)
            p = p_severe[m].max().clamp(1e-6, 1 - 1e-6)
            y = (targets[m] == 2).any().float()
            terms.append(-(y * p.log() + (1 - y) * (1 - p).log()))
            weights.append(w[m].max())
        tw = torch.stack(weights)
        parts.append((torch.stack(terms) * tw).sum() / tw.sum())
    return torch.stack(parts).mean()


def _grader_batch(batch: list[StudySamples], sigma_px: dict[int, float], rng: np.random.Generator,
                  train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crops, targets, condition indices, study index in the batch); jittered and rescaled when training."""
    crops, targets, conditions, studies = [], [], [], []
    for k, s in enumerate(batch):
        for i, window in s.windows.items():
            cond = CONDITIONS.index(LABELS[i].condition)
            if train:
                sig = sigma_px[CONDITION_GROUP[cond]]
                dx, dy = np.clip(np.round(rng.normal(0, sig, 2)), -JITTER_PX, JITTER_PX).astype(int)
                dz = int(rng.choice([-1, 0, 1], p=[0.15, 0.7, 0.15]))
                crop = window_crop(window, dx, dy, dz).astype(np.float32)
                crop = crop * rng.uniform(0.85, 1.15) + rng.normal(0, 0.03, crop.shape).astype(np.float32)
            else:
                crop = window_crop(window, 0, 0, 0).astype(np.float32)
            crops.append(crop)
            targets.append(int(s.targets[i]))
            conditions.append(cond)
            studies.append(k)
    return (torch.from_numpy(np.stack(crops)), torch.tensor(targets), torch.tensor(conditions), torch.tensor(studies))


def fit_temperatures(probs: np.ndarray, targets: np.ndarray) -> list[float]:
    """Per-condition temperature minimising the class-weighted log loss on validation rows."""
    grid = np.exp(np.linspace(np.log(0.4), np.log(3.0), 41))
    out = []
    for c in range(len(CONDITIONS)):
        cols = [i for i, lb in enumerate(LABELS) if lb.condition == CONDITIONS[c]]
        p = probs[:, cols].reshape(-1, 3)
        t = targets[:, cols].reshape(-1)
        ok = (t >= 0) & ~np.isnan(p).any(axis=1)
        if ok.sum() < 5:
            out.append(1.0)
            continue
        logp, y = np.log(np.clip(p[ok], 1e-9, 1)), t[ok]
        w = np.array(SEVERITY_WEIGHTS)[y]
        losses = []
        for temp in grid:
            z = logp / temp
            z = z - z.max(axis=1, keepdims=True)
            lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            losses.append(float((w * -lp[np.arange(len(y)), y]).sum() / w.sum()))
        out.append(float(grid[int(np.argmin(losses))]))
    return out


# ---- step 1: the data and its split ------------------------------------------------------------------


@dataclass
class _Split:
    """The run's studies split by study, and what training and validation need of them."""

    train: list[StudyRecord]
    val: list[StudyRecord]
    samples: list[StudySamples]  # training studies
    val_samples: list[StudySamples]
    val_instances: list[Instances]  # validation studies' images, for the serving pipeline
    val_targets: NDArray[np.int64]  # (n_val, 25), -1 unlabelled
    prior: NDArray[np.float64]  # (n_val, 25, 3): the training split's class frequencies


def _load_split(data: Path, cfg: TrainConfig, rng: np.random.Generator, device: torch.device) -> _Split:
    """Read the RSNA layout, split it by study and load the samples of both parts."""
    records = load_rsna(data)
    train_recs, val_recs = split_studies(records, cfg.val_fraction, cfg.seed)
    log.info("training data", device=str(device), train_studies=len(train_recs), validation_studies=len(val_recs),
             data=str(data))
    train_recs, samples = _loaded(train_recs, rng, "loading training studies")
    val_recs, val_samples = _loaded(val_recs, rng, "loading validation studies")
    if not samples or not val_samples:
        raise LayoutError(f"{data}: no usable {'training' if not samples else 'validation'} study "
                         f"(of {len(records)} studies)")
    val_instances = [read_instances(r) for r in val_recs]
    train_targets = np.stack([s.targets for s in samples])
    prior = prior_baseline(np.stack([s.targets for s in val_samples]), train_targets=train_targets)
    val_targets = np.stack([np.array(r.targets()) for r in val_recs])
    return _Split(train_recs, val_recs, samples, val_samples, val_instances, val_targets, prior)


def _loaded(records: list[StudyRecord], rng: np.random.Generator,
            desc: str) -> tuple[list[StudyRecord], list[StudySamples]]:
    """The samples of each study; a study whose images cannot be used is left out with a log line."""
    kept, samples = [], []
    for record in tqdm(records, desc=desc, leave=False):
        try:
            samples.append(study_samples(record, rng))
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            log.warning("study left out: its images cannot be used", study=record.study_id,
                        error=f"{type(exc).__name__}: {exc}")
            continue
        kept.append(record)
    return kept, samples


def _offsets(samples: list[StudySamples]) -> dict[ConditionGroup, Offset]:
    """Median (lateral, posterior, head) of each group's marked point from the canal point at its level."""
    found: dict[ConditionGroup, list[Offset]] = {g: [] for g in ConditionGroup}
    for s in samples:
        canal = s.canal_points()
        for label, point in s.points.items():
            if label.level in canal and label.condition.group is not ConditionGroup.SPINAL:
                found[label.condition.group].append(local_components(label, point - canal[label.level]))
    return {g: (tuple(float(x) for x in np.median(v, axis=0)) if v else (0.0, 0.0, 0.0)) for g, v in found.items()}


def _metadata(split: _Split, cfg: TrainConfig) -> ModelMetadata:
    """The model's metadata as far as training knows it before calibration and validation."""
    return ModelMetadata(name=MODEL_NAME, version=__version__, training_data=cfg.training_data,
                         offsets_mm=_offsets(split.samples), train_studies=len(split.train), seed=cfg.seed)


# ---- the run folder and the shared epoch loop --------------------------------------------------------


@dataclass
class _Run:
    """A run folder's networks, history and the checkpoint it resumed from; writes the checkpoints."""

    folder: Path
    localiser: Localiser
    grader: Grader
    resumed: dict[str, Any] = field(default_factory=dict)  # state.pt as found ({} for a new run)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def state_path(self) -> Path:
        return self.folder / "state.pt"

    @property
    def stage(self) -> Stage:
        """The stage to start at: the checkpoint's, else the first."""
        return Stage(self.resumed.get("stage", Stage.LOCALISER.value))

    def resumed_stage(self, stage: Stage) -> dict[str, Any]:
        """The checkpoint when it was written in ``stage`` (that stage resumes from it), else {}."""
        return self.resumed if self.resumed.get("stage") == stage.value else {}

    def checkpoint(self, stage: Stage, epoch: int, best: dict[str, Any], optimiser: torch.optim.Optimizer,
                   extra: dict[str, Any]) -> None:
        """Write state.pt (everything to resume after ``epoch`` of ``stage``) and history.json."""
        torch.save({"stage": stage.value, "epoch": epoch, "localiser": self.localiser.state_dict(),
                    "grader": self.grader.state_dict(), "optimiser": optimiser.state_dict(), "best": best,
                    "history": self.history, **extra}, self.state_path)
        (self.folder / "history.json").write_text(json.dumps(self.history, indent=1))


def _open_run(folder: Path, device: torch.device) -> _Run:
    """The run in ``folder``: new networks, or those of its state.pt with its history."""
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / "state.pt"
    state: dict[str, Any] = torch.load(state_path, weights_only=False) if state_path.exists() else {}
    if state:
        log.info("resuming from checkpoint", path=str(state_path), stage=state["stage"], epoch=state["epoch"])
    run = _Run(folder, Localiser().to(device), Grader().to(device), state, state.get("history", []))
    if state:
        run.localiser.load_state_dict(state["localiser"])
        run.grader.load_state_dict(state["grader"])
    return run


@dataclass
class _Best:
    """The lowest validation number so far, a copy of its weights, and the epochs since it."""

    value: float = float("inf")
    weights: dict[str, torch.Tensor] | None = None
    stale: int = 0

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, key: str) -> _Best:
        return cls(state[key], state["weights"], state["stale"]) if state else cls()

    def to_state(self, key: str) -> dict[str, Any]:
        return {key: self.value, "weights": self.weights, "stale": self.stale}

    def update(self, value: float, model: torch.nn.Module) -> None:
        if value < self.value:
            self.value, self.stale = value, 0
            self.weights = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            self.stale += 1


TrainEpoch = Callable[[int], list[float]]  # epoch index -> the losses of its batches
Validate = Callable[[], tuple[float, dict[str, Any]]]  # -> (the number to minimise, history.json fields)


def _run_epochs(run: _Run, stage: Stage, epochs: int, patience: int, model: torch.nn.Module,
                optimiser: torch.optim.Optimizer, train_epoch: TrainEpoch, validate: Validate,
                extra: dict[str, Any] | None = None) -> None:
    """The epoch loop of both stages: train an epoch, validate, keep the best weights, checkpoint;
    stop after ``epochs`` or ``patience`` epochs without improvement; leave ``model`` at its best.

    Resumes from the run's checkpoint when it was written in this stage: after its epoch, with its
    optimiser state and best so far (no epoch is repeated). ``extra`` goes into every checkpoint."""
    resumed = run.resumed_stage(stage)
    key = _BEST_KEY[stage]
    best = _Best.from_state(resumed.get("best"), key)
    if resumed.get("optimiser"):
        optimiser.load_state_dict(resumed["optimiser"])
    epoch = resumed.get("epoch", 0)
    while epoch < epochs and best.stale < patience:
        losses = train_epoch(epoch)
        number, fields = validate()
        epoch, loss = epoch + 1, float(np.mean(losses))
        run.history.append({"stage": stage.value, "epoch": epoch, "loss": loss, **fields})
        log.info(f"{stage.value} epoch", epoch=epoch, loss=loss, **fields)
        best.update(number, model)
        run.checkpoint(stage, epoch, best.to_state(key), optimiser, extra or {})
    if best.stale >= patience:
        log.info(f"{stage.value} early stop", epoch=epoch, best_validation=best.value)
    if best.weights is not None:
        model.load_state_dict(best.weights)


# ---- step 2: the localiser ------------------------------------------------------------------------


def _train_localiser(run: _Run, split: _Split, cfg: TrainConfig, rng: np.random.Generator,
                     device: torch.device) -> None:
    """Stage 1: the level localiser on heatmap targets; keeps the weights of the lowest mean
    validation error (the mean, unlike the median, sees wrong-level misses)."""
    localiser = run.localiser
    pairs = [p for s in split.samples for p in s.localiser]
    val_pairs = [(s, p) for s in split.val_samples for p in s.localiser[::2]]  # the unjittered ones
    opt = torch.optim.AdamW(localiser.parameters(), lr=cfg.lr, weight_decay=1e-4)

    def train_epoch(epoch: int) -> list[float]:
        localiser.train()
        order = rng.permutation(len(pairs))
        losses = []
        for b in tqdm(range(0, len(order), cfg.localiser_batch), desc=f"localiser epoch {epoch + 1}", leave=False):
            idx = order[b: b + cfg.localiser_batch]
            x = torch.from_numpy(np.stack([pairs[i][0] for i in idx]).astype(np.float32)).to(device)
            y = torch.from_numpy(np.stack([pairs[i][1] for i in idx]).astype(np.float32)).to(device)
            x = x * torch.empty(len(idx), 1, 1, 1, device=device).uniform_(0.85, 1.15)
            loss = _localiser_loss(localiser.logits(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    def validate() -> tuple[float, dict[str, Any]]:
        errors = np.array(_localiser_errors(localiser, val_pairs, device))
        median = float(np.median(errors)) if len(errors) else float("nan")
        mean = float(errors.mean()) if len(errors) else float("inf")
        return mean, {"val_median_error_mm": median, "val_mean_error_mm": mean,
                      "val_share_over_10mm": float((errors > 10).mean()) if len(errors) else None}

    _run_epochs(run, Stage.LOCALISER, cfg.localiser_epochs, cfg.patience, localiser, opt, train_epoch, validate)


@torch.no_grad()
def _localiser_errors(localiser: Localiser, val_pairs: list[tuple[StudySamples, LocaliserPair]],
                      device: torch.device) -> list[float]:
    """Pixel distance (x2 mm) between heatmap peaks and targets' peaks on validation images."""
    localiser.eval()
    errors = []
    for _, (image, target) in val_pairs:
        hm = localiser(torch.from_numpy(image.astype(np.float32))[None].to(device))[0].cpu().numpy()
        for k in range(len(LEVELS)):
            if target[k].max() < 0.5:
                continue
            p = np.array(np.unravel_index(int(np.argmax(hm[k])), hm[k].shape))
            t = np.array(np.unravel_index(int(np.argmax(target[k])), target[k].shape))
            errors.append(float(np.linalg.norm(p - t)) * LOCALISER_SPEC.mm_per_pixel)
    return errors


# ---- step 3: where the pipeline really places the crops ------------------------------------------------


def _crop_error_mm(run: _Run, runner: TorchRunner, split: _Split) -> dict[int, float]:
    """The median crop placement error per group (0 spinal, 1 foraminal, 2 subarticular), in mm:
    the grader checkpoint's when resuming the grader, else measured through the pipeline."""
    sigma_mm = run.resumed_stage(Stage.GRADER).get("sigma_mm") or _crop_errors(runner, split)
    log.info("crop placement error on validation (median mm); training jitter uses it",
             spinal=sigma_mm[0], foraminal=sigma_mm[1], subarticular=sigma_mm[2])
    return sigma_mm


def _crop_errors(runner: TorchRunner, split: _Split) -> dict[int, float]:
    """Median in-plane distance between the pipeline's crop centres and where training centres the
    same crops (``training.data.crop_center``), per group."""
    errors: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for instances, s in zip(split.val_instances, split.val_samples, strict=True):
        result = analyze_study(instances, runner, check_levels=False)
        canal = s.canal_points()
        for r in result.labels:
            target = crop_center(r.label, s.points, canal)
            if not isinstance(r, AssessedLabel) or target is None:
                continue
            frame = r.location.crop
            d = target - frame.center
            normal = np.cross(frame.u, frame.v)
            d = d - (d @ normal) * normal
            errors[CONDITION_GROUP[CONDITIONS.index(r.label.condition)]].append(float(np.linalg.norm(d)))
    return {g: float(np.median(v)) if v else 2.0 for g, v in errors.items()}


# ---- step 4: the grader --------------------------------------------------------------------------------


def _train_grader(run: _Run, runner: TorchRunner, split: _Split, sigma_mm: dict[int, float], cfg: TrainConfig,
                  rng: np.random.Generator, device: torch.device) -> None:
    """Stage 2: the grader with the competition loss, on crops jittered by the measured placement
    error, cosine learning rate; keeps the weights of the best validation score through the pipeline."""
    grader = run.grader
    sigma_px = {g: max(sigma_mm[g] / GRADER_SPEC.mm_per_pixel, 0.5) for g in range(3)}
    opt = torch.optim.AdamW(grader.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.grader_epochs)
    with warnings.catch_warnings():  # fast-forwarding warns that no optimiser step came first
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        for _ in range(run.resumed_stage(Stage.GRADER).get("epoch", 0)):
            sched.step()  # to the resumed epoch; the loop then restores the optimiser's saved state

    def train_epoch(epoch: int) -> list[float]:
        grader.train()
        order = rng.permutation(len(split.samples))
        losses = []
        for b in tqdm(range(0, len(order), cfg.batch_studies), desc=f"grader epoch {epoch + 1}", leave=False):
            batch = [split.samples[i] for i in order[b: b + cfg.batch_studies]]
            x, t, c, s = _grader_batch(batch, sigma_px, rng, train=True)
            if len(t) == 0:
                continue
            loss = grader_loss(grader.logits(x.to(device)), t.to(device), c.to(device), s.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        return losses

    def validate() -> tuple[float, dict[str, Any]]:
        probs, _ = _evaluate_pipeline(runner, split.val_instances, check_levels=False)
        score = competition_score(fill_not_assessed(probs, split.prior), split.val_targets)
        return score.total, {"val_score": score.total,
                             **{f"val_{k}": v for k, v in score.as_dict().items() if k != "total"}}

    _run_epochs(run, Stage.GRADER, cfg.grader_epochs, cfg.patience, grader, opt, train_epoch, validate,
                {"sigma_mm": sigma_mm})


def _evaluate_pipeline(runner: TorchRunner, studies: list[Instances],
                       check_levels: bool = True) -> tuple[np.ndarray, list[StudyResult]]:
    """Every study through the serving pipeline: (probabilities (n, 25, 3), NaN where not assessed;
    results). Before the level check is fitted, with ``check_levels=False``."""
    results = [analyze_study(instances, runner, check_levels=check_levels) for instances in studies]
    probs = np.stack([r.probabilities() for r in results])
    return probs, results


# ---- step 5: temperatures, the level check and the final metadata ----------------------------------------


def _calibrate(runner: TorchRunner, split: _Split) -> tuple[list[float], LevelFit]:
    """Fit a temperature per condition on validation and set it in the grader; fit the level check
    (``inference.level_check``) on the same studies' decoded levels."""
    probs, results = _evaluate_pipeline(runner, split.val_instances, check_levels=False)
    temperatures = fit_temperatures(probs, split.val_targets)
    runner.grader.temperature.copy_(torch.tensor(temperatures))
    return temperatures, fit_on_results(results, [s.canal_points() for s in split.val_samples])


def _validated(meta: ModelMetadata, runner: TorchRunner, split: _Split, temperatures: list[float]) -> ModelMetadata:
    """``meta`` completed: temperatures, class prior and the calibrated model's validation results."""
    probs, results = _evaluate_pipeline(runner, split.val_instances)
    score = competition_score(fill_not_assessed(probs, split.prior), split.val_targets)
    baseline = competition_score(split.prior, split.val_targets)
    loc_err = [e for r, s in zip(results, split.val_samples, strict=True) for e in _result_errors(r, s)]
    validation = {**meta.validation, "studies": len(split.val), "score": score.as_dict(),
                  "class_prior_score": baseline.as_dict(),
                  "median_level_error_mm": float(np.median(loc_err)) if loc_err else None,
                  "levels_not_localised": sum(r.localisation is not None and not r.levels for r in results)}
    return replace(meta, temperatures=tuple(temperatures),
                   class_prior=tuple(tuple(float(x) for x in row) for row in split.prior[0]),
                   validation=validation, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _result_errors(result: StudyResult, samples: StudySamples) -> list[float]:
    """Distance (mm) between the pipeline's canal point of each level and the marked one."""
    truth = samples.canal_points()
    predicted = {lv: np.array(result.levels[lv]) for lv in LEVELS if lv in result.levels}
    return level_error_mm(predicted, truth, np.array([1.0, 0.0, 0.0]))


# ---- the whole run ------------------------------------------------------------------------------------


def train(data: Path, run: Path, cfg: TrainConfig | None = None) -> Path:
    """Train on the RSNA layout at ``data``; write checkpoints and the final model under ``run``.

    A run folder with a state.pt is resumed at its stage and epoch."""
    cfg = cfg or TrainConfig()
    device = device_of(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    training = _open_run(run, device)
    split = _load_split(data, cfg, rng, device)
    meta = _metadata(split, cfg)
    if training.stage is Stage.LOCALISER:
        _train_localiser(training, split, cfg, rng, device)
    runner = TorchRunner(training.localiser, training.grader, ModelInfo(meta, ""), device)
    sigma_mm = _crop_error_mm(training, runner, split)
    _train_grader(training, runner, split, sigma_mm, cfg, rng, device)
    temperatures, level_fit = _calibrate(runner, split)
    meta = with_level_check(meta, level_fit)
    runner.info = ModelInfo(meta, "")  # validation below grades with the fitted level check, as serving will
    meta = _validated(meta, runner, split, temperatures)
    path = run / "model.pt"
    sha = save_model(path, training.localiser.cpu(), training.grader.cpu(), meta)
    log.info("model written", path=str(path), sha256=sha[:12], temperatures=[round(t, 2) for t in temperatures],
             val_score=meta.validation["score"]["total"],
             class_prior_score=meta.validation["class_prior_score"]["total"])
    return path
