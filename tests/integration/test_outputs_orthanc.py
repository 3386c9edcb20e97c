"""The SR, Secondary Captures, PDF summary and key images (KOS), sent by C-STORE to a real Orthanc,
land in the source study; the KOS read back from Orthanc lists images that Orthanc holds."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import pydicom

from demo.orthanc import running_orthanc, storescu
from tests.support.tools import lumbar_node


def test_results_land_in_the_same_study_as_the_source_images(phantom_dir: Path, tmp_path: Path) -> None:
    study = sorted((phantom_dir / "train_images").iterdir())[2]
    out = tmp_path / "out"
    lumbar_node("predict", str(study), "--out", str(out))
    results = sorted(out.rglob("*.dcm"))
    sources = sorted(study.rglob("*.dcm"))
    [kos_path] = [p for p in results if p.name.startswith("KOS_")]
    with running_orthanc(tmp_path / "orthanc") as pacs:
        sent = storescu(sources + results, pacs.dicom_port)
        assert sent.returncode == 0, sent.stderr[-2000:]
        [study_id] = pacs.get("/studies")
        series = [pacs.get(f"/series/{s}") for s in pacs.get(f"/studies/{study_id}")["Series"]]
        modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
        assert modalities.count("MR") == len({p.parent for p in sources})
        assert "SR" in modalities and "OT" in modalities and "DOC" in modalities and modalities.count("KO") == 1
        instances = sum(len(s["Instances"]) for s in series)
        assert instances == len(sources) + len(results)
        [ko_series] = [s for s in series if s["MainDicomTags"].get("Modality") == "KO"]
        [ko_id] = ko_series["Instances"]
        stored = pydicom.dcmread(io.BytesIO(pacs.get_bytes(f"/instances/{ko_id}/file")))
        document = hd.ko.KeyObjectSelectionDocument.from_dataset(stored)
        assert document.SOPInstanceUID == pydicom.dcmread(kos_path).SOPInstanceUID
        assert document.ContentSequence == pydicom.dcmread(kos_path).ContentSequence
        listed = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in document.content.get_references()]
        assert listed
        mr_series = {s["ID"] for s in series if s["MainDicomTags"].get("Modality") == "MR"}
        held = {i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.get(f"/studies/{study_id}/instances")
                if i["ParentSeries"] in mr_series}
        assert set(listed) <= held  # each key image is an MR image of the study that Orthanc holds
