"""The one definition of the RSNA 2024 label set: conditions, levels, severities, columns.

Every other module imports these names; nothing else spells a condition, level or severity.
The strings are exactly those of the RSNA 2024 Lumbar Spine Degenerative Classification files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum, StrEnum


class SeriesRole(StrEnum):
    """The three series a lumbar study must provide, with their RSNA series descriptions."""

    SAG_T1 = "Sagittal T1"
    SAG_T2 = "Sagittal T2/STIR"
    AX_T2 = "Axial T2"


class Side(StrEnum):
    LEFT = "left"
    RIGHT = "right"


class ConditionGroup(StrEnum):
    """The three scored condition groups of the competition metric."""

    SPINAL = "spinal_canal_stenosis"
    FORAMINAL = "neural_foraminal_narrowing"
    SUBARTICULAR = "subarticular_stenosis"


@dataclass(frozen=True)
class Condition:
    """One of the five graded conditions (a group, with a side where the group has one)."""

    group: ConditionGroup
    side: Side | None

    @property
    def key(self) -> str:
        """Column-name stem, e.g. ``left_neural_foraminal_narrowing``."""
        return self.group.value if self.side is None else f"{self.side.value}_{self.group.value}"

    @property
    def display(self) -> str:
        """RSNA coordinate-file spelling, e.g. ``Left Neural Foraminal Narrowing``."""
        return " ".join(word.capitalize() for word in self.key.split("_"))

    @property
    def series_role(self) -> SeriesRole:
        """The series the condition is read (and labelled) on."""
        return _ROLE_OF_GROUP[self.group]


_ROLE_OF_GROUP = {
    ConditionGroup.SPINAL: SeriesRole.SAG_T2,
    ConditionGroup.FORAMINAL: SeriesRole.SAG_T1,
    ConditionGroup.SUBARTICULAR: SeriesRole.AX_T2,
}

SPINAL = Condition(ConditionGroup.SPINAL, None)
LEFT_FORAMINAL = Condition(ConditionGroup.FORAMINAL, Side.LEFT)
RIGHT_FORAMINAL = Condition(ConditionGroup.FORAMINAL, Side.RIGHT)
LEFT_SUBARTICULAR = Condition(ConditionGroup.SUBARTICULAR, Side.LEFT)
RIGHT_SUBARTICULAR = Condition(ConditionGroup.SUBARTICULAR, Side.RIGHT)

#: The five conditions in RSNA column order.
CONDITIONS: tuple[Condition, ...] = (
    SPINAL,
    LEFT_FORAMINAL,
    RIGHT_FORAMINAL,
    LEFT_SUBARTICULAR,
    RIGHT_SUBARTICULAR,
)


class Level(StrEnum):
    """Lumbar disc levels, valued with their RSNA spelling."""

    L1_L2 = "L1/L2"
    L2_L3 = "L2/L3"
    L3_L4 = "L3/L4"
    L4_L5 = "L4/L5"
    L5_S1 = "L5/S1"

    @property
    def key(self) -> str:
        """Column-name suffix, e.g. ``l1_l2``."""
        return self.value.replace("/", "_").lower()

    @property
    def position(self) -> int:
        """Position in LEVELS, head to feet (0 for L1/L2). Not ``index``: a Level is a str, whose
        ``index`` method it would shadow."""
        return LEVELS.index(self)


LEVELS: tuple[Level, ...] = tuple(Level)


class Severity(int, Enum):
    """The three grades, valued with their class index (the model's output order)."""

    NORMAL_MILD = 0
    MODERATE = 1
    SEVERE = 2

    @property
    def display(self) -> str:
        return SEVERITY_NAMES[self.value]

    @property
    def weight(self) -> float:
        """Competition sample weight of a row whose true grade is this one."""
        return SEVERITY_WEIGHTS[self.value]


SEVERITY_NAMES: tuple[str, ...] = ("Normal/Mild", "Moderate", "Severe")
SEVERITY_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 4.0)
SEVERITIES: tuple[Severity, ...] = tuple(Severity)


@dataclass(frozen=True)
class Label:
    """One of the 25 graded labels: a condition at a level."""

    condition: Condition
    level: Level

    @property
    def column(self) -> str:
        return f"{self.condition.key}_{self.level.key}"


#: The 25 labels in the column order of RSNA's train.csv (condition-major).
LABELS: tuple[Label, ...] = tuple(Label(c, lv) for c in CONDITIONS for lv in LEVELS)
LABEL_COLUMNS: tuple[str, ...] = tuple(label.column for label in LABELS)

_LABEL_BY_COLUMN = {label.column: label for label in LABELS}
_CONDITION_BY_DISPLAY = {c.display.lower(): c for c in CONDITIONS}
_SEVERITY_BY_NAME = {name.lower(): Severity(i) for i, name in enumerate(SEVERITY_NAMES)}


def parse_column(column: str) -> Label:
    """``spinal_canal_stenosis_l1_l2`` -> Label. Raises ValueError for any other name."""
    try:
        return _LABEL_BY_COLUMN[column.strip().lower()]
    except KeyError:
        raise ValueError(f"not an RSNA label column: {column!r}") from None


def parse_condition(text: str) -> Condition:
    """``Left Neural Foraminal Narrowing`` (any case) -> Condition."""
    try:
        return _CONDITION_BY_DISPLAY[" ".join(text.split()).lower()]
    except KeyError:
        raise ValueError(f"not an RSNA condition: {text!r}") from None


def parse_level(text: str) -> Level:
    """``L1/L2`` (also ``l1_l2``, ``L1-L2``) -> Level."""
    norm = text.strip().upper().replace("_", "/").replace("-", "/")
    try:
        return Level(norm)
    except ValueError:
        raise ValueError(f"not a lumbar disc level: {text!r}") from None


def parse_severity(value: object) -> Severity | None:
    """``Normal/Mild`` | ``Moderate`` | ``Severe`` -> Severity; empty or NaN -> None (unlabelled)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    if not text or text.lower() == "nan":
        return None
    try:
        return _SEVERITY_BY_NAME[text.lower()]
    except KeyError:
        raise ValueError(f"not an RSNA severity: {value!r}") from None
