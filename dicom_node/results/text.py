"""A study result as text: the fixed-width table and the JSON that ``predict`` prints and every
run writes beside its SR and SC (results.txt, results.json)."""

from __future__ import annotations

from typing import Any

from dicom_node.results.identity import DISCLAIMER
from inference.analyze import AssessedLabel, StudyResult
from inference.labels import SEVERITY_NAMES


def result_json(result: StudyResult) -> dict[str, Any]:
    """A study result as plain JSON (Grad-CAM maps left out)."""
    labels = []
    for r in result.labels:
        item: dict[str, Any] = {"label": r.label.column, "condition": r.label.condition.display,
                                "level": r.label.level.value, "assessed": r.assessed}
        if isinstance(r, AssessedLabel):
            item.update({"grade": r.grade.display,
                         "probabilities": dict(zip(SEVERITY_NAMES, r.probabilities, strict=True)),
                         "series_uid": r.location.series_uid, "sop_instance_uid": r.location.sop_instance_uid,
                         "instance_number": r.location.instance_number, "pixel_xy": r.location.pixel,
                         "patient_xyz": r.location.patient})
        else:
            item["reason"] = r.reason
        labels.append(item)
    info = result.model
    return {"study_uid": result.study_uid, "disclaimer": DISCLAIMER,
            "model": {"name": info.name, "version": info.version, "sha256": info.sha256,
                      "training_data": info.training_data},
            "series_roles": {role.value: list(uids) for role, uids in result.series_roles.items()},
            "seconds": result.seconds, "labels": labels}


def result_table(result: StudyResult) -> str:
    """A fixed-width table, one row per label."""
    lines = [f"Study {result.study_uid}", DISCLAIMER,
             f"{'level':6} {'condition':34} {'grade':12} {'P(N/M)':>7} {'P(Mod)':>7} {'P(Sev)':>7}  where"]
    for r in result.labels:
        if isinstance(r, AssessedLabel):
            p = r.probabilities
            where = f"series ...{r.location.series_uid[-8:]} image {r.location.instance_number}"
            lines.append(f"{r.label.level.value:6} {r.label.condition.display:34} {r.grade.display:12} "
                         f"{p[0]:7.3f} {p[1]:7.3f} {p[2]:7.3f}  {where}")
        else:
            lines.append(f"{r.label.level.value:6} {r.label.condition.display:34} {'not assessed':12} {r.reason}")
    return "\n".join(lines)
