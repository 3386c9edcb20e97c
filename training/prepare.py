"""``lumbar-node prepare``: every study of an RSNA-layout folder read once, in worker processes, into
the training cache (``training.cache``).

Studies are read by N spawned worker processes, each writing its study's folder itself and
returning only the small entry; the parent keeps the list of studies and their entries, never
pixels. A study whose entry is up to date (same spec hash, same files, sizes, mtimes and CSV rows)
is skipped; an interrupted run resumes where it stopped. A study that cannot be used is left out
with its reason; a worker process that dies (a decoder crash, out of memory) costs only the study
it was reading: the others in flight are read again one at a time to find which one it was.

The workers' log lines are captured and logged again by the parent (through its configured,
patient-data-scrubbing logging); ``training`` cannot import the node's logging setup.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from training.cache import (
    STUDIES,
    LeftOutReason,
    Manifest,
    PrepareSpec,
    Source,
    StudyEntry,
    StudyStatus,
    clean_temporary,
    fingerprint,
    read_entry,
    sample_arrays,
    write_entry,
)
from training.data import StudySamples, study_samples
from training.rsna import StudyRecord, load_rsna

log = structlog.stdlib.get_logger(__name__)

MANIFEST_EVERY_S = 30.0  # an unfinished run's manifest is rewritten this often (entries are the truth)


def default_workers() -> int:
    """min(4, CPU count): the default of ``--workers``."""
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class PrepareSummary:
    """What a ``prepare`` run did."""

    studies: int  # in the data folder
    prepared: int  # read in this run (ok or left out)
    up_to_date: int  # skipped: their entry was up to date
    ok: int  # studies with training data in the cache
    left_out: dict[str, int]  # studies left out, by reason (all of them, not only this run's)
    cache_bytes: int
    seconds: float

    @property
    def cache_mb(self) -> float:
        return self.cache_bytes / 2**20

    def line(self) -> str:
        """The one-line summary the command prints."""
        left = sum(self.left_out.values())
        why = f" ({', '.join(f'{k}: {v}' for k, v in self.left_out.items())})" if left else ""
        rate = f", {self.prepared / self.seconds:.2f} studies/s" if self.prepared and self.seconds > 0 else ""
        per = f", {self.cache_mb / self.ok:.2f} MB per study" if self.ok else ""
        return (f"prepared {self.prepared}, up to date {self.up_to_date}, ok {self.ok}, left out {left}{why} "
                f"of {self.studies} studies; cache {self.cache_mb:.1f} MB{per}; {self.seconds:.1f} s{rate}")

    def to_json(self) -> dict[str, Any]:
        return {"studies": self.studies, "prepared": self.prepared, "up_to_date": self.up_to_date, "ok": self.ok,
                "left_out": self.left_out, "cache_mb": round(self.cache_mb, 3), "seconds": round(self.seconds, 3)}


# ---- one study (in a worker process) ---------------------------------------------------------------


@dataclass(frozen=True)
class StudyTask:
    """What a worker needs to prepare one study."""

    record: StudyRecord
    data: Path
    cache: Path
    spec: PrepareSpec


def study_rows(record: StudyRecord) -> dict[str, Any]:
    """The study's CSV rows as its fingerprint sees them (labels, coordinates, series descriptions)."""
    return {"targets": record.targets(),
            "coordinates": [[c.label.column, c.series_id, c.instance_number, c.x, c.y] for c in record.coordinates],
            "series": [[s.series_id, s.description] for s in record.series]}


def study_sources(record: StudyRecord, data: Path) -> list[Source]:
    """The study's image files: (path relative to ``data``, size, mtime in ns); (path, -1, 0) for a
    file that cannot be stat'ed."""
    out = []
    for info in record.series:
        for n in info.instance_numbers:
            path = info.file(n)
            rel = path.relative_to(data).as_posix() if path.is_relative_to(data) else str(path)
            try:
                st = path.stat()
                out.append((rel, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((rel, -1, 0))
    return out


def _left_out_reason(samples: StudySamples, files: int) -> LeftOutReason | None:
    if files == 0 or samples.images_left_out >= files:
        return LeftOutReason.NO_IMAGES
    if not samples.points:
        return LeftOutReason.NO_USABLE_COORDINATES
    if not samples.windows and not samples.localiser:
        return LeftOutReason.NOTHING_TO_TRAIN_ON
    return None


def prepare_study(task: StudyTask) -> tuple[StudyEntry, list[dict[str, Any]]]:
    """Read one study and write its cache folder; (its entry, the log lines captured in a worker)."""
    t0 = time.perf_counter()
    record, spec = task.record, task.spec
    sources = study_sources(record, task.data)
    entry = StudyEntry(record.study_id, StudyStatus.LEFT_OUT, spec.hash, fingerprint(sources, study_rows(record)),
                       files=len(sources), source_bytes=sum(max(s[1], 0) for s in sources), sources=sources)
    arrays = None
    if not record.coordinates:
        entry.reason = LeftOutReason.NO_COORDINATES
    else:
        rng = np.random.default_rng([spec.seed, record.study_id])
        try:
            samples = study_samples(record, rng, spec.localiser_jitter_mm, spec.windows, spec.model.localiser)
        except Exception as exc:  # noqa: BLE001 - whatever one study's files raise leaves that study out
            entry.reason, entry.detail = LeftOutReason.UNREADABLE, f"{type(exc).__name__}: {exc}"[:500]
        else:
            entry.images_left_out = samples.images_left_out
            entry.reason = _left_out_reason(samples, entry.files)
            if entry.reason is None:
                arrays = sample_arrays(samples, spec)
                entry.status = StudyStatus.OK
                entry.windows, entry.localiser = len(samples.windows), len(samples.localiser)
    entry.seconds = round(time.perf_counter() - t0, 3)
    return write_entry(task.cache, entry, arrays), _captured()


_CAPTURED: list[dict[str, Any]] = []


def _capture(_logger: Any, method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    _CAPTURED.append({"level": method, **event})
    raise structlog.DropEvent


class _CaptureHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _CAPTURED.append({"level": record.levelname.lower(), "event": record.getMessage(), "source": record.name})


def _captured() -> list[dict[str, Any]]:
    out = list(_CAPTURED)
    _CAPTURED.clear()
    return out


def _worker_init() -> None:
    """A worker process: one thread (the processes are the parallelism), log lines captured."""
    import cv2

    cv2.setNumThreads(1)
    structlog.configure(processors=[_capture], wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
                        cache_logger_on_first_use=False)
    root = logging.getLogger()
    root.handlers[:] = [_CaptureHandler(logging.WARNING)]
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    warnings.simplefilter("default")


# ---- the run (in the parent) -----------------------------------------------------------------------


Work = Callable[[StudyTask], tuple[StudyEntry, list[dict[str, Any]]]]


@dataclass
class _Progress:
    """The parent's bookkeeping: entries so far, the bar, and when the manifest was last written."""

    manifest: Manifest
    cache: Path
    bar: Any
    prepared: int = 0
    saved: float = field(default_factory=time.monotonic)

    def done(self, entry: StudyEntry, events: list[dict[str, Any]]) -> None:
        for event in events:
            fields = {k: v for k, v in event.items() if k not in ("level", "event", "timestamp", "logger")}
            fields.setdefault("study", entry.study_id)
            emit = getattr(log, str(event.get("level", "warning")), None)
            (emit if callable(emit) else log.warning)(str(event.get("event", "")), **fields)
        if not entry.ok:
            log.warning("study left out", study=entry.study_id, reason=entry.reason.value if entry.reason else None,
                        detail=entry.detail or None)
        entry.sources = []
        self.manifest.studies[entry.study_id] = entry
        self.prepared += 1
        self.bar.update(1)
        if time.monotonic() - self.saved > MANIFEST_EVERY_S:
            self.manifest.save(self.cache)
            self.saved = time.monotonic()


def _died(task: StudyTask, exc: BaseException) -> tuple[StudyEntry, list[dict[str, Any]]]:
    """The entry of a study whose reading ended its worker process (written by the parent)."""
    sources = study_sources(task.record, task.data)
    entry = StudyEntry(task.record.study_id, StudyStatus.LEFT_OUT, task.spec.hash,
                       fingerprint(sources, study_rows(task.record)), LeftOutReason.WORKER_DIED,
                       f"{type(exc).__name__}: {exc}"[:500], files=len(sources),
                       source_bytes=sum(max(s[1], 0) for s in sources), sources=sources)
    return write_entry(task.cache, entry), []


def _pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init)


def _run_pool(tasks: Iterable[StudyTask], workers: int, work: Work, progress: _Progress) -> None:
    """Run ``work`` over ``tasks`` on ``workers`` spawned processes, at most 2 per process in flight.
    When the pool breaks (a worker died), the studies in flight are read again alone, each in its own
    pool, so that only the one that kills its worker is left out (WORKER_DIED)."""
    queue: deque[StudyTask] = deque(tasks)
    suspects: deque[StudyTask] = deque()
    while queue or suspects:
        alone = bool(suspects)
        source = suspects if alone else queue
        pool = _pool(1 if alone else workers)
        running: dict[Future, StudyTask] = {}
        try:
            while source or running:
                while source and len(running) < (1 if alone else 2 * workers):
                    task = source.popleft()
                    running[pool.submit(work, task)] = task
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                broken = None
                for future in finished:
                    task = running.pop(future)
                    try:
                        progress.done(*future.result())
                    except BrokenProcessPool as exc:
                        if alone:
                            progress.done(*_died(task, exc))
                        else:
                            suspects.append(task)
                        broken = exc
                if broken is not None:
                    suspects.extend(running.values())  # they failed with the pool (or will): read each alone
                    running.clear()
                    break
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def prepare(data: Path, cache: Path, workers: int | None = None, spec: PrepareSpec | None = None,
            progress: bool = True, work: Work = prepare_study) -> PrepareSummary:
    """Prepare (or bring up to date) the training cache of the RSNA layout at ``data`` in ``cache``.

    ``workers`` processes read the studies (0: in this process; default ``default_workers()``).
    Raises ``training.rsna.LayoutError`` when ``data`` is not in the layout."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    spec = spec or PrepareSpec()
    workers = default_workers() if workers is None else workers
    data, cache = Path(data).resolve(), Path(cache)
    records = load_rsna(data)
    cache.mkdir(parents=True, exist_ok=True)
    if (cleaned := clean_temporary(cache)):
        log.info("removed what an interrupted prepare left half-written", folders=cleaned)
    manifest = Manifest(spec, str(data), {})
    todo = []
    for record in records:
        entry = read_entry(cache, record.study_id)
        if entry is not None and entry.spec_hash == spec.hash and \
                entry.fingerprint == fingerprint(study_sources(record, data), study_rows(record)):
            entry.sources = []
            manifest.studies[record.study_id] = entry
        else:
            todo.append(StudyTask(record, data, cache, spec))
    _remove_stale(cache, {r.study_id for r in records})
    up_to_date = len(manifest.studies)
    log.info("prepare", data=str(data), cache=str(cache), studies=len(records), up_to_date=up_to_date,
             to_prepare=len(todo), workers=workers, spec_hash=spec.hash)
    bar = tqdm(total=len(todo), desc="prepare", unit=" studies", disable=not progress or not todo,
               dynamic_ncols=True, smoothing=0.1)
    state = _Progress(manifest, cache, bar)
    try:
        if workers <= 0 or len(todo) <= 1:
            for task in todo:
                state.done(*work(task))
        else:
            _run_pool(todo, min(workers, len(todo)), work, state)
        manifest.complete = True
    finally:
        bar.close()
        manifest.save(cache)
    summary = PrepareSummary(len(records), state.prepared, up_to_date, len(manifest.ok()), manifest.left_out(),
                             manifest.cache_bytes, time.perf_counter() - t0)
    log.info("prepared", **summary.to_json())
    return summary


def _remove_stale(cache: Path, studies: set[int]) -> None:
    """Remove the folders of studies that are no longer in the data folder."""
    import shutil

    root = cache / STUDIES
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) not in studies] \
        if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        log.info("removed the cache folders of studies no longer in the data", studies=len(stale))
