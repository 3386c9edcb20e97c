"""The real Orthanc and DCMTK sender used by the tests (see dicom_node/orthanc.py)."""

from dicom_node.orthanc import ORTHANC_AET, Orthanc, free_port, running_orthanc, storescu

__all__ = ["ORTHANC_AET", "Orthanc", "free_port", "running_orthanc", "storescu"]
