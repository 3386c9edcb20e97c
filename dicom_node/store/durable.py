"""Files that survive a power loss: written beside their target, fsynced, renamed into place, and
their folder fsynced; and fsync of files another process wrote, before the ledger publishes them."""

from __future__ import annotations

import grp
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

PRIVATE_UMASK = 0o077  # files 0600, folders 0700: the node's user only
GROUP_UMASK = 0o027  # files 0640, folders 0750: and the configured group may read
INCOMING_PREFIX = ".incoming-"  # a file being written (a crash may leave one behind)


def restrict_access(folders: Iterable[Path], group: str | None = None, shared: Iterable[Path] = ()) -> None:
    """Make everything the node creates from now on readable by its own user only (umask 077),
    or also by ``group`` (umask 027, the folders owned by that group with setgid so that new
    files inherit it). ``folders`` are the node's own (created or set to those modes);
    ``shared`` ones (the ledger's folder, which may be anyone's) are only created if missing.
    Process-wide: the grading workers inherit it."""
    gid = grp.getgrnam(group).gr_gid if group else None
    os.umask(PRIVATE_UMASK if gid is None else GROUP_UMASK)
    for folder in shared:
        folder.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        if gid is None:
            folder.chmod(0o700)
        else:
            os.chown(folder, -1, gid)
            folder.chmod(0o2750)


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that the names in it (a rename, a new file) are on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(data: bytes, target: Path, fsync: bool = True, mode: int | None = None) -> None:
    """Write to a temporary file in the target's folder, fsync, rename into place, fsync the folder.

    The file gets the permission bits any new file of the process gets (0666 less the umask that
    ``restrict_access`` set: 0600, or 0640 with a group), and the folder's group when the folder is
    setgid; ``mode`` sets exactly these bits instead (the file is never wider than ``mode`` meanwhile)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_beside(target, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)  # exactly ``mode``, whatever the umask
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
        if fsync:
            fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_beside(target: Path, mode: int) -> tuple[int, Path]:
    """A new temporary file ``.incoming-<random>`` in the target's folder, opened for writing and
    created with ``mode`` less the umask (``tempfile.mkstemp`` would make it 0600 whatever the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for _ in range(100):
        tmp = target.parent / f"{INCOMING_PREFIX}{secrets.token_hex(8)}"
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


def fsync_files(paths: Iterable[Path]) -> None:
    """fsync each file and then each folder that holds one (files a worker wrote, before the
    commit that makes them a published result)."""
    folders: set[Path] = set()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        folders.add(path.parent)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(folder)
        if folder.parent not in folders:
            fsync_dir(folder.parent)
