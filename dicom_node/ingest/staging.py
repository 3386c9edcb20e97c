"""The spool's staging area, ``spool/.incoming/``: where an upload (or a STOW-RS request) is
streamed to disk before admission, on the spool's own file system so that an admitted file is
renamed into place (``os.replace``), never copied. Each upload gets its own folder, removed with
whatever admission did not take; folders left by a crash are removed when the node starts."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

STAGING_FOLDER = ".incoming"  # a study folder is a UID: never starts with a dot


@dataclass
class StagingArea:
    """One upload's private folder under the staging area; its files are numbered, never named
    after what the user sent (a file name may hold a patient's name)."""

    folder: Path
    _count: int = field(default=0, init=False)

    def new_file(self, kind: str = "part") -> tuple[Path, BinaryIO]:
        """A new empty file of this area, open for writing (the caller closes it)."""
        self._count += 1
        path = self.folder / f"{self._count:06d}.{kind}"
        return path, open(path, "xb", buffering=2**20)

    def free_bytes(self) -> int:
        """Free space of the file system the area is on."""
        return shutil.disk_usage(self.folder).free


class Staging:
    """The staging area of a spool: ``spool/.incoming``."""

    def __init__(self, spool: Path):
        self.root = spool / STAGING_FOLDER

    def clear(self) -> int:
        """Remove what a previous run left staged (nothing is admitted from here after a crash);
        how many entries were removed."""
        if not self.root.is_dir():
            return 0
        removed = 0
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        return removed

    @contextmanager
    def area(self) -> Iterator[StagingArea]:
        """A private folder for one upload, removed with what is left in it on exit."""
        self.root.mkdir(parents=True, exist_ok=True)
        folder = self.root / secrets.token_hex(8)
        folder.mkdir(mode=0o700)
        try:
            yield StagingArea(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

