"""The console command: help, configuration errors, and a serving path without torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.tools import lumbar_node


def test_help_lists_the_subcommands() -> None:
    out = lumbar_node("--help").stdout
    assert "phantom" in out and "config" in out
    assert "RSNA 2024 layout" in lumbar_node("phantom", "--help").stdout


def test_config_prints_effective_settings_with_env_override() -> None:
    env = {**os.environ, "LUMBAR_NODE__NODE__PORT": "11999"}
    exe = Path(sys.executable).with_name("lumbar-node")
    out = subprocess.run([str(exe), "config"], capture_output=True, text=True, env=env, check=True).stdout
    assert "port: 11999" in out and "ae_title: LUMBAR_AI" in out


def test_bad_config_value_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("study:\n  quiet_time_s: -5\n")
    result = lumbar_node("--config", str(bad), "config", check=False)
    assert result.returncode != 0
    assert "study.quiet_time_s" in result.stderr and str(bad) in result.stderr


def test_serving_path_does_not_import_torch() -> None:
    code = ("import sys, dicom_node.cli, dicom_node.config, dicom_node.observability, inference.labels, "
            "inference.geometry; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_ledger_of_a_newer_release_is_one_line_of_error_not_a_traceback(tmp_path: Path) -> None:
    import sqlite3

    from dicom_node.store.ledger import SCHEMA_VERSION, Ledger

    ledger_path = tmp_path / "ledger.sqlite"
    Ledger(ledger_path).close()
    with sqlite3.connect(ledger_path) as db:  # as a newer lumbar-node leaves it
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    config = tmp_path / "node.yaml"
    config.write_text(f"storage:\n  ledger_path: {ledger_path}\n  spool_dir: {tmp_path / 'spool'}\n"
                      f"  results_dir: {tmp_path / 'results'}\n")
    for command in (["status"], ["reprocess", "1.2.3"], ["serve"]):
        result = lumbar_node("--config", str(config), *command, check=False)
        assert result.returncode == 1, (command, result.stderr)
        [line] = result.stderr.strip().splitlines()  # one line, no traceback
        assert line.startswith(f"Error: {ledger_path}: ") and "written by a newer lumbar-node" in line, command
        assert not result.stdout, command
    with sqlite3.connect(ledger_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1  # left as it was
