"""The one label definition matches the RSNA 2024 files."""

from __future__ import annotations

import math

import pytest

from inference.labels import (
    CONDITIONS,
    LABEL_COLUMNS,
    LABELS,
    LEVELS,
    SEVERITY_WEIGHTS,
    ConditionGroup,
    SeriesRole,
    Severity,
    Side,
    parse_column,
    parse_condition,
    parse_level,
    parse_severity,
)


def test_25_columns_in_rsna_order() -> None:
    assert len(LABEL_COLUMNS) == 25 == len(set(LABEL_COLUMNS))
    assert LABEL_COLUMNS[0] == "spinal_canal_stenosis_l1_l2"
    assert LABEL_COLUMNS[4] == "spinal_canal_stenosis_l5_s1"
    assert LABEL_COLUMNS[5] == "left_neural_foraminal_narrowing_l1_l2"
    assert LABEL_COLUMNS[10] == "right_neural_foraminal_narrowing_l1_l2"
    assert LABEL_COLUMNS[15] == "left_subarticular_stenosis_l1_l2"
    assert LABEL_COLUMNS[24] == "right_subarticular_stenosis_l5_s1"


def test_display_names_are_the_coordinate_file_spellings() -> None:
    assert [c.display for c in CONDITIONS] == [
        "Spinal Canal Stenosis",
        "Left Neural Foraminal Narrowing",
        "Right Neural Foraminal Narrowing",
        "Left Subarticular Stenosis",
        "Right Subarticular Stenosis",
    ]
    assert [lv.value for lv in LEVELS] == ["L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"]


def test_parsing_round_trips() -> None:
    for label in LABELS:
        assert parse_column(label.column) == label
        assert parse_condition(label.condition.display) == label.condition
        assert parse_level(label.level.value) is label.level
    assert parse_level("l4_l5") is parse_level("L4-L5") is LEVELS[3]
    assert parse_condition("  left  subarticular STENOSIS ").side is Side.LEFT


@pytest.mark.parametrize(("text", "grade"), [
    ("Normal/Mild", Severity.NORMAL_MILD), ("Moderate", Severity.MODERATE), ("Severe", Severity.SEVERE),
    ("", None), (None, None), (math.nan, None), ("nan", None),
])
def test_severity_parsing(text: object, grade: Severity | None) -> None:
    assert parse_severity(text) is grade


@pytest.mark.parametrize("bad", ["Mild", "normal", "3"])
def test_unknown_values_are_errors(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_severity(bad)
    with pytest.raises(ValueError):
        parse_column(bad)
    with pytest.raises(ValueError):
        parse_condition(bad)
    with pytest.raises(ValueError):
        parse_level(bad)


def test_weights_and_series_roles() -> None:
    assert SEVERITY_WEIGHTS == (1.0, 2.0, 4.0)
    assert [s.weight for s in Severity] == [1.0, 2.0, 4.0]
    roles = {c.group: c.series_role for c in CONDITIONS}
    assert roles == {
        ConditionGroup.SPINAL: SeriesRole.SAG_T2,
        ConditionGroup.FORAMINAL: SeriesRole.SAG_T1,
        ConditionGroup.SUBARTICULAR: SeriesRole.AX_T2,
    }
