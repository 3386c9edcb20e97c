"""The shared core of the product, torch-free: the label set, the RSNA layout, geometry, series
roles, volumes, preprocessing, level decoding, model metadata, the ONNX runtime and the analysis
of one study. Every other package (dicom_node, phantom, training, export) builds on it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lumbar-node")  # the one version: the distribution's metadata (pyproject.toml)
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"
