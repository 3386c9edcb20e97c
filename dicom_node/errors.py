"""The node's error root. Every error the node raises on purpose is a ``NodeError``; each keeps
the standard base it had before (``ValueError``, ``RuntimeError``), so callers that catch those
still do; the commands print a ``NodeError`` as one line, never a traceback. The typed errors
live where they are raised:

- ``config.ConfigError`` (ValueError): a configuration that does not load;
- ``store.UnsafePath`` (ValueError): a path built from received values would leave its folder;
- ``store.LedgerVersionError`` (RuntimeError): a ledger written by a newer lumbar-node;
- ``dicom.Refused``: an instance the storage SCP does not store (the status to answer);
- ``dicom.DeliveryError`` (RuntimeError): a destination did not store every file;
- ``pipeline.GradingTimeout``: a grading that ran past ``limits.grading_timeout_s``;
- ``web.AccountError`` (ValueError), ``web.UploadError`` (ValueError).
"""

from __future__ import annotations

__all__ = ["NodeError"]


class NodeError(Exception):
    """The root of the node's own errors."""
