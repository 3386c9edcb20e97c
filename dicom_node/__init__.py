"""Lumbar spine MRI AI DICOM node: the service and its command line."""

from inference import __version__

__all__ = ["__version__"]
