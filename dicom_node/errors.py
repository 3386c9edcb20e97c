"""The node's error root. Every error the node raises on purpose is a ``NodeError``; each keeps
the standard base it had before (``ValueError``, ``RuntimeError``), so callers that catch those
still do; the commands print a ``NodeError`` as one line, never a traceback. The typed errors
live where they are raised:

- ``config.ConfigError`` (ValueError): a configuration that does not load;
- ``store.UnsafePath`` (ValueError): a path built from received values would leave its folder;
- ``ingest.Refused`` (ValueError): an instance the admission does not store (the status to answer, the
  reason), ``ingest.UploadError`` (ValueError): an upload that is refused (its kind, the HTTP status);
- ``store.LedgerVersionError`` (RuntimeError): a ledger written by a newer lumbar-node;
- ``dicom.DeliveryError`` (RuntimeError): a destination did not store every file;
- ``pipeline.GradingTimeout``: a grading that ran past ``limits.grading_timeout_s``;
- ``web.AccountError`` (ValueError).
"""

from __future__ import annotations

__all__ = ["NodeError"]


class NodeError(Exception):
    """The root of the node's own errors."""
