"""dicom_node.results.RunFolder on folders that are not (or no longer) what the writer left: a
purged run, a results.json that cannot be read. (The writer's own folders: tests/integration/
test_outputs.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.results import RunFolder


def test_a_purged_run_has_nothing_to_send_and_no_roles(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "results" / "1.2.3" / "run-1")
    assert run.sr_files() == [] and run.sc_files() == [] and run.pdf_files() == [] and run.kos_files() == []
    assert run.newest_sr() is None and run.files_to_send() == []
    # the SR the ledger recorded is still named: its delivery fails with the reason, it does not send nothing
    assert run.files_to_send(run.sr_path("1.2")) == [run.sr_path("1.2")]
    assert run.series_roles() == {}
    with pytest.raises(OSError):
        run.result()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"series_roles": 3}'])
def test_an_unreadable_result_gives_no_roles(tmp_path: Path, text: str) -> None:
    run = RunFolder(tmp_path)
    run.json_path.write_text(text)
    assert run.series_roles() == {}


def test_the_layout(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    assert run.sr_path("1.2") == tmp_path / "SR_1.2.dcm" and run.pdf_path("1.3") == tmp_path / "PDF_1.3.dcm"
    assert run.sc_path(3, "1.4") == tmp_path / "SC" / "03_1.4.dcm" and run.sc_dir == tmp_path / "SC"
    assert run.kos_path("1.7") == tmp_path / "KOS_1.7.dcm"
    names = (run.table_path.name, run.json_path.name, run.running_marker.name)
    assert names == ("results.txt", "results.json", ".grading")
    for path in (run.sr_path("1.2"), run.sc_path(10, "1.5"), run.kos_path("1.7"), run.sc_path(2, "1.6"),
                 run.pdf_path("1.3")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    run.running_marker.touch()
    assert run.files_to_send() == [run.sr_path("1.2"), run.sc_path(2, "1.6"), run.sc_path(10, "1.5"),
                                   run.pdf_path("1.3"), run.kos_path("1.7")]
