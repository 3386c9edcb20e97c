"""K-fold cross-validation: ``lumbar-node train --folds K --out RUN``.

The studies are dealt into K validation folds by ``training.rsna.fold_study_ids`` (by study, from
the seed; every study in exactly one fold). Fold i is a normal run folder ``RUN/fold-<i>`` trained
on the other folds (``training.train.train`` with ``TrainConfig.folds``/``fold``), so it resumes as
any run does; a rerun skips finished folds (model.pt and oof.npz written). All folds read one cache.
``RUN/folds.json`` records K, the seed and each study's fold; the report (``training.report``)
scores the folds' out-of-fold predictions together.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from training.cache import open_cache
from training.distributed import World
from training.report import OOF_FILE
from training.rsna import fold_study_ids
from training.runner import MODEL_NAME
from training.train import TrainConfig, train

log = structlog.stdlib.get_logger(__name__)

FOLDS_FILE = "folds.json"


class FoldsError(ValueError):
    """The run folder holds folds of another split (other K or seed) than asked for."""


def fold_folder(run: Path, fold: int) -> Path:
    return run / f"fold-{fold}"


def assignment(study_ids: list[int], folds: int, seed: int) -> dict[int, int]:
    """Each study's validation fold."""
    out: dict[int, int] = {}
    for k in range(folds):
        for sid in fold_study_ids(study_ids, folds, k, seed)[1]:
            out[sid] = k
    return out


def _check_same_split(run: Path, folds: int, seed: int) -> None:
    """Refuse to mix folds of another split into ``run``."""
    recorded: dict[str, Any] | None = (json.loads((run / FOLDS_FILE).read_text())
                                       if (run / FOLDS_FILE).is_file() else None)
    if recorded is not None and (recorded["folds"], recorded["seed"]) != (folds, seed):
        raise FoldsError(f"{run} holds {recorded['folds']} folds of seed {recorded['seed']}, not {folds} of seed "
                         f"{seed}: give another --out, or the same --folds and --seed to resume")


def train_folds(cache: Path, run: Path, cfg: TrainConfig, folds: int, only: int | None = None) -> list[Path]:
    """Train ``folds`` models into ``run/fold-<i>`` (``only``: that fold alone); skip finished folds,
    resume an interrupted one. Returns the trained folds' model.pt paths."""
    if folds < 2:
        raise FoldsError(f"--folds needs at least 2 folds, not {folds}")
    run.mkdir(parents=True, exist_ok=True)
    _check_same_split(run, folds, cfg.seed)
    manifest = open_cache(cache)
    studies = assignment(list(manifest.studies), folds, cfg.seed)
    if len(manifest.ok()) < 2 * folds:
        raise FoldsError(f"{len(manifest.ok())} usable studies are too few for {folds} folds")
    if World.from_env().main:  # under torchrun, rank 0 writes
        (run / FOLDS_FILE).write_text(json.dumps({"folds": folds, "seed": cfg.seed, "model": MODEL_NAME,
                                                  "study_fold": {str(k): v for k, v in sorted(studies.items())}},
                                                 indent=1))
    models = []
    for k in range(folds) if only is None else [only]:
        folder = fold_folder(run, k)
        if (folder / "model.pt").is_file() and (folder / OOF_FILE).is_file():
            log.info("fold finished: skipped", fold=k, folds=folds, run=str(folder))
        else:
            log.info("training fold", fold=k, folds=folds, run=str(folder),
                     validation_studies=sum(v == k for v in studies.values()))
            train(cache, folder, replace(cfg, folds=folds, fold=k))
        models.append(folder / "model.pt")
    return models
