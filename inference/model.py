"""What a model is: the metadata that ``model.json`` holds (written by training and export, read
by the runtime), the identity the outputs quote, and the one sha256 helper.

A model folder holds ``localiser.onnx``, ``grader.onnx`` and ``model.json``; a training run's
``model.pt`` carries the same metadata. One type, one reader and one writer serve all three.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import structlog

from inference.labels import CONDITIONS, LABEL_COLUMNS, SEVERITY_NAMES, ConditionGroup
from inference.level_check import DEFAULT_LEVEL_CHECK, LevelCheck
from inference.specs import SMALL_SPEC, ModelSpec

log = structlog.stdlib.get_logger(__name__)

Offset = tuple[float, float, float]  # (lateral, posterior, head) millimetres from the canal point


class ModelError(RuntimeError):
    """The model folder is missing, incomplete or does not match this code's preprocessing."""


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes (models, checkpoints, ONNX graphs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_preprocessing() -> dict[str, Any]:
    """The small preset's preprocessing, as model.json records it (``ModelSpec.to_preprocessing``)."""
    return SMALL_SPEC.to_preprocessing()


@dataclass(frozen=True)
class ModelMetadata:
    """The contents of model.json (and of a checkpoint's ``meta``), field for field."""

    name: str
    version: str
    training_data: str
    offsets_mm: dict[ConditionGroup, Offset]
    label_columns: tuple[str, ...] = LABEL_COLUMNS
    classes: tuple[str, ...] = SEVERITY_NAMES
    conditions: tuple[str, ...] = tuple(c.key for c in CONDITIONS)
    preprocessing: dict[str, Any] = field(default_factory=default_preprocessing)
    temperatures: tuple[float, ...] = ()
    class_prior: tuple[tuple[float, float, float], ...] = ()  # per label, LABELS order
    level_check: LevelCheck | None = None  # fitted on validation; None (older model.json): built-in defaults
    validation: dict[str, Any] = field(default_factory=dict)
    train_studies: int = 0
    seed: int = 0
    created: str = ""
    preset: str | None = None  # training.presets.Preset; None (older models): small
    networks: dict[str, Any] | None = None  # training.models.Networks; None (older models): small
    # written by the export only
    checkpoint_sha256: str | None = None
    onnx: dict[str, Any] | None = None
    verification: dict[str, Any] | None = None
    # an ensemble's members (export.ensemble): run, fold, checkpoint_sha256, cv_score, preset; None: one model
    members: tuple[dict[str, Any], ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON, in model.json's key order; the export-only keys only when set."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "offsets_mm":
                value = {group.value: list(v) for group, v in value.items()}
            elif isinstance(value, LevelCheck):
                value = value.to_json()
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelMetadata:
        """Parse model.json's contents; ModelError names a missing or unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"model metadata has unknown keys {unknown}")
        try:
            values = dict(data)
            values["offsets_mm"] = {ConditionGroup(k): tuple(float(x) for x in v)
                                    for k, v in data["offsets_mm"].items()}
            for key in ("label_columns", "classes", "conditions", "temperatures"):
                if key in values:
                    values[key] = tuple(values[key])
            if values.get("members") is not None:
                values["members"] = tuple(dict(m) for m in values["members"])
            if "class_prior" in values:
                values["class_prior"] = tuple(tuple(row) for row in values["class_prior"])
            if values.get("level_check") is not None:
                values["level_check"] = LevelCheck.from_json(values["level_check"])
            return cls(**values)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model metadata is incomplete or malformed: {type(exc).__name__}: {exc}") from None

    @classmethod
    def read(cls, path: Path) -> ModelMetadata:
        """Read and check ``model.json``."""
        if not path.is_file():
            raise ModelError(f"no model.json in {path.parent}")
        meta = cls.from_json(json.loads(path.read_text()))
        meta.check()
        if meta.level_check is None:
            log.warning("model.json has no level_check: the disc levels are checked with the built-in defaults "
                        "(lumbar-node calibrate-levels fits them)", model_dir=str(path.parent),
                        **DEFAULT_LEVEL_CHECK.to_json())
        return meta

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1))

    @property
    def spec(self) -> ModelSpec:
        """The crops the model's networks take (its ``preprocessing``)."""
        try:
            return ModelSpec.from_preprocessing(self.preprocessing)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model.json preprocessing has no usable crop geometry: {type(exc).__name__}: {exc}") \
                from None

    def check(self) -> None:
        """Raise ModelError unless the label order is this code's and the crop geometry is sane."""
        if tuple(self.label_columns) != LABEL_COLUMNS:
            raise ModelError("model.json label order differs from inference.labels")
        try:
            self.spec.check()
        except ValueError as exc:
            raise ModelError(f"model.json preprocessing: {exc}") from None


@dataclass(frozen=True)
class ModelInfo:
    """The model that graded a study: its metadata and the sha256 of the weights that ran."""

    metadata: ModelMetadata
    sha256: str

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> str:
        return self.metadata.version

    @property
    def training_data(self) -> str:
        return self.metadata.training_data

    @property
    def offsets_mm(self) -> dict[ConditionGroup, Offset]:
        return self.metadata.offsets_mm
