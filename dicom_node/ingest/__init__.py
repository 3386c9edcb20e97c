"""Ingest: admission of an instance, whatever brought it (C-STORE, the web upload): the header
checks read before anything is decoded or inflated (``checks``: truncation, image size, the
Deflate bound, the series size, whether it (re)opens a study for grading)."""

from dicom_node.ingest.checks import (
    PIXEL_DATA,
    UNDEFINED_LENGTH,
    image_size_problem,
    inflated_size_problem,
    reopens_study,
    series_size_of,
    truncation,
)

__all__ = ["PIXEL_DATA", "UNDEFINED_LENGTH", "image_size_problem", "inflated_size_problem", "reopens_study",
           "series_size_of", "truncation"]
