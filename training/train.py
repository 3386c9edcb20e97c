"""Training: level localiser, then grader on crops jittered by the localiser's real error, then
temperature calibration per condition. Checkpoints every epoch; early stopping; resumable.

Training reads only the prepared cache (``lumbar-node prepare``, ``training.cache``) through torch
DataLoaders (``training.loader``); validation through the serving pipeline reads the validation
studies' DICOM files one study at a time (``training.validation``).

    RUN/state.pt     everything needed to resume (stage, epoch, weights, optimiser, history)
    RUN/model.pt     the final model with its metadata (what ``export`` and ``evaluate`` read)
    RUN/history.json per-epoch losses, validation metrics, samples and seconds (training, validation)
    RUN/config.json  the training configuration (augmentation included) and the cache it read
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from numpy.typing import NDArray
from torch.nn import functional as F
from tqdm import tqdm

from inference import __version__
from inference.labels import CONDITIONS, LABELS, LEVELS, SEVERITY_WEIGHTS, ConditionGroup
from inference.model import ModelInfo, ModelMetadata, Offset
from training.augment import AugmentConfig
from training.cache import Manifest, PrepareSpec, load_array, open_cache, study_points
from training.data import canal_points, local_components
from training.distributed import World
from training.level_calibration import LevelFit, fit_on_results, with_level_check
from training.loader import (
    GraderDataset,
    GraderIndex,
    LocaliserDataset,
    LocaliserIndex,
    StudyBatchSampler,
    collate_grader,
    localiser_batches,
    make_loader,
    set_epoch,
)
from training.memory import bound_heap_growth
from training.metrics import competition_score, fill_not_assessed, prior_baseline
from training.models import CONDITION_GROUP, GraderNetwork, Localiser
from training.precision import Precision, Stepper
from training.presets import PresetConfig, resolve
from training.report import OOF_FILE, describe_device, write_oof
from training.rsna import LayoutError, fold_study_ids, split_study_ids
from training.runner import MODEL_NAME, TorchRunner, save_model
from training.validation import ValidationSet, crop_errors, evaluate_pipeline, result_errors

log = structlog.stdlib.get_logger(__name__)

WEIGHTS = torch.tensor(SEVERITY_WEIGHTS)


def default_workers() -> int:
    """DataLoader worker processes by default: min(4, CPU count)."""
    return max(1, min(4, os.cpu_count() or 1))


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
    folds: int = 0  # K-fold cross-validation (training.folds): K >= 2 validates on fold ``fold``; 0: val_fraction
    fold: int = 0
    device: str = "auto"
    training_data: str = "synthetic lumbar MRI phantom (lumbar-node phantom); not clinical data"
    workers: int = field(default_factory=default_workers)  # DataLoader worker processes (0: none)
    precision: str = Precision.AUTO.value  # training.precision.Precision: auto, fp32, bf16 or fp16
    accumulate: int = 1  # micro-batches per optimiser step
    compile: bool = False  # torch.compile the training forward
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    preset: str = "small"  # training.presets.Preset
    grader_crop: tuple[str, ...] = ()  # --grader-crop overrides, GROUP=SIZE_MM,PIXELS,SLICES
    init_weights: str | None = None  # a state dict for the grader's backbone (training.init_weights)

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "augment"}, "augment": self.augment.to_dict(),
                "grader_crop": list(self.grader_crop)}

    def model(self) -> PresetConfig:
        """The preset's crops and networks with the overrides (ValueError when they do not fit)."""
        return resolve(self.preset, self.grader_crop)

    def prepare_spec(self) -> PrepareSpec:
        """The cache spec this training reads."""
        return PrepareSpec(model=self.model().spec)


# ---- losses, batches, calibration ------------------------------------------------------------------


def _localiser_loss(pred_logits: torch.Tensor, target: torch.Tensor, world: World | None = None) -> torch.Tensor:
    """The heatmap loss: a mean over pixels (over the global batch's, with several processes)."""
    pred = torch.sigmoid(pred_logits)
    terms = (pred - target) ** 2 * (1 + 30 * target)
    if world is None or not world.distributed:
        return terms.mean()
    return world.mean_of_parts(terms.sum().reshape(1), torch.full((1,), float(terms.numel()), device=terms.device))


def grader_loss(logits: torch.Tensor, targets: torch.Tensor, conditions: torch.Tensor,
                studies: torch.Tensor, world: World | None = None) -> torch.Tensor:
    """The competition loss: class-weighted cross-entropy per condition group (normalised by the
    weights) plus the any-severe-spinal binary term per study; the mean of the four parts.

    With several processes (``world``) each part is normalised by the global batch's weights, so
    that the ranks' losses average to the global batch's loss and DDP's averaged gradient is its
    gradient (a rank's share is whole studies: the any-severe term is the study's own)."""
    return (world or World()).mean_of_parts(*grader_loss_parts(logits, targets, conditions, studies))


def grader_loss_parts(logits: torch.Tensor, targets: torch.Tensor, conditions: torch.Tensor,
                      studies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``grader_loss``'s four weighted means as numerators and denominators (4,) each: the three
    groups' weighted cross-entropy and the any-severe-spinal term; a part absent from the batch
    has 0 over 0."""
    group = torch.tensor(CONDITION_GROUP, device=logits.device)[conditions]
    own = logits[torch.arange(len(logits)), group]
    logp = F.log_softmax(own, dim=1)
    w = WEIGHTS.to(logits.device)[targets]
    nll = -logp[torch.arange(len(logp)), targets]
    numerators, denominators = [], []
    for g in range(3):
        m = group == g
        numerators.append((w[m] * nll[m]).sum())
        denominators.append(w[m].sum())
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
        numerators.append((torch.stack(terms) * tw).sum())
        denominators.append(tw.sum())
    else:
        numerators.append(logits.new_zeros(()))
        denominators.append(logits.new_zeros(()))
    return torch.stack(numerators), torch.stack(denominators)


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
    """The run's studies split by study (as ``split_studies`` splits the data folder's studies), and
    the small arrays training and validation need of them; the samples stay in the cache."""

    cache: Path
    train: list[int]  # training studies with training data
    val: ValidationSet  # validation studies with training data
    prior: NDArray[np.float64]  # (n_val, 25, 3): the training split's class frequencies


def _load_split(cache: Path, cfg: TrainConfig, device: torch.device) -> _Split:
    """The prepared cache at ``cache``, split by study."""
    manifest = open_cache(cache, cfg.prepare_spec())
    ids = list(manifest.studies)
    train_ids, val_ids = (fold_study_ids(ids, cfg.folds, cfg.fold, cfg.seed) if cfg.folds else
                          split_study_ids(ids, cfg.val_fraction, cfg.seed))
    ok = set(manifest.ok())
    train_ids, val_ids = [i for i in train_ids if i in ok], [i for i in val_ids if i in ok]
    log.info("training data", device=str(device), train_studies=len(train_ids), validation_studies=len(val_ids),
             left_out=manifest.left_out(), cache=str(cache), data=manifest.data)
    if not train_ids or not val_ids:
        raise LayoutError(f"{manifest.data}: no usable {'training' if not train_ids else 'validation'} study "
                          f"(of {len(manifest.studies)} studies; left out: {manifest.left_out()})")
    data = Path(manifest.data)
    if not data.is_dir():
        raise LayoutError(f"{cache}: its data folder {data} is not there (validation reads its DICOM files): "
                          "prepare the cache again from where the data is now")
    train_targets = _targets(cache, train_ids)
    val_targets = _targets(cache, val_ids)
    prior = prior_baseline(val_targets, train_targets=train_targets)
    return _Split(cache, train_ids, ValidationSet(cache, data, tuple(val_ids), val_targets), prior)


def _targets(cache: Path, study_ids: list[int]) -> NDArray[np.int64]:
    return np.stack([load_array(cache, sid, "targets", mmap=False).astype(np.int64) for sid in study_ids])


def _offsets(cache: Path, study_ids: list[int]) -> dict[ConditionGroup, Offset]:
    """Median (lateral, posterior, head) of each group's marked point from the canal point at its level."""
    found: dict[ConditionGroup, list[Offset]] = {g: [] for g in ConditionGroup}
    for sid in study_ids:
        points = study_points(cache, sid)
        canal = canal_points(points)
        for label, point in points.items():
            if label.level in canal and label.condition.group is not ConditionGroup.SPINAL:
                found[label.condition.group].append(local_components(label, point - canal[label.level]))
    return {g: _triple(np.median(v, axis=0)) if v else (0.0, 0.0, 0.0) for g, v in found.items()}


def _triple(values: NDArray[np.float64]) -> tuple[float, float, float]:
    return float(values[0]), float(values[1]), float(values[2])


def _metadata(split: _Split, cfg: TrainConfig) -> ModelMetadata:
    """The model's metadata as far as training knows it before calibration and validation."""
    model = cfg.model()
    return ModelMetadata(name=MODEL_NAME, version=__version__, training_data=cfg.training_data,
                         offsets_mm=_offsets(split.cache, split.train), train_studies=len(split.train), seed=cfg.seed,
                         preprocessing=model.spec.to_preprocessing(), preset=cfg.preset,
                         networks=model.networks.to_json())


# ---- the run folder and the shared epoch loop --------------------------------------------------------


@dataclass
class _Run:
    """A run folder's networks, history and the checkpoint it resumed from; writes the checkpoints."""

    folder: Path
    localiser: Localiser
    grader: GraderNetwork
    resumed: dict[str, Any] = field(default_factory=dict)  # state.pt as found ({} for a new run)
    history: list[dict[str, Any]] = field(default_factory=list)
    world: World = field(default_factory=World)  # the training processes (only rank 0 writes)

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
        """Write state.pt (everything to resume after ``epoch`` of ``stage``) and history.json (rank 0
        only; state.pt whole or not at all: written beside and renamed, a kill cannot leave half)."""
        if not self.world.main:
            return
        part = self.state_path.with_suffix(".pt.part")
        torch.save({"stage": stage.value, "epoch": epoch, "localiser": self.localiser.state_dict(),
                    "grader": self.grader.state_dict(), "optimiser": optimiser.state_dict(), "best": best,
                    "history": self.history, **extra}, part)
        os.replace(part, self.state_path)
        (self.folder / "history.json").write_text(json.dumps(self.history, indent=1))


def _open_run(folder: Path, device: torch.device, cfg: TrainConfig, world: World | None = None) -> _Run:
    """The run in ``folder``: new networks of the configured preset (the grader's backbone from
    ``cfg.init_weights`` when given), or those of its state.pt with its history (written by any
    number of processes: it holds the unwrapped networks). Rank 0 reads it and sends it to the
    others (the run folder need not be shared between machines)."""
    world = world or World()
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / "state.pt"
    state: dict[str, Any] = (torch.load(state_path, map_location="cpu", weights_only=False)
                             if world.main and state_path.exists() else {})
    state = world.broadcast(state)
    if state:
        log.info("resuming from checkpoint", path=str(state_path), stage=state["stage"], epoch=state["epoch"])
    localiser, grader = cfg.model().networks.build()
    run = _Run(folder, localiser.to(device), grader.to(device), state, state.get("history", []), world)
    if state:
        run.localiser.load_state_dict(state["localiser"])
        run.grader.load_state_dict(state["grader"])
    elif cfg.init_weights:
        from training.init_weights import init_grader

        init_grader(run.grader, Path(cfg.init_weights))
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


@dataclass
class _Epoch:
    """What a training epoch did: its batches' losses, the samples seen, and the time spent waiting
    for the DataLoader (for the first batch: the workers' start and the first prefetch)."""

    losses: list[float] = field(default_factory=list)
    samples: int = 0
    first_batch_seconds: float = 0.0
    loader_wait_seconds: float = 0.0

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """The loader's batches, timing the waits."""
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            waited = time.perf_counter() - t0
            if not self.first_batch_seconds:
                self.first_batch_seconds = waited
            self.loader_wait_seconds += waited
            yield batch

    def timing(self) -> dict[str, float]:
        return {"samples": self.samples, "first_batch_seconds": round(self.first_batch_seconds, 3),
                "loader_wait_seconds": round(self.loader_wait_seconds, 3)}


TrainEpoch = Callable[[int], _Epoch]  # epoch index -> what it did
Validate = Callable[[], tuple[float, dict[str, Any]]]  # -> (the number to minimise, history.json fields)


def _run_epochs(run: _Run, stage: Stage, epochs: int, patience: int, model: torch.nn.Module,
                optimiser: torch.optim.Optimizer, train_epoch: TrainEpoch, validate: Validate,
                extra: dict[str, Any] | None = None) -> None:
    """The epoch loop of both stages: train an epoch, validate, keep the best weights, checkpoint;
    stop after ``epochs`` or ``patience`` epochs without improvement; leave ``model`` at its best.

    Resumes from the run's checkpoint when it was written in this stage: after its epoch, with its
    optimiser state and best so far (no epoch is repeated). ``extra`` goes into every checkpoint.
    With several processes, rank 0 validates and broadcasts the number (every rank keeps the same
    best weights and stops at the same epoch); losses are averaged and samples summed over ranks."""
    resumed = run.resumed_stage(stage)
    key = _BEST_KEY[stage]
    best = _Best.from_state(resumed.get("best"), key)
    if resumed.get("optimiser"):
        optimiser.load_state_dict(resumed["optimiser"])
    epoch = resumed.get("epoch", 0)
    while epoch < epochs and best.stale < patience:
        t0 = time.perf_counter()
        done = train_epoch(epoch)
        done.losses, done.samples = run.world.mean_sum(done.losses, done.samples)
        t1 = time.perf_counter()
        number, fields = validate() if run.world.main else (0.0, {})
        number = run.world.broadcast(number)
        epoch, loss = epoch + 1, float(np.mean(done.losses))
        timing = {**done.timing(), "train_seconds": round(t1 - t0, 3),
                  "validation_seconds": round(time.perf_counter() - t1, 3)}
        run.history.append({"stage": stage.value, "epoch": epoch, "loss": loss, **fields, **timing})
        log.info(f"{stage.value} epoch", epoch=epoch, loss=loss, **fields)
        best.update(number, model)
        run.checkpoint(stage, epoch, best.to_state(key), optimiser, extra or {})
    if best.stale >= patience:
        log.info(f"{stage.value} early stop", epoch=epoch, best_validation=best.value)
    if best.weights is not None:
        model.load_state_dict(best.weights)


def _stepper(net: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device,
             world: World) -> Stepper:
    """The training steps of ``net``: precision, accumulation and compile as configured, in DDP
    with several processes."""
    step = Stepper(net, opt, device, cfg.precision, cfg.accumulate, cfg.compile, world.wrap)
    log.info("training steps", network=type(net).__name__, **step.settings())
    return step


# ---- step 2: the localiser ------------------------------------------------------------------------


def _train_localiser(run: _Run, split: _Split, cfg: TrainConfig, device: torch.device) -> None:
    """Stage 1: the level localiser on heatmap targets; keeps the weights of the lowest mean
    validation error (the mean, unlike the median, sees wrong-level misses)."""
    localiser = run.localiser
    index = LocaliserIndex.build(split.cache, split.train)
    data = LocaliserDataset(split.cache, index, train=True, augment=cfg.augment, seed=cfg.seed)
    world = run.world
    loader = make_loader(data, localiser_batches(len(index), cfg.localiser_batch, cfg.seed, shuffle=True,
                                                 rank=world.rank, world=world.size), cfg.workers, device)
    val_index = LocaliserIndex.build(split.cache, list(split.val.study_ids), jittered=False)  # the served centre
    val_loader = make_loader(LocaliserDataset(split.cache, val_index, train=False),  # no augmentation: read here
                             localiser_batches(len(val_index), cfg.localiser_batch, cfg.seed, shuffle=False), 0, device)
    opt = torch.optim.AdamW(localiser.parameters(), lr=cfg.lr, weight_decay=1e-4)
    step = _stepper(localiser, opt, cfg, device, world)

    def train_epoch(epoch: int) -> _Epoch:
        localiser.train()
        set_epoch(loader, epoch)
        done = _Epoch()
        step.begin_epoch(len(loader))
        for x, y in tqdm(done.batches(loader), total=len(loader), desc=f"localiser epoch {epoch + 1}", leave=False,
                         disable=not world.main):
            with step.forward():
                logits = step.net(step.input(x))
            loss = _localiser_loss(logits, y.to(device, non_blocking=True), world)
            step.backward(loss)
            done.losses.append(loss.item())
            done.samples += len(x)
        step.end_epoch()
        return done

    def validate() -> tuple[float, dict[str, Any]]:
        errors = np.array(_localiser_errors(localiser, val_loader, device, cfg.model().spec.localiser.mm_per_pixel))
        median = float(np.median(errors)) if len(errors) else float("nan")
        mean = float(errors.mean()) if len(errors) else float("inf")
        return mean, {"val_median_error_mm": median, "val_mean_error_mm": mean,
                      "val_share_over_10mm": float((errors > 10).mean()) if len(errors) else None}

    _run_epochs(run, Stage.LOCALISER, cfg.localiser_epochs, cfg.patience, localiser, opt, train_epoch, validate)


@torch.no_grad()
def _localiser_errors(localiser: Localiser, val_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      device: torch.device, mm_per_pixel: float) -> list[float]:
    """Distance (mm) between heatmap peaks and targets' peaks on validation images."""
    localiser.eval()
    errors = []
    for images, targets in val_loader:
        heatmaps = localiser(images.to(device)).cpu().numpy()
        for hm, target in zip(heatmaps, targets.numpy(), strict=True):
            for k in range(len(LEVELS)):
                if target[k].max() < 0.5:
                    continue
                p = np.array(np.unravel_index(int(np.argmax(hm[k])), hm[k].shape))
                t = np.array(np.unravel_index(int(np.argmax(target[k])), target[k].shape))
                errors.append(float(np.linalg.norm(p - t)) * mm_per_pixel)
    return errors


# ---- step 3: where the pipeline really places the crops ------------------------------------------------


def _crop_error_mm(run: _Run, runner: TorchRunner, split: _Split) -> dict[int, float]:
    """The median crop placement error per group (0 spinal, 1 foraminal, 2 subarticular), in mm:
    the grader checkpoint's when resuming the grader, else measured through the pipeline."""
    sigma_mm = run.resumed_stage(Stage.GRADER).get("sigma_mm") or crop_errors(runner, split.val)
    log.info("crop placement error on validation (median mm); training jitter uses it",
             spinal=sigma_mm[0], foraminal=sigma_mm[1], subarticular=sigma_mm[2])
    return sigma_mm


# ---- step 4: the grader --------------------------------------------------------------------------------


def _train_grader(run: _Run, runner: TorchRunner, split: _Split, sigma_mm: dict[int, float], cfg: TrainConfig,
                  device: torch.device) -> None:
    """Stage 2: the grader with the competition loss, on crops jittered by the measured placement
    error, cosine learning rate; keeps the weights of the best validation score through the pipeline.
    A batch holds every labelled window of ``batch_studies`` studies (the any-severe term is per study)."""
    grader = run.grader
    spec = cfg.prepare_spec()
    sigma_px = {g: max(sigma_mm[g] / spec.model.grader(group).mm_per_pixel, 0.5)
                for g, group in enumerate(ConditionGroup)}
    index = GraderIndex.build(split.cache, split.train, spec)
    data = GraderDataset(split.cache, index, sigma_px, cfg.augment, cfg.seed, spec)
    world = run.world
    loader = make_loader(data, StudyBatchSampler(index.starts, cfg.batch_studies, cfg.seed, rank=world.rank,
                                                 world=world.size), cfg.workers, device, collate_grader)
    opt = torch.optim.AdamW(grader.parameters(), lr=cfg.lr, weight_decay=1e-4)
    step = _stepper(grader, opt, cfg, device, world)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.grader_epochs)
    with warnings.catch_warnings():  # fast-forwarding warns that no optimiser step came first
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        for _ in range(run.resumed_stage(Stage.GRADER).get("epoch", 0)):
            sched.step()  # to the resumed epoch; the loop then restores the optimiser's saved state

    def train_epoch(epoch: int) -> _Epoch:
        grader.train()
        set_epoch(loader, epoch)
        done = _Epoch()
        step.begin_epoch(len(loader))
        for x, t, c, s in tqdm(done.batches(loader), total=len(loader), desc=f"grader epoch {epoch + 1}", leave=False,
                               disable=not world.main):
            if len(t) == 0:
                continue
            with step.forward():
                logits = step.net(*[step.input(xs) for xs in x])  # one tensor per crop shape
            loss = grader_loss(logits, t.to(device), c.to(device), s.to(device), world)
            step.backward(loss)
            done.losses.append(loss.item())
            done.samples += len(t)
        step.end_epoch()
        sched.step()
        return done

    def validate() -> tuple[float, dict[str, Any]]:
        probs, _ = evaluate_pipeline(runner, split.val, check_levels=False)
        score = competition_score(fill_not_assessed(probs, split.prior), split.val.targets)
        return score.total, {"val_score": score.total,
                             **{f"val_{k}": v for k, v in score.as_dict().items() if k != "total"}}

    _run_epochs(run, Stage.GRADER, cfg.grader_epochs, cfg.patience, grader, opt, train_epoch, validate,
                {"sigma_mm": sigma_mm})


# ---- step 5: temperatures, the level check and the final metadata ----------------------------------------


def _calibrate(runner: TorchRunner, split: _Split) -> tuple[list[float], LevelFit]:
    """Fit a temperature per condition on validation and set it in the grader; fit the level check
    (``inference.level_check``) on the same studies' decoded levels."""
    probs, results = evaluate_pipeline(runner, split.val, check_levels=False)
    temperatures = fit_temperatures(probs, split.val.targets)
    runner.grader.temperature.copy_(torch.tensor(temperatures))
    return temperatures, fit_on_results(results, [split.val.canal(sid) for sid in split.val.study_ids])


def _validated(meta: ModelMetadata, runner: TorchRunner, split: _Split, temperatures: list[float],
               oof: Path | None = None) -> ModelMetadata:
    """``meta`` completed: temperatures, class prior and the calibrated model's validation results;
    the validation studies' predictions written to ``oof`` (``training.report.write_oof``)."""
    probs, results = evaluate_pipeline(runner, split.val)
    if oof is not None:
        write_oof(oof, split.val.study_ids, split.val.targets, probs, split.prior[0], temperatures)
    score = competition_score(fill_not_assessed(probs, split.prior), split.val.targets)
    baseline = competition_score(split.prior, split.val.targets)
    loc_err = [e for r, sid in zip(results, split.val.study_ids, strict=True)
               for e in result_errors(r, split.val.canal(sid))]
    validation = {**meta.validation, "studies": len(split.val), "score": score.as_dict(),
                  "class_prior_score": baseline.as_dict(),
                  "median_level_error_mm": float(np.median(loc_err)) if loc_err else None,
                  "levels_not_localised": sum(r.localisation is not None and not r.levels for r in results)}
    return replace(meta, temperatures=tuple(temperatures),
                   class_prior=tuple(_triple(row) for row in split.prior[0]),
                   validation=validation, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


# ---- the whole run ------------------------------------------------------------------------------------


def train(cache: Path, run: Path, cfg: TrainConfig | None = None) -> Path:
    """Train on the prepared cache at ``cache`` (``lumbar-node prepare``); write checkpoints and
    the final model under ``run``. A run folder with a state.pt is resumed at its stage and epoch."""
    cfg = cfg or TrainConfig()
    world = World.from_env()  # several processes under torchrun (training.distributed)
    device = world.device(cfg.device)
    world.start(device)
    try:
        return _train(cache, run, cfg, world, device)
    finally:
        world.stop()


def _train(cache: Path, run: Path, cfg: TrainConfig, world: World, device: torch.device) -> Path:
    bound_heap_growth()
    torch.manual_seed(cfg.seed)
    training = _open_run(run, device, cfg, world)
    split = _load_split(cache, cfg, device)
    if world.main:
        (run / "config.json").write_text(json.dumps({**cfg.to_json(), "world_size": world.size,
                                                     "cache": str(Path(cache).resolve()),
                                                     "spec_hash": Manifest.load(cache).spec.hash,
                                                     "device_used": describe_device(device)}, indent=1))
    meta = _metadata(split, cfg)
    if training.stage is Stage.LOCALISER:
        _train_localiser(training, split, cfg, device)
    runner = TorchRunner(training.localiser, training.grader, ModelInfo(meta, ""), device)
    sigma_mm = world.broadcast(_crop_error_mm(training, runner, split) if world.main else None)
    _train_grader(training, runner, split, sigma_mm, cfg, device)
    path = run / "model.pt"
    if not world.main:
        world.barrier()  # rank 0 calibrates, validates and writes the model
        return path
    temperatures, level_fit = _calibrate(runner, split)
    meta = with_level_check(meta, level_fit)
    runner.info = ModelInfo(meta, "")  # validation below grades with the fitted level check, as serving will
    meta = _validated(meta, runner, split, temperatures, run / OOF_FILE)
    sha = save_model(path, training.localiser.cpu(), training.grader.cpu(), meta)
    log.info("model written", path=str(path), sha256=sha[:12], temperatures=[round(t, 2) for t in temperatures],
             val_score=meta.validation["score"]["total"],
             class_prior_score=meta.validation["class_prior_score"]["total"])
    world.barrier()
    return path
