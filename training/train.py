"""Training: level localiser, then grader on crops jittered by the localiser's real error, then
temperature calibration per condition. Checkpoints every epoch; early stopping; resumable.

    RUN/state.pt     everything needed to resume (stage, epoch, weights, optimiser, history)
    RUN/model.pt     the final model with its metadata (what ``export`` and ``evaluate`` read)
    RUN/history.json per-epoch losses and validation metrics
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from dicom_node import __version__
from inference.analyze import ModelInfo, StudyResult, analyze_study
from inference.labels import CONDITIONS, LABEL_COLUMNS, LABELS, LEVELS, SEVERITY_WEIGHTS, ConditionGroup
from inference.levels import GRADER_SPEC, LOCALISER_SPEC
from training.data import JITTER_PX, StudySamples, crop_center, level_error_mm, local_components, study_samples, window_crop
from training.metrics import competition_score, fill_not_assessed, prior_baseline
from training.models import CONDITION_GROUP, Grader, Localiser
from training.rsna import StudyRecord, load_rsna, read_instances, split_studies
from training.runner import MODEL_NAME, TorchRunner, device_of, save_model

WEIGHTS = torch.tensor(SEVERITY_WEIGHTS)


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


def _info(offsets: dict[str, tuple[float, float, float]], data: str) -> ModelInfo:
    return ModelInfo(MODEL_NAME, __version__, "", data, offsets)


def _offsets(samples: list[StudySamples]) -> dict[str, tuple[float, float, float]]:
    """Median (lateral, posterior, head) of each group's marked point from the canal point at its level."""
    found: dict[str, list[tuple[float, float, float]]] = {g.value: [] for g in ConditionGroup}
    for s in samples:
        canal = s.canal_points()
        for label, point in s.points.items():
            if label.level in canal and label.condition.group is not ConditionGroup.SPINAL:
                found[label.condition.group.value].append(local_components(label, point - canal[label.level]))
    return {g: (tuple(float(x) for x in np.median(v, axis=0)) if v else (0.0, 0.0, 0.0)) for g, v in found.items()}


def _localiser_loss(pred_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred = torch.sigmoid(pred_logits)
    return ((pred - target) ** 2 * (1 + 30 * target)).mean()


def grader_loss(logits: torch.Tensor, targets: torch.Tensor, conditions: torch.Tensor, studies: torch.Tensor) -> torch.Tensor:
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


def _grader_batch(batch: list[StudySamples], sigma_px: dict[int, float], rng: np.random.Generator, train: bool):
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


def _evaluate_pipeline(runner: TorchRunner, val: list[tuple[StudyRecord, list]]) -> tuple[np.ndarray, list[StudyResult]]:
    results = [analyze_study(instances, runner) for _, instances in val]
    probs = np.stack([r.probabilities() for r in results])
    return probs, results


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


def train(data: Path, run: Path, cfg: TrainConfig | None = None, log=print) -> Path:  # noqa: ANN001, C901
    """Train on the RSNA layout at ``data``; write checkpoints and the final model under ``run``."""
    cfg = cfg or TrainConfig()
    run.mkdir(parents=True, exist_ok=True)
    device = device_of(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    state_path = run / "state.pt"
    state: dict[str, Any] = torch.load(state_path, weights_only=False) if state_path.exists() else {}
    if state:
        log(f"resuming from {state_path}: stage {state['stage']}, epoch {state['epoch']}")
    records = load_rsna(data)
    train_recs, val_recs = split_studies(records, cfg.val_fraction, cfg.seed)
    log(f"device {device}; {len(train_recs)} training and {len(val_recs)} validation studies from {data}")

    samples = [study_samples(r, rng) for r in tqdm(train_recs, desc="loading training studies", leave=False)]
    val_samples = [study_samples(r, rng) for r in tqdm(val_recs, desc="loading validation studies", leave=False)]
    val = [(r, read_instances(r)) for r in val_recs]
    offsets = _offsets(samples)
    train_targets = np.stack([s.targets for s in samples])
    prior = prior_baseline(np.stack([s.targets for s in val_samples]), train_targets=train_targets)

    localiser, grader = Localiser().to(device), Grader().to(device)
    history: list[dict[str, Any]] = state.get("history", [])
    stage, start = state.get("stage", "localiser"), state.get("epoch", 0)
    if state:
        localiser.load_state_dict(state["localiser"])
        grader.load_state_dict(state["grader"])

    def checkpoint(stage_name: str, epoch: int, best: dict[str, Any], optimiser: torch.optim.Optimizer, extra: dict) -> None:
        torch.save({"stage": stage_name, "epoch": epoch, "localiser": localiser.state_dict(),
                    "grader": grader.state_dict(), "optimiser": optimiser.state_dict(), "best": best,
                    "history": history, **extra}, state_path)
        (run / "history.json").write_text(json.dumps(history, indent=1))

    # ---- stage 1: localiser --------------------------------------------------------------------
    if stage == "localiser":
        pairs = [p for s in samples for p in s.localiser]
        val_pairs = [(s, p) for s in val_samples for p in s.localiser[::2]]  # the unjittered ones
        opt = torch.optim.AdamW(localiser.parameters(), lr=cfg.lr, weight_decay=1e-4)
        best = state.get("best", {"error": float("inf"), "weights": None, "stale": 0})
        if state.get("optimiser") and state["stage"] == "localiser":
            opt.load_state_dict(state["optimiser"])
        for epoch in range(start, cfg.localiser_epochs):
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
            errors = np.array(_localiser_errors(localiser, val_pairs, device))
            median = float(np.median(errors)) if len(errors) else float("nan")
            mean = float(errors.mean()) if len(errors) else float("inf")  # sees wrong-level misses
            history.append({"stage": "localiser", "epoch": epoch + 1, "loss": float(np.mean(losses)),
                            "val_median_error_mm": median, "val_mean_error_mm": mean,
                            "val_share_over_10mm": float((errors > 10).mean()) if len(errors) else None})
            log(f"localiser epoch {epoch + 1}: loss {np.mean(losses):.4f}, validation error median {median:.2f} mm, "
                f"mean {mean:.2f} mm, {100 * (errors > 10).mean():.1f}% over 10 mm")
            if mean < best["error"]:
                best = {"error": mean, "weights": {k: v.clone() for k, v in localiser.state_dict().items()}, "stale": 0}
            else:
                best["stale"] += 1
            checkpoint("localiser", epoch + 1, best, opt, {})
            if best["stale"] >= cfg.patience:
                log("localiser: early stop")
                break
        if best["weights"] is not None:
            localiser.load_state_dict(best["weights"])
        stage, start = "grader", 0
        state = {}

    # ---- stage 2: grader, on crops jittered by the localiser's real error -----------------------
    runner = TorchRunner(localiser, grader, _info(offsets, cfg.training_data), device)
    sigma_mm = state.get("sigma_mm") or _crop_errors(runner, val, val_samples)
    sigma_px = {g: max(sigma_mm[g] / GRADER_SPEC.mm_per_pixel, 0.5) for g in range(3)}
    log(f"crop placement error on validation (median, mm): spinal {sigma_mm[0]:.2f}, "
        f"foraminal {sigma_mm[1]:.2f}, subarticular {sigma_mm[2]:.2f}; training jitter uses them")
    opt = torch.optim.AdamW(grader.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.grader_epochs)
    best = state.get("best", {"score": float("inf"), "weights": None, "stale": 0})
    if state.get("optimiser") and state.get("stage") == "grader":
        opt.load_state_dict(state["optimiser"])
        for _ in range(start):
            sched.step()
    val_targets = np.stack([np.array(r.targets()) for r in val_recs])
    for epoch in range(start, cfg.grader_epochs):
        grader.train()
        order = rng.permutation(len(samples))
        losses = []
        for b in tqdm(range(0, len(order), cfg.batch_studies), desc=f"grader epoch {epoch + 1}", leave=False):
            batch = [samples[i] for i in order[b: b + cfg.batch_studies]]
            x, t, c, s = _grader_batch(batch, sigma_px, rng, train=True)
            if len(t) == 0:
                continue
            loss = grader_loss(grader.logits(x.to(device)), t.to(device), c.to(device), s.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        probs, _ = _evaluate_pipeline(runner, val)
        score = competition_score(fill_not_assessed(probs, prior), val_targets)
        history.append({"stage": "grader", "epoch": epoch + 1, "loss": float(np.mean(losses)),
                        "val_score": score.total, **{f"val_{k}": v for k, v in score.as_dict().items() if k != "total"}})
        log(f"grader epoch {epoch + 1}: loss {np.mean(losses):.4f}, validation score {score.total:.4f}")
        if score.total < best["score"]:
            best = {"score": score.total, "weights": {k: v.clone() for k, v in grader.state_dict().items()}, "stale": 0}
        else:
            best["stale"] += 1
        checkpoint("grader", epoch + 1, best, opt, {"sigma_mm": sigma_mm})
        if best["stale"] >= cfg.patience:
            log("grader: early stop")
            break
    if best["weights"] is not None:
        grader.load_state_dict(best["weights"])

    # ---- stage 3: temperature per condition, on validation ---------------------------------------
    probs, results = _evaluate_pipeline(runner, val)
    temperatures = fit_temperatures(probs, val_targets)
    grader.temperature.copy_(torch.tensor(temperatures))
    probs, results = _evaluate_pipeline(runner, val)
    score = competition_score(fill_not_assessed(probs, prior), val_targets)
    baseline = competition_score(prior, val_targets)
    loc_err = [e for r, s in zip(results, val_samples, strict=True) for e in _result_errors(r, s)]
    meta = {
        "name": MODEL_NAME, "version": __version__, "training_data": cfg.training_data,
        "label_columns": list(LABEL_COLUMNS), "classes": ["Normal/Mild", "Moderate", "Severe"],
        "conditions": [c.key for c in CONDITIONS],
        "preprocessing": {"localiser": asdict(LOCALISER_SPEC), "grader": asdict(GRADER_SPEC),
                          "intensity": "per volume (value - p1) / (p99.5 - p1)",
                          "localiser_input": "3 central sagittal slices, columns posterior, rows to the feet",
                          "crops": "inference.levels.crop_axes; right side mirrored"},
        "offsets_mm": offsets, "temperatures": temperatures,
        "class_prior": prior[0].tolist(),
        "validation": {"studies": len(val_recs), "score": score.as_dict(), "class_prior_score": baseline.as_dict(),
                       "median_level_error_mm": float(np.median(loc_err)) if loc_err else None},
        "train_studies": len(train_recs), "seed": cfg.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    sha = save_model(run / "model.pt", localiser.cpu(), grader.cpu(), meta)
    log(f"calibrated temperatures {np.round(temperatures, 2).tolist()}; validation score {score.total:.4f} "
        f"(class prior {baseline.total:.4f}); model {run / 'model.pt'} sha256 {sha[:12]}")
    return run / "model.pt"


@torch.no_grad()
def _localiser_errors(localiser: Localiser, val_pairs: list, device: torch.device) -> list[float]:
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


def _result_errors(result: StudyResult, samples: StudySamples) -> list[float]:
    truth = samples.canal_points()
    predicted = {lv: np.array(result.levels[lv.value]) for lv in LEVELS if lv.value in result.levels}
    return level_error_mm(predicted, truth, np.array([1.0, 0.0, 0.0]))


def _crop_errors(runner: TorchRunner, val: list, val_samples: list[StudySamples]) -> dict[int, float]:
    """Median in-plane distance between the pipeline's crop centres and where training centres the
    same crops (``training.data.crop_center``), per group."""
    errors: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for (_, instances), s in zip(val, val_samples, strict=True):
        result = analyze_study(instances, runner)
        canal = s.canal_points()
        for r in result.labels:
            target = crop_center(r.label, s.points, canal)
            if r.location is None or target is None:
                continue
            frame = r.location.crop
            d = target - frame.center
            normal = np.cross(frame.u, frame.v)
            d = d - (d @ normal) * normal
            errors[CONDITION_GROUP[CONDITIONS.index(r.label.condition)]].append(float(np.linalg.norm(d)))
    return {g: float(np.median(v)) if v else 2.0 for g, v in errors.items()}


