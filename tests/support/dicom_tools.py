"""The real DICOM validators the project's setup installs (Debian packages), as functions."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.tools import require_tool

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
