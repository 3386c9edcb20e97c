"""The SR and Secondary Captures, sent by C-STORE to a real Orthanc, land in the source study."""

from __future__ import annotations

from pathlib import Path

from demo.orthanc import running_orthanc, storescu
from tests.support.tools import lumbar_node


def test_results_land_in_the_same_study_as_the_source_images(phantom_dir: Path, tmp_path: Path) -> None:
    study = sorted((phantom_dir / "train_images").iterdir())[2]
    out = tmp_path / "out"
    lumbar_node("predict", str(study), "--out", str(out))
    results = sorted(out.rglob("*.dcm"))
    sources = sorted(study.rglob("*.dcm"))
    with running_orthanc(tmp_path / "orthanc") as pacs:
        sent = storescu(sources + results, pacs.dicom_port)
        assert sent.returncode == 0, sent.stderr[-2000:]
        [study_id] = pacs.get("/studies")
        series = [pacs.get(f"/series/{s}") for s in pacs.get(f"/studies/{study_id}")["Series"]]
        modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
        assert modalities.count("MR") == len({p.parent for p in sources})
        assert "SR" in modalities and "OT" in modalities
        instances = sum(len(s["Instances"]) for s in series)
        assert instances == len(sources) + len(results)
