"""The training cache's pieces: spec and entries, atomic study folders, the heatmap targets, and the
DataLoader side (index, samplers, datasets) on a hand-made cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.labels import LABELS, LEVELS
from inference.levels import LOCALISER_SPEC, SAGITTAL_AXES, heatmap_target
from inference.preprocess import CropFrame
from training.cache import (
    ENTRY,
    CacheError,
    LeftOutReason,
    Manifest,
    PrepareSpec,
    StudyEntry,
    StudyStatus,
    clean_temporary,
    open_cache,
    read_entry,
    sample_arrays,
    study_dir,
    write_entry,
)
from training.data import CACHE_SPEC, LocaliserSample, StudySamples, render_heatmaps, window_crop
from training.loader import (
    GraderDataset,
    GraderIndex,
    LocaliserDataset,
    LocaliserIndex,
    StudyBatchSampler,
    localiser_batches,
    make_loader,
    set_epoch,
)


def test_the_spec_round_trips_and_its_hash_follows_every_field() -> None:
    spec = PrepareSpec()
    assert PrepareSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert PrepareSpec.from_json(spec.to_json()).hash == spec.hash
    assert PrepareSpec(localiser_jitter_mm=20.0).hash != spec.hash
    assert PrepareSpec(seed=1).hash != spec.hash


def test_an_entry_round_trips_its_json() -> None:
    entry = StudyEntry(7, StudyStatus.LEFT_OUT, "h", "f", LeftOutReason.NO_COORDINATES, files=3,
                       sources=[("train_images/7/1/1.dcm", 10, 5)])
    assert StudyEntry.from_json(json.loads(json.dumps(entry.to_json()))) == entry
    assert "sources" not in entry.to_json(sources=False)


def _samples(study_id: int, n_windows: int, rng: np.random.Generator) -> StudySamples:
    w = CACHE_SPEC
    targets = np.full(25, -1, np.int64)
    targets[:n_windows] = rng.integers(0, 3, n_windows)
    windows = {i: rng.random((w.n_slices, w.pixels, w.pixels)).astype(np.float16) for i in range(n_windows)}
    peaks = np.full((5, 2), np.nan, np.float32)
    peaks[:3] = rng.uniform(20, 100, (3, 2))
    loc = [LocaliserSample(rng.random((3, 128, 128)).astype(np.float16), peaks, j) for j in (False, True)]
    points = {LABELS[i]: rng.normal(0, 50, 3) for i in range(n_windows)}
    return StudySamples(study_id, targets, points, loc, windows)


def _cache(tmp_path: Path, windows: dict[int, int]) -> Path:
    """A finished cache of hand-made studies (study id -> number of windows)."""
    rng = np.random.default_rng(0)
    spec = PrepareSpec()
    manifest = Manifest(spec, str(tmp_path), {}, complete=True)
    for sid, n in windows.items():
        entry = StudyEntry(sid, StudyStatus.OK, spec.hash, "f", windows=n, localiser=2)
        manifest.studies[sid] = write_entry(tmp_path / "cache", entry, sample_arrays(_samples(sid, n, rng)))
    manifest.save(tmp_path / "cache")
    return tmp_path / "cache"


def test_a_study_folder_is_replaced_whole_and_leftovers_are_cleaned(tmp_path: Path) -> None:
    cache = _cache(tmp_path, {1: 4})
    assert read_entry(cache, 1).windows == 4
    arrays = sample_arrays(_samples(1, 6, np.random.default_rng(1)))
    write_entry(cache, StudyEntry(1, StudyStatus.OK, "h", "g", windows=6), arrays)
    assert read_entry(cache, 1).fingerprint == "g"
    assert np.load(study_dir(cache, 1) / "windows.npy").shape[0] == 6
    assert sorted(p.name for p in (cache / "studies").iterdir()) == ["1"]  # no temporary folder left
    (cache / "studies" / ".tmp-2-999").mkdir()  # what a killed prepare leaves
    (cache / "studies" / ".tmp-2-999" / "windows.npy").write_bytes(b"\x93NUMPY partial")
    assert clean_temporary(cache) == 1 and sorted(p.name for p in (cache / "studies").iterdir()) == ["1"]
    (study_dir(cache, 1) / ENTRY).write_text("{not json")
    assert read_entry(cache, 1) is None  # rebuilt by the next prepare


def test_the_cache_refuses_an_unfinished_or_foreign_spec_run(tmp_path: Path) -> None:
    cache = _cache(tmp_path, {1: 2, 2: 3})
    assert open_cache(cache).ok() == [1, 2]
    with pytest.raises(CacheError, match="another preprocessing spec"):
        open_cache(cache, PrepareSpec(localiser_jitter_mm=3.0))
    manifest = Manifest.load(cache)
    manifest.complete = False
    manifest.save(cache)
    with pytest.raises(CacheError, match="did not finish"):
        open_cache(cache)
    with pytest.raises(CacheError, match=r"no manifest\.json"):
        open_cache(tmp_path / "nowhere")


def test_rendered_heatmaps_equal_the_inference_targets() -> None:
    u, v = SAGITTAL_AXES
    frame = CropFrame(np.array([1.0, -20.0, 30.0]), u, v, LOCALISER_SPEC)
    points = {LEVELS[0]: frame.to_patient(40.3, 50.7), LEVELS[3]: frame.to_patient(70.0, 90.2)}
    peaks = np.full((5, 2), np.nan)
    peaks[0], peaks[3] = (40.3, 50.7), (70.0, 90.2)
    assert np.allclose(render_heatmaps(peaks, LOCALISER_SPEC.pixels), heatmap_target(frame, points), atol=1e-6)


def test_the_batch_sampler_yields_all_samples_of_k_studies_per_batch(tmp_path: Path) -> None:
    cache = _cache(tmp_path, {10: 3, 11: 0, 12: 5, 13: 1, 14: 2})
    index = GraderIndex.build(cache, [10, 11, 12, 13, 14])
    assert list(index.study_ids) == [10, 12, 13, 14] and len(index) == 11  # a study without windows has no samples
    sampler = StudyBatchSampler(index.starts, batch_studies=3, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2
    keys = [k for b in batches for k in b]
    assert sorted(i for _, i in keys) == list(range(11)) and {e for e, _ in keys} == {0}
    for batch in batches:  # whole studies only
        studies = {index.study_of(i) for _, i in batch}
        assert sum(index.starts[s + 1] - index.starts[s] for s in studies) == len(batch)
    assert list(sampler) == batches  # deterministic for (seed, epoch)
    sampler.set_epoch(1)
    assert [[i for _, i in b] for b in sampler] != [[i for _, i in b] for b in batches]


def test_grader_samples_are_the_cached_windows_and_augmentation_is_reproducible(tmp_path: Path) -> None:
    cache = _cache(tmp_path, {10: 3, 12: 5})
    index = GraderIndex.build(cache, [10, 12])
    plain = GraderDataset(cache, index)
    crop, target, _, study = plain[(0, 4)]
    window = np.load(study_dir(cache, 12) / "windows.npy")[1]
    assert np.array_equal(crop, window_crop(window, 0, 0, 0).astype(np.float32))
    assert study == 1 and target == np.load(study_dir(cache, 12) / "targets.npy")[index.labels[4]]
    train = GraderDataset(cache, index, sigma_px={0: 2.0, 1: 2.0, 2: 2.0}, seed=3)
    again = GraderDataset(cache, index, sigma_px={0: 2.0, 1: 2.0, 2: 2.0}, seed=3)
    assert np.array_equal(train[(2, 4)][0], again[(2, 4)][0])
    assert not np.array_equal(train[(2, 4)][0], train[(3, 4)][0])  # another epoch, another draw
    assert train[(2, 4)][0].shape == crop.shape and train[(2, 4)][0].dtype == np.float32


def test_loaders_give_the_same_batches_with_and_without_workers(tmp_path: Path) -> None:
    cache = _cache(tmp_path, {10: 3, 12: 5, 13: 2})
    index = GraderIndex.build(cache, [10, 12, 13])
    data = GraderDataset(cache, index, sigma_px={0: 1.0, 1: 1.0, 2: 1.0})
    cpu = torch.device("cpu")
    batches = {}
    for workers in (0, 2):
        loader = make_loader(data, StudyBatchSampler(index.starts, 2, seed=1), workers, cpu)
        set_epoch(loader, 1)
        batches[workers] = list(loader)
    for a, b in zip(batches[0], batches[2], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    loc_index = LocaliserIndex.build(cache, [10, 12, 13], jittered=False)
    assert len(loc_index) == 3  # the unjittered image of each study
    loc = make_loader(LocaliserDataset(cache, loc_index, train=False), localiser_batches(3, 2, 0, False), 0, cpu)
    images, targets = next(iter(loc))
    assert images.shape == (2, 3, 128, 128) and targets.shape == (2, 5, 128, 128)
    assert float(targets[0, 0].max()) > 0.9 and float(targets[0, 4].max()) == 0.0  # marked levels only


def test_a_workers_log_lines_are_logged_again_by_the_parent(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    from training.prepare import _Progress

    class Bar:
        def update(self, n: int) -> None:
            pass

    progress = _Progress(Manifest(PrepareSpec(), str(tmp_path), {}), tmp_path, Bar())
    entry = StudyEntry(5, StudyStatus.OK, "h", "f")
    events = [{"level": "warning", "event": "series role left out: no usable image", "study": 5, "role": "Axial T2"},
              {"level": "warning", "event": "left out a file", "source": "pydicom"}]
    with capture_logs() as logs:
        progress.done(entry, events)
    assert [(e["event"], e["study"]) for e in logs] == [("series role left out: no usable image", 5),
                                                         ("left out a file", 5)]
    assert logs[0]["role"] == "Axial T2" and progress.prepared == 1 and 5 in progress.manifest.studies
