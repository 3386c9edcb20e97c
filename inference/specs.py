"""What a model's networks see: the localiser's crop and one grader crop per condition group.

A ``ModelSpec`` is part of a model (model.json ``preprocessing``, ``ModelMetadata.spec``): serving
cuts the crops it says, training prepares its cache for it, the export samples its shapes. The
``small`` preset's spec is today's geometry (``LOCALISER_SPEC``, ``GRADER_SPEC`` for every group);
model.json keeps its ``localiser`` and ``grader`` keys and adds ``graders`` (per group) only when
the groups' crops differ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from inference.labels import ConditionGroup
from inference.preprocess import CropSpec

LOCALISER_SPEC = CropSpec(size_mm=320.0, pixels=128, n_slices=3)  # the whole sagittal field of view
GRADER_SPEC = CropSpec(size_mm=44.0, pixels=48, n_slices=3)

MAX_SIZE_MM = 600.0
MAX_PIXELS = 1024
MAX_SLICES = 63
MAX_VOXELS = 2**22  # per crop: n_slices * pixels^2

Shape = tuple[int, int, int]  # (n_slices, pixels, pixels): what the grader is called with


def crop_shape(spec: CropSpec) -> Shape:
    return spec.n_slices, spec.pixels, spec.pixels


def check_crop(name: str, spec: CropSpec) -> None:
    """ValueError unless a crop is sane: positive size, pixels and an odd slice count within limits."""
    if not 0 < spec.size_mm <= MAX_SIZE_MM:
        raise ValueError(f"{name} crop size_mm {spec.size_mm} is not in (0, {MAX_SIZE_MM:g}]")
    if not isinstance(spec.pixels, int) or not 8 <= spec.pixels <= MAX_PIXELS:
        raise ValueError(f"{name} crop pixels {spec.pixels} is not an integer in [8, {MAX_PIXELS}]")
    if not isinstance(spec.n_slices, int) or not 1 <= spec.n_slices <= MAX_SLICES or spec.n_slices % 2 == 0:
        raise ValueError(f"{name} crop n_slices {spec.n_slices} is not an odd integer in [1, {MAX_SLICES}]")
    if spec.n_slices * spec.pixels**2 > MAX_VOXELS:
        raise ValueError(f"{name} crop of {spec.n_slices} x {spec.pixels}^2 pixels exceeds {MAX_VOXELS} voxels")


def _crop(raw: Any) -> CropSpec:
    return CropSpec(float(raw["size_mm"]), int(raw["pixels"]), int(raw["n_slices"]))


@dataclass(frozen=True)
class ModelSpec:
    """The localiser's crop and each condition group's grader crop."""

    localiser: CropSpec = LOCALISER_SPEC
    spinal: CropSpec = GRADER_SPEC
    foraminal: CropSpec = GRADER_SPEC
    subarticular: CropSpec = GRADER_SPEC

    def grader(self, group: ConditionGroup) -> CropSpec:
        """The grader crop of a condition group."""
        return {ConditionGroup.SPINAL: self.spinal, ConditionGroup.FORAMINAL: self.foraminal,
                ConditionGroup.SUBARTICULAR: self.subarticular}[group]

    @property
    def graders(self) -> dict[ConditionGroup, CropSpec]:
        return {g: self.grader(g) for g in ConditionGroup}

    @property
    def uniform(self) -> bool:
        """Every group's crop is the same."""
        return len(set(self.graders.values())) == 1

    def shapes(self) -> list[Shape]:
        """The distinct grader input shapes (n_slices, pixels, pixels), in group order."""
        return list(dict.fromkeys(crop_shape(s) for s in self.graders.values()))

    def with_grader(self, group: ConditionGroup, spec: CropSpec) -> ModelSpec:
        return replace(self, **{_FIELD[group]: spec})

    def check(self) -> None:
        """ValueError naming the first crop that is not sane (``check_crop``)."""
        check_crop("localiser", self.localiser)
        for group, spec in self.graders.items():
            check_crop(f"{group.value} grader", spec)

    def to_preprocessing(self) -> dict[str, Any]:
        """model.json's ``preprocessing``: today's keys (``grader`` is the spinal crop), plus
        ``graders`` per group when the groups differ."""
        out: dict[str, Any] = {"localiser": asdict(self.localiser), "grader": asdict(self.spinal)}
        if not self.uniform:
            out["graders"] = {g.value: asdict(s) for g, s in self.graders.items()}
        slices = self.localiser.n_slices
        return {**out, "intensity": "per volume (value - p1) / (p99.5 - p1)",
                "localiser_input": f"{slices} central sagittal slices, columns posterior, rows to the feet",
                "crops": "inference.levels.crop_axes; right side mirrored"}

    @classmethod
    def from_preprocessing(cls, raw: dict[str, Any]) -> ModelSpec:
        """From model.json's ``preprocessing`` (KeyError, TypeError or ValueError when malformed)."""
        grader = _crop(raw["grader"])
        per_group = raw.get("graders") or {}
        return cls(_crop(raw["localiser"]), *(_crop(per_group[g.value]) if g.value in per_group else grader
                                              for g in ConditionGroup))

    def to_json(self) -> dict[str, Any]:
        return {"localiser": asdict(self.localiser), **{g.value: asdict(s) for g, s in self.graders.items()}}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ModelSpec:
        return cls(_crop(raw["localiser"]), *(_crop(raw[g.value]) for g in ConditionGroup))

    def describe(self) -> str:
        """One line: each crop as size_mm/pixels/slices."""
        def one(s: CropSpec) -> str:
            return f"{s.size_mm:g} mm {s.pixels} px {s.n_slices} slices"
        return "; ".join([f"localiser {one(self.localiser)}",
                          *(f"{g.name.lower()} {one(s)}" for g, s in self.graders.items())])


_FIELD = {ConditionGroup.SPINAL: "spinal", ConditionGroup.FORAMINAL: "foraminal",
          ConditionGroup.SUBARTICULAR: "subarticular"}

SMALL_SPEC = ModelSpec()
