"""The one definition of the RSNA 2024 Lumbar Spine folder layout (the real Kaggle data and the
phantom alike): file names, CSV columns and the coordinate row.

    train.csv                       study_id + the 25 label columns, in any order
    train_label_coordinates.csv     study_id,series_id,instance_number,condition,level,x,y
    train_series_descriptions.csv   study_id,series_id,series_description
    train_images/<study_id>/<series_id>/<instance_number>.dcm

It lives here, beside the label set, because both the phantom (which writes the layout) and
training (which reads it) use it, and neither may import the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.labels import Label

TRAIN_CSV = "train.csv"
COORDINATES_CSV = "train_label_coordinates.csv"
SERIES_CSV = "train_series_descriptions.csv"
IMAGES_DIR = "train_images"
COORDINATE_COLUMNS = ("study_id", "series_id", "instance_number", "condition", "level", "x", "y")
SERIES_COLUMNS = ("study_id", "series_id", "series_description")


@dataclass(frozen=True)
class Coordinate:
    """One row of train_label_coordinates.csv: where a label was marked, in pixels."""

    label: Label
    series_id: int
    instance_number: int
    x: float
    y: float
