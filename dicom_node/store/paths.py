"""Checks on values received from the network before they touch the file system: UIDs (PS3.5
9.1) and paths that must lie under one of the node's own folders."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

from pydicom import config
from pydicom.uid import UID

from dicom_node.errors import NodeError

MAX_UID_LENGTH = 64


class UnsafePath(NodeError, ValueError):
    """A path built from received values would leave the node's folder."""


def uid_problem(value: object, name: str) -> str | None:
    """Why ``value`` is not a valid UID (PS3.5 9.1: digits and dots, 1-64 characters, no leading
    zeros in a component: pydicom's ``UID.is_valid``), or None if it is one."""
    text = "" if value is None else str(value)
    if not text:
        return f"{name} is empty"
    if len(text) > MAX_UID_LENGTH:
        return f"{name} is {len(text)} characters long (at most {MAX_UID_LENGTH})"
    # unchecked on the way in (pydicom's check would log a warning naming the value); UID() strips
    # spaces, the spool's paths would not
    if text != text.strip() or not UID(text, validation_mode=config.IGNORE).is_valid:
        return f"{name} is not a UID (digits and dots, no leading zeros): {text[:80]!r}"
    return None


def under(root: Path, *parts: str) -> Path:
    """``root`` resolved, then ``/ parts...``; UnsafePath unless every part is one plain name (no
    separator, no NUL, not '.' or '..', not empty), so the path lies inside ``root``. The parts are
    checked as names, not resolved one by one against the disk (a lookup of every folder above them,
    per received image): the node's own folders hold no links, it makes none."""
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\0" in part:
            raise UnsafePath(f"{'/'.join(parts)!r} leaves {root}")
    return _resolved(str(root)).joinpath(*parts)


@functools.lru_cache(maxsize=64)
def _resolved(root: str) -> Path:
    return Path(root).resolve()


def remove_tree(root: Path, path: Path) -> None:
    """Remove ``path`` (a folder under ``root``) and what it holds; UnsafePath if it is not under it."""
    target = path.resolve()
    base = root.resolve()
    if target == base or not target.is_relative_to(base):
        raise UnsafePath(f"refusing to remove {target}: not under {base}")
    shutil.rmtree(target, ignore_errors=True)
