"""The real DICOM validators the project's setup installs (Debian packages), as functions."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom.sr.coding import Code

from dicom_node.results import codes as C
from tests.support.tools import require_tool

ROOT = '/CONTAINER (126000,DCM,"Imaging Measurement Report")'
GROUP = f'{ROOT}/CONTAINER (126010,DCM,"Imaging Measurements")/CONTAINER (125007,DCM,"Measurement Group")'
EVALUATIONS = f'{ROOT}/CONTAINER (C0034375,UMLS,"Qualitative Evaluations")'
NOT_ASSESSED = f'{EVALUATIONS}/CODE (AST,99LUMBAR,"Assessment status")'


def _code(c: Code) -> str:
    return f'({c.value},{c.scheme_designator},"{c.meaning}")'


# What Debian's PixelMed (20220618) reports as "Content Item not in template", and only this
# (docs/CONFORMANCE.md): the severity, a qualitative evaluation in a TID 1410 group (a CODE row whose
# concept is a template parameter, absent from PixelMed's compiled TID 1410), and the concept
# modifiers and tracking identifier of a "not assessed" evaluation (TID 1500 is extensible; PixelMed
# has no rows under its document-level qualitative evaluations).
TOLERATED = (
    f"{GROUP}/CODE {_code(C.SEVERITY)}",
    f'{NOT_ASSESSED}/TEXT (112039,DCM,"Tracking Identifier")',
    f'{NOT_ASSESSED}/UIDREF (112040,DCM,"Tracking Unique Identifier")',
    f'{NOT_ASSESSED}/CODE (121071,DCM,"Finding")',
    f'{NOT_ASSESSED}/CODE (363698007,SCT,"Finding Site")',
    f'{NOT_ASSESSED}/CODE (363698007,SCT,"Finding Site")/CODE (272741003,SCT,"Laterality")',
    f"{NOT_ASSESSED}/CODE {_code(C.REASON)}",
)


def pixelmed_unexpected(report: str) -> list[str]:
    """PixelMed's errors, and its warnings but the tolerated "Content Item not in template" ones."""
    lines = report.splitlines()
    errors = [line for line in lines if line.startswith(("Error", "Internal Error"))]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors + [line for line in warnings
                     if not any(line.endswith(f"{t}: Content Item not in template") for t in TOLERATED)]

PIXELMED_CP = "/usr/share/java/pixelmed.jar:/usr/share/java/commons-codec.jar"


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([require_tool("dciodvfy"), "-new", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def pixelmed_sr_report(path: Path) -> str:
    """PixelMed's DicomSRValidator output (Java 17 needs the XPath limits lifted)."""
    java = require_tool("java")
    if not Path("/usr/share/java/pixelmed.jar").is_file():
        raise AssertionError("libpixelmed-java is not installed: run scripts/setup.sh")
    cmd = [java, "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0",
           "-Xss8m", "-cp", PIXELMED_CP, "com.pixelmed.validate.DicomSRValidator", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return out.stdout + out.stderr


def dcentvfy_errors(paths: list[Path]) -> list[str]:
    """dcentvfy: patient/study/series attributes consistent across the given instances."""
    out = subprocess.run([require_tool("dcentvfy"), *map(str, paths)], capture_output=True, text=True, timeout=300)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
