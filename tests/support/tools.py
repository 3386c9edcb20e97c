"""The project's own command and the external tools its setup installs, as the tests run them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PHANTOM_SEED = 20240
PHANTOM_STUDIES = 8


def require_tool(name: str) -> str:
    """Path of an external tool that the project's setup installs; fail (not skip) without it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/setup.sh (it installs the Debian packages)")
    return path


def lumbar_node(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the installed ``lumbar-node`` console command."""
    exe = Path(sys.executable).with_name("lumbar-node")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=check, timeout=600)
