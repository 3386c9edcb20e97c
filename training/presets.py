"""Named model sizes (``lumbar-node train --preset``): each a crop geometry (``ModelSpec``) and a
network configuration (``Networks``).

- ``small``: today's networks and crops (the bundled model and CI use it): a U-Net of width 12 on
  a 128 px localiser grid, a residual grader of width 24 on 44 mm, 48 px, 3-slice crops.
- ``competition``: the RSNA 2024 winners' class. Localiser: a 256 px grid over the same 320 mm
  (1.25 mm per pixel) and a U-Net of width 24. Grader: a per-slice ResNet-34 (BasicBlocks
  [3, 4, 6, 3], widths 64-512, torchvision's parameter names, the last stage at stride 1 so the
  Grad-CAM is 8 x 8 on 128 px) with a bidirectional-GRU attention head across the slices, on
  128 px crops of 64 mm (0.5 mm per pixel): 7 sagittal slices for the canal (2nd place used 8 on
  Sagittal T2), 9 for a foramen (seen on sagittal slices lateral of the canal, one side per crop:
  it needs more slices than the canal), 5 axial slices for the subarticular zones.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from inference.labels import ConditionGroup
from inference.preprocess import CropSpec
from inference.specs import SMALL_SPEC, ModelSpec
from training.models import GraderKind, GraderNet, LocaliserNet, Networks


class Preset(StrEnum):
    """The named model sizes."""

    SMALL = "small"
    COMPETITION = "competition"


@dataclass(frozen=True)
class PresetConfig:
    """A preset's crops and networks."""

    spec: ModelSpec
    networks: Networks


COMPETITION_SPEC = ModelSpec(
    localiser=CropSpec(320.0, 256, 3),
    spinal=CropSpec(64.0, 128, 7),
    foraminal=CropSpec(64.0, 128, 9),
    subarticular=CropSpec(64.0, 128, 5),
)

PRESETS: dict[Preset, PresetConfig] = {
    Preset.SMALL: PresetConfig(SMALL_SPEC, Networks()),
    Preset.COMPETITION: PresetConfig(COMPETITION_SPEC, Networks(
        LocaliserNet(width=24),
        GraderNet(kind=GraderKind.SEQUENCE, width=64, in_channels=1, dropout=0.2, blocks=(3, 4, 6, 3),
                  stem_pool=True, last_stride=1, hidden=128))),
}

_GROUP_NAMES = {"spinal": ConditionGroup.SPINAL, "foraminal": ConditionGroup.FORAMINAL,
                "subarticular": ConditionGroup.SUBARTICULAR}


def parse_grader_crop(text: str) -> tuple[ConditionGroup, CropSpec]:
    """``GROUP=SIZE_MM,PIXELS,SLICES`` (GROUP: spinal, foraminal, subarticular or the group's full
    name) -> (group, crop); ValueError saying what is wrong."""
    name, sep, values = text.partition("=")
    group = _GROUP_NAMES.get(name.strip()) or next((g for g in ConditionGroup if g.value == name.strip()), None)
    if not sep or group is None:
        raise ValueError(f"{text!r}: expected GROUP=SIZE_MM,PIXELS,SLICES with GROUP one of {', '.join(_GROUP_NAMES)}")
    parts = values.split(",")
    if len(parts) != 3:
        raise ValueError(f"{text!r}: expected three values SIZE_MM,PIXELS,SLICES")
    try:
        spec = CropSpec(float(parts[0]), int(parts[1]), int(parts[2]))
    except ValueError:
        raise ValueError(f"{text!r}: SIZE_MM must be a number, PIXELS and SLICES integers") from None
    return group, spec


def resolve(preset: Preset | str = Preset.SMALL, grader_crops: tuple[str, ...] = ()) -> PresetConfig:
    """A preset's configuration with ``--grader-crop`` overrides applied and checked (ValueError).
    The small preset's residual grader takes the crop's slices as channels: its groups' slice
    counts must agree."""
    config = PRESETS[Preset(preset)]
    spec = config.spec
    for text in grader_crops:
        spec = spec.with_grader(*parse_grader_crop(text))
    spec.check()
    networks = config.networks
    if networks.grader.kind is GraderKind.RESIDUAL:
        slices = {s.n_slices for s in spec.graders.values()}
        if len(slices) != 1:
            raise ValueError(f"the {Preset(preset).value} preset's grader takes one slice count for every group, "
                             f"got {sorted(slices)}")
        networks = Networks(networks.localiser, GraderNet(**{**networks.grader.__dict__, "in_channels": slices.pop()}))
    networks = Networks(LocaliserNet(networks.localiser.width, spec.localiser.n_slices), networks.grader)
    return PresetConfig(spec, networks)
