"""store.durable: spooled files get the access rights the node was configured for (0600, or 0640
with ``storage.group``), an explicit mode is exact, and a failed write leaves nothing behind; a
run's files are each fsynced (at once, on threads) and then their folders, once each."""

from __future__ import annotations

import grp
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.store import Syncer, restrict_access, spool_path, write_durably


@pytest.fixture(autouse=True)
def umask_restored() -> Iterator[None]:
    """restrict_access sets the process's umask: put back what the test run had."""
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_spooled_instance_is_readable_by_the_configured_group(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    group = grp.getgrgid(os.getgid()).gr_name  # a group this user is in
    restrict_access([spool], group)
    target = spool_path(spool, "1.2.3", "1.2.3.4", "1.2.3.4.5")
    write_durably(b"DICM", target)
    assert _mode(target) == 0o640 and target.stat().st_gid == grp.getgrnam(group).gr_gid
    assert _mode(spool) == 0o2750 and target.read_bytes() == b"DICM"
    assert _mode(target.parent) == 0o2750 and target.parent.stat().st_gid == target.stat().st_gid  # setgid inherited
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary file left


def test_without_a_group_a_spooled_instance_is_the_node_users_only(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    restrict_access([spool])
    target = spool_path(spool, "1.2.3", "1.2.3.4", "1.2.3.4.5")
    write_durably(b"DICM", target, fsync=False)
    assert _mode(target) == 0o600 and _mode(spool) == 0o700 and _mode(target.parent) == 0o700


def test_an_explicit_mode_is_exact_whatever_the_umask(tmp_path: Path) -> None:
    os.umask(0o027)
    secret = tmp_path / "accounts.yaml"
    write_durably(b"a: 1\n", secret, mode=0o600)
    assert _mode(secret) == 0o600
    os.umask(0o077)
    wide = tmp_path / "wide.txt"
    write_durably(b"x", wide, fsync=False, mode=0o644)
    assert _mode(wide) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path: Path) -> None:
    target = tmp_path / "x.dcm"
    write_durably(b"old", target)
    with pytest.raises(TypeError):
        write_durably("not bytes", target)  # type: ignore[arg-type]  # the wrong type, on purpose
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.dcm"]


_SYNC_A_RUN = """
import sys
from pathlib import Path
from dicom_node.store import Syncer
paths = [Path(p) for p in sys.argv[1:]]
with Syncer() as syncer:
    for path in paths:
        syncer.add(path)
    syncer.finish()
"""


def test_the_syncer_fsyncs_every_file_then_each_folder_and_its_parent_once(tmp_path: Path) -> None:
    """Seen by strace: an fsync of each file, then one of each folder that holds some (the SC
    folder, the run folder) and of the run folder's parent (the study's folder)."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    run = tmp_path / "study" / "run-1"
    (run / "SC").mkdir(parents=True)
    files = [run / "SR.dcm", *(run / "SC" / f"{i:02d}.dcm" for i in range(5)), run / "results.json"]
    for f in files:
        f.write_bytes(b"x" * 1000)
    traced = subprocess.run([strace, "-f", "-y", "-e", "trace=fsync", sys.executable, "-c", _SYNC_A_RUN,
                             *map(str, files)], capture_output=True, text=True, timeout=120, check=True)
    synced = re.findall(r"fsync\(\d+<([^>]*)>", traced.stderr)  # a call, or its start when strace splits it
    assert "= -1" not in traced.stderr
    assert sorted(synced) == sorted([*map(str, files), str(run / "SC"), str(run), str(run.parent)])
    assert all(synced.index(str(f)) < synced.index(str(run / "SC")) for f in files)  # the files first


def test_a_file_gone_before_its_fsync_is_an_error_not_a_published_run(tmp_path: Path) -> None:
    kept, gone = tmp_path / "kept.dcm", tmp_path / "gone.dcm"
    kept.write_bytes(b"x")
    with Syncer() as syncer:
        syncer.add(kept)
        syncer.add(gone)  # never written
        with pytest.raises(FileNotFoundError):
            syncer.finish()
