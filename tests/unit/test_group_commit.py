"""Group commit (store.GroupCommit): an instance is answered only once the round that renames,
fsyncs and records it has committed; instances filed meanwhile share the next round; an error fails
its round's instances and records none of them; the ledger's writers take turns across processes."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

import dicom_node.store.commit as commit_module
from dicom_node.states import StudyState
from dicom_node.store import GroupCommit, InstanceRecord, Ledger, Recorded, write_beside

MR = "1.2.840.10008.5.1.4.1.1.4"


def _record(spool: Path, n: int, study: str = "1.2.3", series: str = "1.2.3.1") -> InstanceRecord:
    return InstanceRecord(f"{series}.{n}", study, series, MR, spool / study / series / f"{n}.dcm", "PACS", None,
                          True, f"digest-{n}")


class PausedLedger(Ledger):
    """The real ledger, whose next ``record_instances`` waits until ``go`` is set (a slow commit)."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.entered, self.go = threading.Event(), threading.Event()
        self.rounds: list[int] = []

    def record_instances(self, records: list[InstanceRecord]) -> list[Recorded]:
        self.rounds.append(len(records))
        self.entered.set()
        assert self.go.wait(30)
        return super().record_instances(records)


def _file_in_thread(commits: GroupCommit, record: InstanceRecord, results: dict[str, object]) -> threading.Thread:
    def run() -> None:
        try:
            results[record.sop_instance_uid] = commits.file(write_beside(b"DICM" + record.digest.encode(),
                                                                         record.path), record)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            results[record.sop_instance_uid] = exc
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_an_instance_is_answered_only_after_its_round_commits_and_the_others_share_the_next(tmp_path: Path) -> None:
    ledger = PausedLedger(tmp_path / "ledger.sqlite")
    commits = GroupCommit(ledger)
    spool = tmp_path / "spool"
    results: dict[str, object] = {}
    first = _file_in_thread(commits, _record(spool, 0), results)
    assert ledger.entered.wait(10)
    time.sleep(0.2)
    assert not results and first.is_alive()  # its round has not committed: no answer yet
    assert ledger.instance("1.2.3.1", "1.2.3.1.0") is None
    others = [_file_in_thread(commits, _record(spool, n), results) for n in range(1, 6)]
    time.sleep(0.3)
    assert not results  # waiting for the round in progress, not committing on their own
    ledger.go.set()
    for thread in [first, *others]:
        thread.join(10)
    assert results == {f"1.2.3.1.{n}": Recorded.NEW for n in range(6)}
    assert ledger.rounds == [1, 5] and commits.rounds == 2 and commits.filed == 6
    for n in range(6):
        assert ledger.instance("1.2.3.1", f"1.2.3.1.{n}") is not None
        assert (spool / "1.2.3" / "1.2.3.1" / f"{n}.dcm").read_bytes() == f"DICMdigest-{n}".encode()
    assert not [p for p in (spool / "1.2.3" / "1.2.3.1").iterdir() if p.name.startswith(".incoming-")]
    study = ledger.study("1.2.3")
    assert study is not None and study.state is StudyState.RECEIVING
    ledger.close()


def test_a_ledger_error_fails_its_round_and_records_none_of_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    commits = GroupCommit(ledger)
    spool = tmp_path / "spool"
    real = ledger.record_instances

    def broken(records: list[InstanceRecord]) -> list[Recorded]:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ledger, "record_instances", broken)
    record = _record(spool, 1)
    with pytest.raises(OSError, match="No space"):
        commits.file(write_beside(b"DICM", record.path), record)
    assert ledger.instance(record.series_uid, record.sop_instance_uid) is None
    monkeypatch.setattr(ledger, "record_instances", real)
    assert commits.file(write_beside(b"DICM", record.path), record) is Recorded.NEW  # the re-send is filed
    assert commits.file(write_beside(b"DICM", record.path), record) is Recorded.RESENT
    ledger.close()


def test_a_file_that_cannot_be_renamed_fails_alone(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    commits = GroupCommit(ledger)
    gone = _record(tmp_path / "spool", 1)
    with pytest.raises(FileNotFoundError):
        commits.file(tmp_path / "never-written", gone)
    assert ledger.instance(gone.series_uid, gone.sop_instance_uid) is None
    ok = _record(tmp_path / "spool", 2)
    assert commits.file(write_beside(b"DICM", ok.path), ok) is Recorded.NEW
    ledger.close()


def test_new_folders_are_fsynced_with_their_parents_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(commit_module, "fsync_dir", synced.append)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    commits = GroupCommit(ledger)
    spool = tmp_path / "spool"
    for n in (1, 2):
        record = _record(spool, n)
        commits.file(write_beside(b"DICM", record.path), record)
    series = spool / "1.2.3" / "1.2.3.1"
    assert synced == [series, series.parent, spool, series]  # the new series: its study and the spool too
    synced.clear()
    other = _record(spool, 3, series="1.2.3.2")
    commits.file(write_beside(b"DICM", other.path), other)
    assert synced == [spool / "1.2.3" / "1.2.3.2", spool / "1.2.3", spool]
    synced.clear()
    no_sync = GroupCommit(ledger, fsync=False)
    last = _record(spool, 4)
    assert no_sync.file(write_beside(b"DICM", last.path, fsync=False), last) is Recorded.NEW
    assert synced == []
    ledger.close()


def test_the_ledger_writers_take_turns_across_processes(tmp_path: Path) -> None:
    """A write transaction waits for the writer lock another process holds, and goes on once it is released."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.record_instance("1.1", "1", "1.0", MR, tmp_path / "x.dcm", "PACS")
    done = threading.Event()
    child = os.fork()
    if child == 0:  # another process holds the lock for 0.5 s
        try:
            fcntl.flock(os.open(tmp_path / "ledger.sqlite-writer.lock", os.O_RDWR), fcntl.LOCK_EX)
            time.sleep(0.5)
        finally:
            os._exit(0)
    time.sleep(0.1)

    def write() -> None:
        ledger.set_state("1", StudyState.ANALYSING)
        done.set()
    started = time.monotonic()
    threading.Thread(target=write).start()
    assert done.wait(10)
    waited = time.monotonic() - started
    os.waitpid(child, 0)
    assert 0.2 < waited < 5, waited
    study = ledger.study("1")
    assert study is not None and study.state is StudyState.ANALYSING
    ledger.close()
