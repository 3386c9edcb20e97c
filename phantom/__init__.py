"""Synthetic lumbar spine MRI phantom written as real DICOM in the RSNA 2024 layout."""

from phantom.acquisition import MatrixSize
from phantom.dicom import PhantomStyle
from phantom.generate import (
    PhantomStudy,
    generate_dataset,
    make_study,
    write_csvs,
    write_study,
)

__all__ = ["MatrixSize", "PhantomStudy", "PhantomStyle", "generate_dataset", "make_study", "write_csvs", "write_study"]
