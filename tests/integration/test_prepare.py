"""``lumbar-node prepare`` on phantom folders through the real command: the manifest and statuses,
left-out studies and their reasons, corrupt files, up-to-date skipping, rebuilds, an interrupted
run resuming, a worker process dying, and the Kaggle-style files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from inference.rsna_layout import COORDINATES_CSV, IMAGES_DIR
from tests.support.kaggle import make_kaggle_phantom
from tests.support.tools import lumbar_node
from training.cache import MANIFEST, STUDIES, LeftOutReason, Manifest, PrepareSpec, read_entry, study_dir
from training.prepare import StudyTask, prepare, prepare_study

VICTIM = "LUMBAR_NODE_TEST_VICTIM_STUDY"


def _studies(data: Path) -> list[str]:
    return sorted(p.name for p in (data / IMAGES_DIR).iterdir())


def _drop_coordinates(data: Path, study: str) -> None:
    path = data / COORDINATES_CSV
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([r for r in rows if r[0] != study])


def _manifest(cache: Path) -> dict:
    return json.loads((cache / MANIFEST).read_text())


@pytest.fixture()
def data(phantom_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(phantom_dir, out, ignore=shutil.ignore_patterns("*.png"))
    return out


def test_prepare_writes_a_manifest_leaves_out_what_it_cannot_use_and_skips_what_is_up_to_date(
        data: Path, tmp_path: Path) -> None:
    ids = _studies(data)
    no_coords, one_corrupt, all_garbage = ids[0], ids[1], ids[2]
    _drop_coordinates(data, no_coords)
    victim = sorted((data / IMAGES_DIR / one_corrupt).rglob("*.dcm"))[3]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a truncated file
    for path in (data / IMAGES_DIR / all_garbage).rglob("*.dcm"):
        path.write_bytes(b"not a DICOM file")
    cache = tmp_path / "cache"

    first = lumbar_node("prepare", "--data", str(data), "--out", str(cache), "--workers", "2")
    assert "prepared 8, up to date 0, ok 6, left out 2" in first.stdout, first.stdout
    assert "no coordinates: 1" in first.stdout and "no readable images: 1" in first.stdout
    manifest = _manifest(cache)
    assert manifest["complete"] and manifest["spec_hash"] == PrepareSpec().hash
    assert manifest["spec"]["jitter_px"] == 8 and manifest["data"] == str(data.resolve())
    studies = manifest["studies"]
    assert set(studies) == set(ids)
    assert studies[no_coords]["status"] == "left out" and studies[no_coords]["reason"] == "no coordinates"
    assert studies[all_garbage]["reason"] == LeftOutReason.NO_IMAGES.value
    assert studies[one_corrupt]["status"] == "ok" and studies[one_corrupt]["images_left_out"] == 1
    for sid, s in studies.items():
        entry = read_entry(cache, int(sid))
        assert entry is not None and len(entry.sources) == s["files"] > 0  # every file with size and mtime
        assert all(size >= 0 and mtime > 0 for _, size, mtime in entry.sources)
        if s["status"] == "ok":
            windows = np.load(study_dir(cache, int(sid)) / "windows.npy", mmap_mode="r")
            assert windows.dtype == np.float16 and windows.shape[1:] == (5, 64, 64) and len(windows) == s["windows"]
            assert s["windows"] > 0 and s["localiser"] == 4

    started = time.perf_counter()
    again = lumbar_node("prepare", "--data", str(data), "--out", str(cache), "--workers", "2")
    assert "prepared 0, up to date 8" in again.stdout
    assert time.perf_counter() - started < 30  # nothing read again (mostly Python's start-up)
    assert _manifest(cache)["studies"] == studies

    touched = sorted((data / IMAGES_DIR / ids[3]).rglob("*.dcm"))[0]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))  # a changed source
    _drop_coordinates(data, ids[4])  # a changed CSV row
    changed = lumbar_node("prepare", "--data", str(data), "--out", str(cache), "--workers", "0")
    assert "prepared 2, up to date 6" in changed.stdout
    assert _manifest(cache)["studies"][ids[4]]["reason"] == "no coordinates"


def test_a_changed_spec_rebuilds_every_study(data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    prepare(data, cache, workers=0, progress=False)
    summary = prepare(data, cache, workers=0, spec=PrepareSpec(localiser_jitter_mm=20.0), progress=False)
    assert summary.prepared == 8 and summary.up_to_date == 0
    assert Manifest.load(cache).spec.localiser_jitter_mm == 20.0
    refused = lumbar_node("train", "--cache", str(cache), "--out", str(tmp_path / "run"), check=False)
    assert refused.returncode != 0 and "another preprocessing spec" in refused.stderr


def test_an_interrupted_prepare_resumes(data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    exe = Path(sys.executable).with_name("lumbar-node")
    proc = subprocess.Popen([str(exe), "prepare", "--data", str(data), "--out", str(cache), "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    studies = cache / STUDIES
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if studies.is_dir() and any(p.name.isdigit() for p in studies.iterdir()):
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the command and its worker, mid-way
    proc.communicate()
    done = [p for p in studies.iterdir() if p.name.isdigit()]
    assert 1 <= len(done) < 8
    (studies / ".tmp-123-4567").mkdir(exist_ok=True)  # and a half-written study folder
    (studies / ".tmp-123-4567" / "windows.npy").write_bytes(b"partial")

    resumed = lumbar_node("prepare", "--data", str(data), "--out", str(cache), "--workers", "1")
    assert f"prepared {8 - len(done)}, up to date {len(done)}, ok 8" in resumed.stdout, resumed.stdout
    assert _manifest(cache)["complete"]
    assert not [p for p in studies.iterdir() if p.name.startswith(".")]


def dying_work(task: StudyTask):  # noqa: ANN201 - prepare's work function, run in a spawned worker
    """``prepare_study``, except that the study named in the environment ends its worker process."""
    if str(task.record.study_id) == os.environ.get(VICTIM):
        os._exit(3)
    return prepare_study(task)


def test_a_study_that_kills_its_worker_is_left_out_and_the_rest_go_on(data: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    victim = _studies(data)[5]
    monkeypatch.setenv(VICTIM, victim)
    summary = prepare(data, tmp_path / "cache", workers=2, progress=False, work=dying_work)
    assert summary.ok == 7 and summary.left_out == {LeftOutReason.WORKER_DIED.value: 1}
    assert Manifest.load(tmp_path / "cache").studies[int(victim)].reason is LeftOutReason.WORKER_DIED


def test_kaggle_style_files_are_prepared(tmp_path: Path) -> None:
    data = make_kaggle_phantom(tmp_path / "kaggle", studies=3, seed=5)
    out = lumbar_node("prepare", "--data", str(data), "--out", str(tmp_path / "cache"), "--workers", "2")
    assert "prepared 3, up to date 0, ok 3, left out 0" in out.stdout, out.stdout
    manifest = Manifest.load(tmp_path / "cache")
    assert all(e.windows > 10 and e.localiser == 4 and e.images_left_out == 0 for e in manifest.studies.values())
