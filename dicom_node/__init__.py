"""Lumbar spine MRI AI DICOM node: the service and its command line."""

__version__ = "0.1.0"
