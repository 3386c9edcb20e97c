"""Group commit: instances filed at the same time (parallel associations) share one round of folder
fsyncs and one ledger transaction, so N senders cost one sync of the folders and one sync of the
ledger's WAL per round instead of N of each.

Each caller writes its file beside its target and fsyncs it (in its own thread: concurrent fsyncs
are one journal commit for the file system), then hands it to ``GroupCommit.file``, which returns
only once the file is renamed into place, its folder (and, the first time, the folders above) is
fsynced and the ledger transaction that records it is committed: so a C-STORE answered success
is on disk and in the ledger, as with one fsync and one commit per instance. No thread of its own:
the first caller to find no round running leads one for everything pending (its own included);
the others wait for it, and one of those still pending leads the next round.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from dicom_node.store.durable import fsync_dir
from dicom_node.store.ledger import InstanceRecord, Ledger, Recorded

__all__ = ["GroupCommit"]

MAX_BATCH = 256  # instances per round at most


@dataclass
class _Item:
    staged: Path  # written and fsynced by its caller
    record: InstanceRecord  # record.path: where it goes
    outcome: Recorded | None = None
    error: BaseException | None = None
    done: bool = False


class GroupCommit:
    """Renames written files into place and records them in the ledger, in rounds shared by the
    threads that file at the same time. ``fsync``: storage.fsync (the folders' syncs; the ledger
    syncs its commit whatever it is)."""

    def __init__(self, ledger: Ledger, fsync: bool = True, max_batch: int = MAX_BATCH):
        self.ledger, self.fsync, self.max_batch = ledger, fsync, max_batch
        self._cond = threading.Condition()
        self._pending: list[_Item] = []
        self._leading = False
        self._synced: dict[Path, int] = {}  # folder -> inode: its entry in its parent fsynced by this process
        self.rounds = 0  # rounds committed (for tests and benchmarks)
        self.filed = 0  # instances handed in

    def file(self, staged: Path, record: InstanceRecord) -> Recorded:
        """Rename ``staged`` (a file in the target's file system, already fsynced unless storage.fsync
        is off) to ``record.path`` and record it, in the next round; what the ledger made of it.
        Raises the round's error (OSError for the disk; nothing of that round is recorded then)."""
        item = _Item(staged, record)
        with self._cond:
            self._pending.append(item)
        while True:
            with self._cond:
                while self._leading and not item.done:
                    self._cond.wait()
                if item.done:
                    return _result(item)
                self._leading = True
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()

    def _commit(self, batch: list[_Item]) -> None:
        """One round: the renames, the folders' fsyncs, one ledger transaction; every item done."""
        self.rounds += 1
        self.filed += len(batch)
        try:
            live: list[_Item] = []
            for item in batch:
                try:
                    os.replace(item.staged, item.record.path)
                    live.append(item)
                except OSError as exc:
                    item.error = exc
                    item.staged.unlink(missing_ok=True)
            if self.fsync and live:
                try:
                    self._sync_folders({item.record.path.parent for item in live})
                except OSError as exc:
                    for item in live:
                        item.error = exc
                    live = []
            if live:
                try:
                    outcomes = self.ledger.record_instances([item.record for item in live])
                except Exception as exc:  # noqa: BLE001 - each waiting caller gets it
                    for item in live:
                        item.error = exc
                else:
                    for item, outcome in zip(live, outcomes, strict=True):
                        item.outcome = outcome
        finally:
            for item in batch:
                if item.outcome is None and item.error is None:
                    item.error = RuntimeError("the round ended before recording it")
                item.done = True

    def _sync_folders(self, folders: set[Path]) -> None:
        """fsync each folder; a folder not yet known to be in its parent for good, the parent and its
        parent too (a new study's and series' folders), deepest first."""
        todo = set(folders)
        inodes = {folder: os.stat(folder).st_ino for folder in folders}
        for folder in folders:
            if self._synced.get(folder) != inodes[folder]:  # new to us, or removed and made again since
                todo |= {folder.parent, folder.parent.parent}
        for folder in sorted(todo, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(folder)
        self._synced.update(inodes)


def _result(item: _Item) -> Recorded:
    if item.error is not None:
        raise item.error
    assert item.outcome is not None  # done without an error: recorded
    return item.outcome
