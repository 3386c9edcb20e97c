"""The prepared training cache that ``lumbar-node prepare`` writes and ``lumbar-node train --cache``
reads: per study, memory-mappable ``.npy`` arrays of what training needs, and a manifest.

    CACHE/manifest.json                   spec, its hash, the data folder, every study's status
    CACHE/studies/<study_id>/entry.json   the study's status (and why it is left out), its source
                                          files (path relative to the data folder, size, mtime),
                                          the fingerprint of those and of its CSV rows, counts
    CACHE/studies/<study_id>/*.npy        the arrays of ``ARRAYS`` (an ``ok`` study only)

A study folder is written whole under a temporary name and renamed into place (``os.replace``), so
an interrupted ``prepare`` leaves finished studies and nothing half-written; the manifest is written
the same way. An entry is up to date when its spec hash and fingerprint equal the current ones.
Torch-free: ``prepare``'s worker processes import it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from inference.labels import LABELS, ConditionGroup, Label
from inference.preprocess import CropSpec
from inference.specs import SMALL_SPEC, ModelSpec, Shape, crop_shape
from training.data import HEATMAP_SIGMA_PX, JITTER_PX, StudySamples, window_spec

CACHE_FORMAT = 2  # bump when the arrays or their meaning change: every entry is rebuilt
MANIFEST = "manifest.json"
STUDIES = "studies"
ENTRY = "entry.json"
_TEMP_PREFIXES = (".tmp-", ".old-")

#: name -> (dtype, shape per study; n = windows, m = localiser images)
ARRAYS: dict[str, tuple[str, str]] = {
    "targets": ("int8", "(25,): class index per label (LABELS order), -1 unlabelled"),
    "points": ("float64", "(25, 3): marked patient point (LPS mm) per label, NaN where none"),
    "windows": ("float16", "(n0, slices+2, H+2m, W+2m): grader windows of the spec's first window shape "
                "(PrepareSpec.windows; the small preset: every window, 5 x 64 x 64)"),
    "windows_<k>": ("float16", "(nk, ...): the windows of the spec's window shape k >= 1 (a spec whose groups differ)"),
    "window_labels": ("int8", "(n,): the label index of each window, ascending; a window's row in its shape's "
                      "array is its rank among the windows of that shape"),
    "localiser_images": ("float16", "(m, 3, n, n): localiser inputs (the spec's localiser grid)"),
    "localiser_peaks": ("float32", "(m, 5, 2): (col, row) of each level's canal point, NaN where unknown"),
    "localiser_jittered": ("bool", "(m,): centred off the served centre (training only)"),
}


class StudyStatus(StrEnum):
    """A study's state in the cache."""

    OK = "ok"
    LEFT_OUT = "left out"


class LeftOutReason(StrEnum):
    """Why a study of the data folder is not in the cache's training data."""

    NO_COORDINATES = "no coordinates"
    NO_USABLE_COORDINATES = "no usable coordinates"  # their series or image files are missing or unreadable
    NO_IMAGES = "no readable images"
    NOTHING_TO_TRAIN_ON = "nothing to train on"  # no sagittal series for the localiser, no crop for a label
    UNREADABLE = "images cannot be used"  # reading the study raised; the detail says what
    WORKER_DIED = "reading it ended the worker process"  # a decoder crash, or out of memory


@dataclass(frozen=True)
class PrepareSpec:
    """Everything that decides a cache entry's arrays besides the study's own files: its hash
    decides whether an entry is up to date. ``model``: the crops of the model the cache is for
    (a preset's ``ModelSpec``); each group's window is ``training.data.window_spec`` of its crop."""

    format: int = CACHE_FORMAT
    model: ModelSpec = SMALL_SPEC
    jitter_px: int = JITTER_PX
    localiser_jitter_mm: float = 25.0
    heatmap_sigma_px: float = HEATMAP_SIGMA_PX
    seed: int = 0  # of the localiser's jittered centre (one draw per study and series)

    @property
    def windows(self) -> dict[ConditionGroup, CropSpec]:
        """Each group's cached window."""
        return {g: window_spec(s) for g, s in self.model.graders.items()}

    def window_shapes(self) -> list[Shape]:
        """The distinct window shapes, in group order: shape k is stored in ``window_array(k)``."""
        return list(dict.fromkeys(crop_shape(w) for w in self.windows.values()))

    def window_index(self, group: ConditionGroup) -> int:
        """The index of a group's window shape (``window_shapes``)."""
        return self.window_shapes().index(crop_shape(self.windows[group]))

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "model"}, "model": self.model.to_json(),
                "windows": {g.value: asdict(w) for g, w in self.windows.items()}}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PrepareSpec:
        """From ``to_json``'s output; a manifest of format 1 (one grader crop) reads as its model spec."""
        raw = dict(raw)
        raw.pop("windows", None)
        if "model" in raw:
            model = ModelSpec.from_json(raw.pop("model"))
        else:  # format 1: window, grader, localiser
            raw.pop("window", None)
            model = ModelSpec.from_preprocessing({"grader": raw.pop("grader"), "localiser": raw.pop("localiser")})
        return cls(**raw, model=model)

    def describe(self) -> str:
        return self.model.describe()

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


Source = tuple[str, int, int]  # (path relative to the data folder, size in bytes, mtime in ns)


@dataclass
class StudyEntry:
    """A study's record in the cache (its entry.json; the manifest keeps all but ``sources``)."""

    study_id: int
    status: StudyStatus
    spec_hash: str
    fingerprint: str
    reason: LeftOutReason | None = None
    detail: str = ""
    files: int = 0  # image files of the study
    source_bytes: int = 0
    windows: int = 0
    localiser: int = 0
    images_left_out: int = 0
    cache_bytes: int = 0
    seconds: float = 0.0
    sources: list[Source] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.status is StudyStatus.OK

    def to_json(self, sources: bool = True) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = self.status.value
        out["reason"] = self.reason.value if self.reason else None
        if not sources:
            del out["sources"]
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StudyEntry:
        raw = dict(raw)
        raw["status"] = StudyStatus(raw["status"])
        raw["reason"] = LeftOutReason(raw["reason"]) if raw.get("reason") else None
        raw["sources"] = [tuple(s) for s in raw.get("sources", [])]
        return cls(**raw)


def fingerprint(sources: list[Source], rows: dict[str, Any]) -> str:
    """A study's fingerprint: its files' paths, sizes and mtimes and its CSV rows (``rows``)."""
    text = json.dumps({"sources": sources, "rows": rows}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def window_array(k: int) -> str:
    """The array name of window shape k (``PrepareSpec.window_shapes``)."""
    return "windows" if k == 0 else f"windows_{k}"


def sample_arrays(samples: StudySamples, spec: PrepareSpec | None = None) -> dict[str, NDArray]:
    """A study's samples as the cache's arrays (``ARRAYS``), windows in one array per window shape."""
    spec = spec or PrepareSpec()
    points = np.full((len(LABELS), 3), np.nan)
    for label, p in samples.points.items():
        points[LABELS.index(label)] = p
    order = sorted(samples.windows)
    loc = samples.localiser
    shapes = spec.window_shapes()
    windows = {}
    for k, shape in enumerate(shapes):
        mine = [samples.windows[i] for i in order if spec.window_index(LABELS[i].condition.group) == k]
        windows[window_array(k)] = np.stack(mine) if mine else np.zeros((0, *shape), np.float16)
    lspec = spec.model.localiser
    return {
        "targets": samples.targets.astype(np.int8),
        "points": points,
        **windows,
        "window_labels": np.array(order, np.int8),
        "localiser_images": (np.stack([s.image for s in loc]) if loc else
                             np.zeros((0, lspec.n_slices, lspec.pixels, lspec.pixels), np.float16)),
        "localiser_peaks": np.stack([s.peaks for s in loc]) if loc else np.zeros((0, 5, 2), np.float32),
        "localiser_jittered": np.array([s.jittered for s in loc], bool),
    }


# ---- the folder ------------------------------------------------------------------------------------


def study_dir(cache: Path, study_id: int) -> Path:
    return cache / STUDIES / str(study_id)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_entry(cache: Path, entry: StudyEntry, arrays: dict[str, NDArray] | None = None) -> StudyEntry:
    """Write a study's folder (its arrays and entry.json) atomically, replacing an older one;
    returns the entry with its ``cache_bytes``."""
    root = cache / STUDIES
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{entry.study_id}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    size = 0
    for name, array in (arrays or {}).items():
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        size += (tmp / f"{name}.npy").stat().st_size
    entry.cache_bytes = size
    (tmp / ENTRY).write_text(json.dumps(entry.to_json()))
    final = study_dir(cache, entry.study_id)
    if final.exists():
        old = root / f".old-{entry.study_id}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return entry


def read_entry(cache: Path, study_id: int) -> StudyEntry | None:
    """A study's entry.json, None when absent or unreadable (it is then rebuilt)."""
    try:
        return StudyEntry.from_json(json.loads((study_dir(cache, study_id) / ENTRY).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clean_temporary(cache: Path) -> int:
    """Remove what an interrupted ``prepare`` left half-written; how many folders."""
    root = cache / STUDIES
    if not root.is_dir():
        return 0
    stale = [p for p in root.iterdir() if p.name.startswith(_TEMP_PREFIXES)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return len(stale)


def load_array(cache: Path, study_id: int, name: str, mmap: bool = True) -> NDArray:
    """One array of a study (memory-mapped, read-only, by default)."""
    return np.load(study_dir(cache, study_id) / f"{name}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)


def study_points(cache: Path, study_id: int) -> dict[Label, NDArray]:
    """A study's marked patient points by label."""
    points = load_array(cache, study_id, "points", mmap=False)
    return {label: points[i] for i, label in enumerate(LABELS) if np.isfinite(points[i]).all()}


# ---- the manifest ----------------------------------------------------------------------------------


class CacheError(ValueError):
    """The cache folder is missing, unfinished or prepared with another spec."""


@dataclass
class Manifest:
    """The cache's index: the spec, the data folder and every study's entry (without sources)."""

    spec: PrepareSpec
    data: str  # the data folder prepared (absolute): validation reads its DICOM files
    studies: dict[int, StudyEntry]
    complete: bool = False  # every study of the data folder has an entry
    updated: str = ""

    def save(self, cache: Path) -> None:
        self.updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        raw = {"format": CACHE_FORMAT, "spec": self.spec.to_json(), "spec_hash": self.spec.hash, "data": self.data,
               "complete": self.complete, "updated": self.updated, "arrays": ARRAYS,
               "studies": {str(k): v.to_json(sources=False) for k, v in sorted(self.studies.items())}}
        _atomic_write_text(cache / MANIFEST, json.dumps(raw, indent=1))

    @classmethod
    def load(cls, cache: Path) -> Manifest:
        path = cache / MANIFEST
        if not path.is_file():
            raise CacheError(f"{cache} is not a prepared cache: no {MANIFEST} (run `lumbar-node prepare`)")
        try:
            raw = json.loads(path.read_text())
            spec = PrepareSpec.from_json(raw["spec"])
            studies = {int(k): StudyEntry.from_json(v) for k, v in raw["studies"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise CacheError(f"{path} cannot be read: {type(exc).__name__}: {exc}") from None
        return cls(spec, raw["data"], studies, bool(raw.get("complete")), raw.get("updated", ""))

    def ok(self) -> list[int]:
        """The study ids with training data, sorted."""
        return sorted(k for k, v in self.studies.items() if v.ok)

    def left_out(self) -> dict[str, int]:
        """How many studies are left out, by reason."""
        out: dict[str, int] = {}
        for v in self.studies.values():
            if not v.ok:
                key = v.reason.value if v.reason else "unknown"
                out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items()))

    @property
    def cache_bytes(self) -> int:
        return sum(v.cache_bytes for v in self.studies.values())


def open_cache(cache: Path, spec: PrepareSpec | None = None) -> Manifest:
    """The manifest of a finished cache prepared with ``spec`` (default: this code's), or a CacheError
    that says what to do."""
    manifest = Manifest.load(cache)
    spec = spec or PrepareSpec()
    if not manifest.complete:
        raise CacheError(f"{cache}: prepare did not finish (run `lumbar-node prepare` again: it resumes)")
    if manifest.spec.hash != spec.hash:
        other = (f" for other crops ({manifest.spec.describe()}; the model's: {spec.describe()})"
                 if manifest.spec.model != spec.model else "")
        raise CacheError(f"{cache} was prepared with another preprocessing spec{other} ({manifest.spec.hash}, this "
                         f"run's is {spec.hash}): run `lumbar-node prepare` again with the same --preset and "
                         "--grader-crop, it rebuilds what changed")
    if not manifest.ok():
        raise CacheError(f"{cache}: no study with training data ({manifest.left_out() or 'no studies'})")
    return manifest
