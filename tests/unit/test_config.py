"""Tests for dicom_node.config: defaults, file and environment overrides, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import DEFAULT_CONFIG, ConfigError, Settings, load_settings


def write(tmp_path: Path, text: str, name: str = "node.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_default_config_file_is_bundled() -> None:
    assert DEFAULT_CONFIG.is_file()
    assert DEFAULT_CONFIG.parent.name == "conf"


def test_defaults_load_with_right_types() -> None:
    s = load_settings(environ={})
    assert isinstance(s, Settings)
    assert s.node.ae_title == "LUMBAR_AI"
    assert s.node.bind_address == "0.0.0.0"
    assert s.node.port == 11112 and isinstance(s.node.port, int)
    assert s.node.max_pdu_size == 0
    assert s.node.poll_interval_ms == 0.2
    assert [(p.ae_title, p.host) for p in s.node.allowed_peers] == [("ORTHANC", None)]
    assert s.node.refuse_unknown_peers is True
    assert [(d.name, d.ae_title, d.host, d.port) for d in s.destinations] == [
        ("pacs", "ORTHANC", "127.0.0.1", 4242)
    ]
    assert s.storage.spool_dir == Path("var/spool")
    assert s.storage.results_dir == Path("var/results")
    assert s.storage.ledger_path == Path("var/ledger.sqlite")
    assert s.storage.min_free_disk_mb == 500
    assert s.storage.fsync is True
    assert s.study.quiet_time_s == 30
    assert s.study.release_when_complete is True
    assert (s.delivery.max_attempts, s.delivery.backoff_initial_s, s.delivery.backoff_max_s) == (20, 10, 600)
    assert s.models.dir is None
    assert s.models.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert s.workers == 1
    assert s.logging.format == "auto"
    assert s.logging.level == "INFO"


def test_file_override_merges_nested_keys(tmp_path: Path) -> None:
    cfg = write(tmp_path, "node:\n  port: 11113\nmodels:\n  providers: [CPUExecutionProvider]\nworkers: 2\n")
    s = load_settings(cfg, environ={})
    assert s.node.port == 11113
    # Sibling keys of the overridden one keep their defaults.
    assert s.node.ae_title == "LUMBAR_AI"
    assert s.node.refuse_unknown_peers is True
    assert s.models.dir is None
    # Lists replace rather than merge.
    assert s.models.providers == ["CPUExecutionProvider"]
    assert s.workers == 2
    assert s.storage.min_free_disk_mb == 500


def test_file_list_of_destinations_replaces_default(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        "destinations:\n  - {name: a, ae_title: A_SCP, host: 10.0.0.1, port: 104}\n"
        "  - {name: b, ae_title: B_SCP, host: pacs.example, port: 11112}\n",
    )
    s = load_settings(cfg, environ={})
    assert [d.name for d in s.destinations] == ["a", "b"]
    assert s.destinations[0].port == 104


def test_empty_file_is_allowed(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, ""), environ={}) == load_settings(environ={})


def test_env_override_is_typed() -> None:
    env = {
        "LUMBAR_NODE__NODE__PORT": "11113",
        "LUMBAR_NODE__LOGGING__FORMAT": "json",
        "LUMBAR_NODE__STORAGE__FSYNC": "false",
        "LUMBAR_NODE__MODELS__PROVIDERS": "[CPUExecutionProvider]",
        "LUMBAR_NODE__MODELS__DIR": "/opt/models",
        "LUMBAR_NODE__WORKERS": "3",
        "UNRELATED": "ignored",
    }
    s = load_settings(environ=env)
    assert s.node.port == 11113 and isinstance(s.node.port, int)
    assert s.logging.format == "json"
    assert s.storage.fsync is False
    assert s.models.providers == ["CPUExecutionProvider"]
    assert s.models.dir == Path("/opt/models")
    assert s.workers == 3
    assert s.node.ae_title == "LUMBAR_AI"


def test_env_wins_over_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, "node:\n  port: 2000\n  ae_title: FROM_FILE\n")
    s = load_settings(cfg, environ={"LUMBAR_NODE__NODE__PORT": "3000"})
    assert s.node.port == 3000
    assert s.node.ae_title == "FROM_FILE"


def test_env_null_and_numeric_ae_title() -> None:
    s = load_settings(environ={"LUMBAR_NODE__MODELS__DIR": "null", "LUMBAR_NODE__NODE__AE_TITLE": "12345"})
    assert s.models.dir is None
    assert s.node.ae_title == "12345"


def test_bad_port_in_file_names_key_and_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, "node:\n  port: 99999\n")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(cfg, environ={})
    message = str(excinfo.value)
    assert "node.port" in message
    assert "99999" in message
    assert str(cfg) in message


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    cfg = write(tmp_path, "storage:\n  spool_directory: /tmp/x\n")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(cfg, environ={})
    assert "storage.spool_directory" in str(excinfo.value)
    assert str(cfg) in str(excinfo.value)


def test_unknown_top_level_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nodes"):
        load_settings(write(tmp_path, "nodes:\n  port: 1\n"), environ={})


def test_bad_env_value_names_variable() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(environ={"LUMBAR_NODE__NODE__PORT": "not-a-port"})
    assert "node.port" in str(excinfo.value)
    assert "LUMBAR_NODE__NODE__PORT" in str(excinfo.value)


def test_env_naming_unknown_key_names_variable() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(environ={"LUMBAR_NODE__NODE__PROT": "11113"})
    assert "node.prot" in str(excinfo.value)
    assert "LUMBAR_NODE__NODE__PROT" in str(excinfo.value)


def test_env_below_a_scalar_names_variable() -> None:
    with pytest.raises(ConfigError, match="LUMBAR_NODE__WORKERS__COUNT"):
        load_settings(environ={"LUMBAR_NODE__WORKERS__COUNT": "2"})


def test_invalid_yaml_names_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, "node: [unclosed\n  port: 1\n")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(cfg, environ={})
    assert str(cfg) in str(excinfo.value)


def test_missing_file_names_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=r"absent\.yaml"):
        load_settings(missing, environ={})


def test_non_mapping_file_is_rejected(tmp_path: Path) -> None:
    cfg = write(tmp_path, "- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(cfg, environ={})


def test_config_error_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_settings(write(tmp_path, "workers: 0\n"), environ={})


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("node:\n  ae_title: THIS_TITLE_IS_TOO_LONG\n", "node.ae_title"),
        ("node:\n  ae_title: 'BAD\\\\AE'\n", "node.ae_title"),
        ("node:\n  ae_title: '    '\n", "node.ae_title"),
        ("node:\n  ae_title: ''\n", "node.ae_title"),
        ("node:\n  allowed_peers: [{ae_title: '', host: null}]\n", "node.allowed_peers.0.ae_title"),
        ("node:\n  port: 0\n", "node.port"),
        ("destinations: [{name: p, ae_title: X, host: h, port: 70000}]\n", "destinations.0.port"),
        ("storage:\n  min_free_disk_mb: -1\n", "storage.min_free_disk_mb"),
        ("study:\n  quiet_time_s: 0\n", "study.quiet_time_s"),
        ("workers: 0\n", "workers"),
        ("logging:\n  format: xml\n", "logging.format"),
        ("logging:\n  level: LOUD\n", "logging.level"),
        ("storage:\n  fsync: maybe\n", "storage.fsync"),
    ],
)
def test_invalid_values_are_rejected(tmp_path: Path, yaml_text: str, key: str) -> None:
    cfg = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as excinfo:
        load_settings(cfg, environ={})
    assert f"{key}:" in str(excinfo.value)
    assert str(cfg) in str(excinfo.value)


@pytest.mark.parametrize(("title", "why"), [
    ("THIS_TITLE_IS_TOO_LONG", "an AE title must not exceed 16 characters"),
    ("BAD\\\\AE", "an AE title must not contain control characters or backslashes"),
    ("TAB\\tAE", "an AE title must not contain control characters or backslashes"),
    ("NÖDE", "an AE title must only contain ASCII characters"),
    ("    ", "an AE title must not be empty or all spaces"),
])
def test_ae_titles_are_checked_by_pynetdicom_with_the_reason_given(tmp_path: Path, title: str, why: str) -> None:
    cfg = write(tmp_path, f'node:\n  ae_title: "{title}"\n')
    with pytest.raises(ConfigError, match=f"node.ae_title: .*{why}"):
        load_settings(cfg, environ={})


def test_ae_title_edge_values_are_accepted(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "node:\n  ae_title: SIXTEEN_CHARS_AE\n"), environ={})
    assert s.node.ae_title == "SIXTEEN_CHARS_AE"


def test_level_is_case_insensitive() -> None:
    assert load_settings(environ={"LUMBAR_NODE__LOGGING__LEVEL": "debug"}).logging.level == "DEBUG"


def test_a_destination_is_dimse_or_dicomweb(tmp_path: Path) -> None:
    from dicom_node.config import DicomWebDestination

    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    cfg = write(tmp_path, "destinations:\n  - {name: pacs, ae_title: PACS, host: 10.0.0.1, port: 104}\n"
                f"  - {{name: vna, dicomweb: {{url: 'https://vna.example/dicom-web/', username: node, password: pw, "
                f"ca_certificates: {ca}}}}}\n  - {{name: cloud, dicomweb: {{url: 'http://127.0.0.1:8042/dicom-web', "
                "token: abc}}\n")
    s = load_settings(cfg, environ={})
    dimse, vna, cloud = s.destinations
    assert isinstance(vna, DicomWebDestination) and isinstance(cloud, DicomWebDestination)
    assert dimse.where == "PACS@10.0.0.1:104"
    assert vna.dicomweb.url == "https://vna.example/dicom-web" and vna.dicomweb.ca_certificates == ca
    assert vna.where == "https://vna.example/dicom-web (STOW-RS)" and "pw" not in vna.where
    assert cloud.dicomweb.token == "abc" and cloud.dicomweb.verify is True


@pytest.mark.parametrize(
    ("entry", "key", "words"),
    [
        ("{name: a, ae_title: X, host: h, port: 104, dicomweb: {url: 'https://h'}}", "destinations.0",
         "either DIMSE"),
        ("{name: a, dicomweb: {url: 'ftp://h/dicom-web'}}", "destinations.0.dicomweb.url", "http:// or https://"),
        ("{name: a, dicomweb: {url: 'https://u:p@h/dicom-web'}}", "destinations.0.dicomweb.url", "credentials"),
        ("{name: a, dicomweb: {url: 'https://h', username: u}}", "destinations.0.dicomweb", "go together"),
        ("{name: a, dicomweb: {url: 'https://h', username: u, password: p, token: t}}", "destinations.0.dicomweb",
         "not both"),
        ("{name: a, dicomweb: {url: 'https://h', verify: false, ca_certificates: /etc/hostname}}",
         "destinations.0.dicomweb.ca_certificates", "not a PEM file"),
        ("{name: a, dicomweb: {url: 'https://h', retries: 3}}", "destinations.0.dicomweb.retries", "Extra inputs"),
        ("{name: a, dicomweb: {}}", "destinations.0.dicomweb.url", "Field required"),
    ],
)
def test_a_wrong_dicomweb_destination_is_named(tmp_path: Path, entry: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(write(tmp_path, f"destinations:\n  - {entry}\n"), environ={})
    assert f"{key}:" in str(excinfo.value) and words in str(excinfo.value), str(excinfo.value)
