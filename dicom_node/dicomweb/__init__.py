"""DICOMweb in and out (PS3.18), beside ``dicom/`` for DIMSE: STOW-RS as the node takes it (the
request body streamed to the spool's staging area, ``related``; each instance through the node's
one admission and the Store Instances Response, ``stow``), and STOW-RS as the node stores its
results on a DICOMweb destination (``client``, with dicomweb-client); QIDO-RS and WADO-RS from a
DICOMweb query/retrieve source (``retrieve``: the Q/R vocabulary is ``dicom.qr``'s). The HTTP endpoint itself is
the web page's (``web/routes/dicomweb``)."""

from dicom_node.dicomweb.client import StowClientError, store_files
from dicom_node.dicomweb.related import (
    MEDIA_TYPE,
    RESPONSE_TYPE,
    ReceivedBody,
    RelatedLimits,
    StowError,
    boundary_of,
    read_related,
)
from dicom_node.dicomweb.retrieve import DicomWebSource
from dicom_node.dicomweb.stow import STUDY_MISMATCH, Failed, Stored, StowResult, store_parts

__all__ = ["MEDIA_TYPE", "RESPONSE_TYPE", "STUDY_MISMATCH", "DicomWebSource", "Failed", "ReceivedBody",
           "RelatedLimits", "Stored", "StowClientError", "StowError", "StowResult", "boundary_of", "read_related",
           "store_files", "store_parts"]
