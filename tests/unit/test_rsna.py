"""The RSNA 2024 layout reader: the phantom round-trips, and each quirk of the real data is handled."""

from __future__ import annotations

import csv
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from structlog.testing import capture_logs

from inference.labels import (
    LABEL_COLUMNS,
    LABELS,
    LEVELS,
    SPINAL,
    Label,
    SeriesRole,
    Severity,
    parse_column,
)
from phantom import PhantomStudy, generate_dataset
from training.data import ground_truth_points, study_samples
from training.rsna import StudyRecord, load_rsna, read_instances, split_studies

AX, SAG_T1, SAG_T2 = SeriesRole.AX_T2.value, SeriesRole.SAG_T1.value, SeriesRole.SAG_T2.value
COORD_HEADER = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[PhantomStudy]]:
    root = tmp_path_factory.mktemp("rsna_phantom")
    return root, generate_dataset(root, 3, seed=1)


def _write(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _layout(root: Path, studies: dict[int, dict[str, str]], series: list[tuple[int, int, str]],
            files: dict[tuple[int, int], list[int]], coords: list[list[object]] | None = None) -> Path:
    """A hand-made layout: label cells default to Normal/Mild; files are empty .dcm files."""
    _write(root / "train.csv", ["study_id", *LABEL_COLUMNS],
           [[sid, *(cells.get(c, "Normal/Mild") for c in LABEL_COLUMNS)] for sid, cells in studies.items()])
    _write(root / "train_series_descriptions.csv", ["study_id", "series_id", "series_description"],
           [list(s) for s in series])
    _write(root / "train_label_coordinates.csv", COORD_HEADER, coords or [])
    for (study_id, series_id), numbers in files.items():
        folder = root / "train_images" / str(study_id) / str(series_id)
        folder.mkdir(parents=True, exist_ok=True)
        for n in numbers:
            (folder / f"{n}.dcm").write_bytes(b"")
    return root


def _standard(root: Path, study_ids: tuple[int, ...] = (1,)) -> Path:
    series = [(s, s * 10 + k, d) for s in study_ids for k, d in enumerate((SAG_T1, SAG_T2, AX))]
    return _layout(root, {s: {} for s in study_ids}, series, {(s, sid): [1, 2, 3] for s, sid, _ in series})


def test_phantom_layout_loads_labels_series_and_coordinates(phantom: tuple[Path, list[PhantomStudy]]) -> None:
    root, studies = phantom
    records = load_rsna(root)
    by_id = {st.study_id: st for st in studies}
    assert [r.study_id for r in records] == sorted(by_id)
    for record in records:
        st = by_id[record.study_id]
        assert list(record.labels) == list(LABELS)
        assert record.labels == st.labels
        assert record.targets() == [-1 if st.labels[lb] is None else int(st.labels[lb]) for lb in LABELS]
        specs = {spec.series_id: spec for spec in st.series}
        assert {s.series_id for s in record.series} == set(specs)
        for s in record.series:
            assert s.role is specs[s.series_id].role and s.description == specs[s.series_id].description
            assert s.instance_numbers == sorted(specs[s.series_id].instance_numbers)
            assert s.path == root / "train_images" / str(st.study_id) / str(s.series_id)
        assert len(record.coordinates) == len(st.coordinates) > 0
        for got, want in zip(record.coordinates, st.coordinates, strict=True):
            assert (got.label, got.series_id, got.instance_number) == (want.label, want.series_id, want.instance_number)
            assert got.x == pytest.approx(want.x, abs=1e-3) and got.y == pytest.approx(want.y, abs=1e-3)
            assert got.series_id in {s.series_id for s in record.series}
            (series,) = [s for s in record.series if s.series_id == got.series_id]
            assert got.instance_number in series.instance_numbers
        for label in LABELS:
            assert record.coordinates_for(label) == [c for c in record.coordinates if c.label == label]


def test_column_order_and_extra_columns_do_not_matter(phantom: tuple[Path, list[PhantomStudy]],
                                                     tmp_path: Path) -> None:
    root, _ = phantom
    with open(root / "train.csv", newline="") as f:
        rows = list(csv.reader(f))
    order = list(range(len(rows[0])))
    random.Random(3).shuffle(order)
    _write(tmp_path / "train.csv", [rows[0][i] for i in order] + ["comment"],
           [[row[i] for i in order] + ["x"] for row in rows[1:]])
    for name in ("train_series_descriptions.csv", "train_label_coordinates.csv"):
        (tmp_path / name).write_bytes((root / name).read_bytes())
    images = str(root / "train_images")  # absolute: the same paths from either root
    assert load_rsna(tmp_path, images_dir=images) == load_rsna(root, images_dir=images)


def test_missing_label_column_is_an_error_naming_it(tmp_path: Path) -> None:
    _standard(tmp_path)
    _write(tmp_path / "train.csv", ["study_id", *LABEL_COLUMNS[:-1]], [[1, *["Moderate"] * 24]])
    with pytest.raises(ValueError, match=LABEL_COLUMNS[-1]):
        load_rsna(tmp_path)


def test_missing_label_cells_are_none_and_target_minus_one(tmp_path: Path) -> None:
    lb = Label(SPINAL, LEVELS[3])
    _layout(tmp_path, {1: {lb.column: "", LABEL_COLUMNS[0]: "Severe", LABEL_COLUMNS[1]: "nan"}},
            [(1, 10, SAG_T2)], {(1, 10): [1]})
    (record,) = load_rsna(tmp_path)
    assert record.labels[lb] is None and record.labels[LABELS[1]] is None
    assert record.labels[LABELS[0]] is Severity.SEVERE
    targets = record.targets()
    assert len(targets) == 25
    assert targets[LABELS.index(lb)] == -1 and targets[1] == -1 and targets[0] == 2
    assert targets.count(0) == 22


def test_bad_severity_names_study_column_and_value(tmp_path: Path) -> None:
    _layout(tmp_path, {42: {LABEL_COLUMNS[7]: "Very bad"}}, [(42, 10, AX)], {(42, 10): [1]})
    with pytest.raises(ValueError, match=r"42.*" + LABEL_COLUMNS[7] + r".*Very bad"):
        load_rsna(tmp_path)


def test_study_missing_a_series(tmp_path: Path) -> None:
    _layout(tmp_path, {1: {}}, [(1, 11, SAG_T2), (1, 12, AX)], {(1, 11): [1], (1, 12): [1]})
    (record,) = load_rsna(tmp_path)
    assert record.series_with_role(SeriesRole.SAG_T1) == []
    assert [s.series_id for s in record.series_with_role(SeriesRole.AX_T2)] == [12]


def test_missing_series_folder_is_dropped_or_kept(tmp_path: Path) -> None:
    _layout(tmp_path, {1: {}}, [(1, 10, SAG_T1), (1, 11, SAG_T2), (1, 12, AX)], {(1, 10): [1], (1, 12): [1]})
    with capture_logs() as logs:
        (record,) = load_rsna(tmp_path)
    assert [s.series_id for s in record.series] == [10, 12]
    assert [(e["log_level"], e["series"]) for e in logs if "has no folder" in e["event"]] == [("warning", 11)]
    (kept,) = load_rsna(tmp_path, require_images=False)
    (sag_t2,) = kept.series_with_role(SeriesRole.SAG_T2)
    assert sag_t2.series_id == 11 and sag_t2.instance_numbers == []


def test_two_axial_t2_series_are_both_returned(tmp_path: Path) -> None:
    _layout(tmp_path, {1: {}}, [(1, 10, SAG_T1), (1, 30, AX), (1, 20, AX)],
            {(1, 10): [1], (1, 20): [1, 2], (1, 30): [1, 2, 3]})
    (record,) = load_rsna(tmp_path)
    axial = record.series_with_role(SeriesRole.AX_T2)
    assert sorted(s.series_id for s in axial) == [20, 30]
    assert all(s.description == AX for s in axial)


def test_instance_numbers_come_from_file_names_not_positions(tmp_path: Path) -> None:
    _layout(tmp_path, {1: {}}, [(1, 10, AX)], {(1, 10): [10, 3, 100, 7]})
    (tmp_path / "train_images/1/10/notes.txt").write_text("ignored")
    (record,) = load_rsna(tmp_path)
    assert record.series[0].instance_numbers == [3, 7, 10, 100]


def test_series_on_disk_but_not_described_has_no_role(tmp_path: Path) -> None:
    _layout(tmp_path, {1: {}}, [(1, 10, AX), (1, 11, "Coronal STIR")], {(1, 10): [1], (1, 11): [1], (1, 99): [5]})
    (record,) = load_rsna(tmp_path)
    by_id = {s.series_id: s for s in record.series}
    assert set(by_id) == {10, 11, 99}
    assert by_id[99].description == "" and by_id[99].role is None and by_id[99].instance_numbers == [5]
    assert by_id[11].description == "Coronal STIR" and by_id[11].role is None


def test_study_without_images_is_dropped_unless_not_required(tmp_path: Path) -> None:
    _layout(tmp_path, {2: {}, 1: {}}, [(1, 10, AX), (2, 20, AX)], {(1, 10): [1]})
    with capture_logs() as logs:
        assert [r.study_id for r in load_rsna(tmp_path)] == [1]
    assert [e["study"] for e in logs if e["event"] == "study has no images: dropped"] == [2]
    assert [r.study_id for r in load_rsna(tmp_path, require_images=False)] == [1, 2]


def test_coordinates_parse_errors_and_stray_series(tmp_path: Path) -> None:
    coords = [[1, 10, 3, "Left Subarticular Stenosis", "L4/L5", 1.5, 2.5],
              [1, 77, 1, "Spinal Canal Stenosis", "L1/L2", 0, 0],
              [1, 78, 1, "Spinal Canal Stenosis", "L2/L3", 0, 0],
              [9, 10, 1, "Spinal Canal Stenosis", "L2/L3", 0, 0]]  # study 9 is not in train.csv
    _layout(tmp_path, {1: {}}, [(1, 10, AX)], {(1, 10): [3]}, coords)
    with capture_logs() as logs:
        (record,) = load_rsna(tmp_path)
    assert len(record.coordinates) == 3
    (c,) = record.coordinates_for(Label(LABELS[15].condition, LEVELS[3]))
    assert (c.series_id, c.instance_number, c.x, c.y) == (10, 3, 1.5, 2.5)
    [stray] = [e for e in logs if "not in their study" in e["event"]]
    assert (stray["count"], stray["example_study"], stray["example_series"]) == (2, 1, 77)

    _layout(tmp_path, {1: {}}, [(1, 10, AX)], {(1, 10): [3]}, [*coords, [1, 10, 3, "Central Stenosis", "L1/L2", 0, 0]])
    with pytest.raises(ValueError, match="row 6"):
        load_rsna(tmp_path)
    _layout(tmp_path, {1: {}}, [(1, 10, AX)], {(1, 10): [3]}, [[1, 10, 3, "Spinal Canal Stenosis", "L6/S1", 0, 0]])
    with pytest.raises(ValueError, match="row 2"):
        load_rsna(tmp_path)


def _records(ids: list[int]) -> list[StudyRecord]:
    return [StudyRecord(i, dict.fromkeys(LABELS)) for i in ids]


def test_split_is_by_study_deterministic_disjoint_and_order_independent() -> None:
    ids = list(range(100, 150))
    train, val = split_studies(_records(ids), val_fraction=0.2, seed=5)
    t_ids, v_ids = [r.study_id for r in train], [r.study_id for r in val]
    assert len(v_ids) == 10 and not set(t_ids) & set(v_ids) and sorted(t_ids + v_ids) == ids
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    again = split_studies(_records(shuffled), val_fraction=0.2, seed=5)
    assert [[r.study_id for r in part] for part in again] == [t_ids, v_ids]
    other = split_studies(_records(ids), val_fraction=0.2, seed=6)
    assert [r.study_id for r in other[1]] != v_ids


@pytest.mark.parametrize("n", [2, 3, 7])
def test_split_keeps_a_study_in_each_part(n: int) -> None:
    for fraction in (0.01, 0.5, 0.99):
        train, val = split_studies(_records(list(range(n))), val_fraction=fraction)
        assert train and val and len(train) + len(val) == n
    assert split_studies(_records([1]))[1] == []
    with pytest.raises(ValueError):
        split_studies(_records([1, 2]), val_fraction=1.0)


def test_split_of_phantom_records(phantom: tuple[Path, list[PhantomStudy]]) -> None:
    records = load_rsna(phantom[0])
    train, val = split_studies(records, val_fraction=0.34, seed=0)
    assert len(val) == 1 and len(train) == 2
    assert {r.study_id for r in train} | {r.study_id for r in val} == {r.study_id for r in records}


# ---- the real competition folder as it is ---------------------------------------------------------------


def _messy(phantom: tuple[Path, list[PhantomStudy]], root: Path) -> tuple[Path, dict[str, int]]:
    """The phantom copied and made like the real download: blank label cells and a row without a
    study_id, a series folder missing (its CSV row kept), an extra series folder and a stray one,
    .DS_Store and AppleDouble files everywhere, CSV rows for a series and a study that are absent,
    a study folder train.csv does not name, zero-padded file names in one series."""
    src, studies = phantom
    shutil.copytree(src, root)
    images = root / "train_images"
    a, b, c = (st.study_id for st in studies)
    a_series = sorted(studies[0].series, key=lambda s: s.series_id)
    missing, padded = a_series[0].series_id, a_series[-1].series_id
    with open(root / "train.csv", newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    blank = header.index(LABEL_COLUMNS[7])
    for row in body:
        if row[0] == str(b):
            row[blank] = ""
    body.append([""] * len(header))  # a row with empty cells only, study_id included
    _write(root / "train.csv", header, body)
    with open(root / "train_series_descriptions.csv", "a", newline="") as f:
        csv.writer(f).writerows([[a, 999, "Axial T2"], [424242, 1, "Sagittal T1"], ["", "", ""]])
    with open(root / "train_label_coordinates.csv", "a", newline="") as f:
        csv.writer(f).writerow([a, 999, 1, "Spinal Canal Stenosis", "L1/L2", 10.0, 10.0])
    shutil.rmtree(images / str(a) / str(missing))
    extra = images / str(c) / "123"
    shutil.copytree(images / str(c) / str(sorted(s.series_id for s in studies[2].series)[0]), extra)
    (images / str(c) / "Thumbs").mkdir()
    (images / "777").mkdir()  # a study folder with no row in train.csv
    for folder in [root, images, *images.iterdir(), *images.glob("*/*")]:
        if folder.is_dir():
            (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
            (folder / "._1.dcm").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # macOS AppleDouble
    for path in sorted((images / str(a) / str(padded)).glob("[0-9]*.dcm")):
        path.rename(path.with_name(f"{int(path.stem):04d}.dcm"))
    return root, {"a": a, "b": b, "c": c, "missing": missing, "padded": padded, "blank": blank}


def test_the_real_competition_folder_is_read_as_it_is(phantom: tuple[Path, list[PhantomStudy]],
                                                       tmp_path: Path) -> None:
    root, ids = _messy(phantom, tmp_path / "messy")
    with capture_logs() as logs:
        records = load_rsna(root)
    events = [e["event"] for e in logs]
    assert [r.study_id for r in records] == sorted([ids["a"], ids["b"], ids["c"]])
    by_id = {r.study_id: r for r in records}
    assert {s.series_id for s in by_id[ids["a"]].series}.isdisjoint({ids["missing"], 999})
    assert "series has no folder: dropped" in events and "rows without a study_id: skipped" in events
    assert "image folders of studies not in train.csv: ignored" in events
    assert by_id[ids["b"]].labels[parse_column(LABEL_COLUMNS[7])] is None
    extra = [s for s in by_id[ids["c"]].series if s.series_id == 123]
    assert len(extra) == 1 and extra[0].role is None and extra[0].instance_numbers
    (padded,) = [s for s in by_id[ids["a"]].series if s.series_id == ids["padded"]]
    assert padded.instance_numbers and padded.file(padded.instance_numbers[0]).name.startswith("000")
    for record in records:
        instances = read_instances(record)
        assert len(instances) == sum(len(s.instance_numbers) for s in record.series)
        assert all(path.is_file() and path.name[0].isdigit() for _, path in instances)
        assert ground_truth_points(record)  # the marks on images that are there are found


def test_an_unreadable_image_is_left_out_with_a_log_line(phantom: tuple[Path, list[PhantomStudy]],
                                                          tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(phantom[0], root)
    record = load_rsna(root)[0]
    broken = record.series[0].file(record.series[0].instance_numbers[0])
    broken.write_bytes(b"not DICOM")
    with capture_logs() as logs:
        instances = read_instances(record)
    assert broken not in [p for _, p in instances]
    assert len(instances) == sum(len(s.instance_numbers) for s in record.series) - 1
    assert [e["path"] for e in logs if e["event"] == "left out a file that is not readable DICOM"] == [str(broken)]


def _kaggle_encoded(root: Path, drop_sop_class: bool) -> None:
    """The Kaggle encoding of the data set, as far as the reader meets it: no Modality (nor the SOP
    Class with ``drop_sop_class``: only the file meta's), SOPInstanceUID <study>.<k>.<n> repeated
    in every series of the study, SeriesInstanceUID <study>.<series>."""
    for study in (root / "train_images").iterdir():
        for series in study.iterdir():
            for path in series.glob("*.dcm"):
                ds = pydicom.dcmread(path)
                del ds.Modality
                if drop_sop_class:
                    del ds.SOPClassUID
                ds.SeriesInstanceUID = f"{study.name}.{series.name}"
                ds.SOPInstanceUID = f"{study.name}.1.{int(path.stem)}"
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.save_as(path)


@pytest.mark.parametrize("drop_sop_class", [False, True])
def test_training_samples_of_kaggle_encoded_files(phantom: tuple[Path, list[PhantomStudy]], tmp_path: Path,
                                                 drop_sop_class: bool) -> None:
    root = tmp_path / "kaggle"
    shutil.copytree(phantom[0], root)
    _kaggle_encoded(root, drop_sop_class)
    record = load_rsna(root)[0]
    samples = study_samples(record, np.random.default_rng(0))
    labelled = [i for i, t in enumerate(samples.targets) if t >= 0]
    assert samples.localiser and len(samples.windows) >= len(labelled) - 5
    instances = read_instances(record)
    uids = [str(ds.SOPInstanceUID) for ds, _ in instances]
    assert len(set(uids)) < len(uids)  # repeated across series, and every image still read
    assert len({p for _, p in instances}) == len(instances)
