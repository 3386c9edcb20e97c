"""Typed node settings.

Sources, later ones winning: ``conf/default.yaml``, an optional config file
(deep-merged: mappings merge key by key, lists and scalars replace), then
environment variables ``LUMBAR_NODE__<SECTION>__<KEY>`` whose values are parsed
as YAML (``LUMBAR_NODE__NODE__PORT=11113`` sets ``node.port`` to the int 11113).
Relative paths are kept as given: relative to the working directory at start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)
from pynetdicom import _config as pynetdicom_config  # pynetdicom's documented settings module

from dicom_node.errors import NodeError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "default.yaml"
ENV_PREFIX = "LUMBAR_NODE__"


class ConfigError(NodeError, ValueError):
    """The configuration is unreadable or invalid; the message names the key and where it came from."""


def _check_ae_title(value: str) -> str:
    """An AE title pynetdicom accepts (its AE validator: at most 16 ASCII characters, no backslash
    or control character) that names someone: not empty, not all spaces."""
    if not value.strip():
        raise ValueError("an AE title must not be empty or all spaces")
    valid, reason = pynetdicom_config.VALIDATORS["AE"](value)
    if not valid:
        raise ValueError(f"an AE title {reason}")
    return value


def _check_level(value: str) -> str:
    level = value.upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError("not a logging level name (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    return level


def _check_group(value: str | None) -> str | None:
    if value is not None:
        import grp

        try:
            grp.getgrnam(value)
        except KeyError:
            raise ValueError(f"no group named {value!r} on this machine") from None
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


def _check_pem_file(value: Path) -> Path:
    try:
        text = value.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise ValueError(f"cannot read {value}: {exc.strerror or exc}") from None
    if "-----BEGIN " not in text:
        raise ValueError(f"{value} is not a PEM file (no -----BEGIN line)")
    return value


PEMFile = Annotated[Path, AfterValidator(_check_pem_file)]


class TLSSettings(_Section):
    """TLS of an association (PEM files; see dicom_node.tls): our certificate and key, and the CAs
    whose certificates we trust (for the node: client certificates required when set)."""

    certificate: PEMFile | None = None
    private_key: PEMFile | None = None
    ca_certificates: PEMFile | None = None

    @model_validator(mode="after")
    def _files_load(self) -> TLSSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together: set both or neither")
        from dicom_node.tls import check

        check(self)
        return self


def _check_server_tls(value: TLSSettings | None) -> TLSSettings | None:
    if value is not None and value.certificate is None:
        raise ValueError("the node's TLS needs its certificate and private_key")
    return value


class Peer(_Section):
    """A calling AE allowed to send us studies; ``host`` None means any address."""

    ae_title: AETitle
    host: str | None = None


class NodeSettings(_Section):
    """Our storage SCP: identity, listening address and who may associate."""

    ae_title: AETitle
    bind_address: str
    port: Port
    max_pdu_size: int = Field(ge=0)  # 0 = unlimited
    poll_interval_ms: float = Field(gt=0, le=1)  # pynetdicom's polls of each association (its own: 1)
    allowed_peers: list[Peer]
    refuse_unknown_peers: bool
    tls: Annotated[TLSSettings | None, AfterValidator(_check_server_tls)] = None  # None: plain TCP only
    receivers: int | None = Field(default=None, ge=1, le=64)  # receiver processes on the port (None: the CPU count)


class Destination(_Section):
    """A storage SCP that receives our results (C-STORE)."""

    name: str = Field(min_length=1)
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    tls: TLSSettings | None = None  # None: plain TCP

    @property
    def where(self) -> str:
        """How the log names it."""
        return f"{self.ae_title}@{self.host}:{self.port}{' (TLS)' if self.tls else ''}"


def _check_http_url(value: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("a DICOMweb URL is http:// or https:// with a host (the service root, e.g. "
                         "https://pacs.example.org/dicom-web)")
    if parts.username is not None or parts.password is not None:
        raise ValueError("put the credentials in username/password (or token), not in the URL")
    if parts.query or parts.fragment:
        raise ValueError("a DICOMweb service root has no query or fragment")
    return value.rstrip("/")


class DicomWebService(_Section):
    """A DICOMweb origin server (the service root, to which STOW-RS appends ``/studies``), its
    credentials (HTTP Basic, or a bearer token) and its TLS verification (the system's CAs, or
    ``ca_certificates``; ``verify: false`` turns it off)."""

    url: Annotated[str, AfterValidator(_check_http_url)]
    username: str | None = Field(default=None, min_length=1)
    password: str | None = None
    token: str | None = Field(default=None, min_length=1)
    ca_certificates: PEMFile | None = None
    verify: bool = True

    @model_validator(mode="after")
    def _one_way_in(self) -> DicomWebService:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together: set both or neither")
        if self.token is not None and self.username is not None:
            raise ValueError("set username/password or token, not both")
        if self.ca_certificates is not None and not self.verify:
            raise ValueError("ca_certificates is for verifying the server: it cannot go with verify: false")
        return self


class DicomWebDestination(_Section):
    """A DICOMweb origin server that receives our results by STOW-RS."""

    name: str = Field(min_length=1)
    dicomweb: DicomWebService

    @model_validator(mode="before")
    @classmethod
    def _not_both(cls, data: Any) -> Any:
        dimse = sorted(set(data) & {"ae_title", "host", "port", "tls"}) if isinstance(data, dict) else []
        if dimse:
            raise ValueError(f"a destination is either DIMSE (ae_title, host, port, tls) or DICOMweb (dicomweb), "
                             f"not both (got {', '.join(dimse)} beside dicomweb)")
        return data

    @property
    def where(self) -> str:
        """How the log names it (its URL, never its credentials)."""
        return f"{self.dicomweb.url} (STOW-RS)"


def _destination_kind(value: Any) -> str:
    """A destination is DICOMweb when it has a ``dicomweb`` mapping, else DIMSE (C-STORE)."""
    has = value.keys() if isinstance(value, dict) else vars(value) if isinstance(value, BaseModel) else {}
    return "dicomweb" if "dicomweb" in has else "dimse"


DESTINATION_KINDS = ("dimse", "dicomweb")

#: A destination of the results: a storage SCP (``ae_title``, ``host``, ``port``) or a DICOMweb
#: origin server (``dicomweb: {url}``), never both.
AnyDestination = Annotated[Annotated[Destination, Tag(DESTINATION_KINDS[0])]
                           | Annotated[DicomWebDestination, Tag(DESTINATION_KINDS[1])],
                           Discriminator(_destination_kind)]


class StorageSettings(_Section):
    """Spool of received instances and the SQLite ledger."""

    spool_dir: Path
    results_dir: Path
    ledger_path: Path
    min_free_disk_mb: int = Field(ge=0)
    fsync: bool
    group: Annotated[str | None, AfterValidator(_check_group)] = None  # also readable by it (0640 / 0750)
    retention_days: float | None = Field(default=None, gt=0)  # purge finished studies older than this
    purge_below_free_mb: int = Field(default=0, ge=0)  # purge finished studies, oldest first, below this free disk


class StudySettings(_Section):
    """When a received study counts as complete, and when it is reported."""

    quiet_time_s: float = Field(gt=0)
    release_when_complete: bool
    report_when_nothing_assessed: bool = False  # a study of which no label was graded gets no report


class DeliverySettings(_Section):
    """Retries of result delivery, with exponential backoff."""

    max_attempts: int = Field(ge=1)
    backoff_initial_s: float = Field(gt=0)
    backoff_max_s: float = Field(gt=0)
    timeout_s: float = Field(default=30.0, gt=0)  # ACSE, DIMSE and network timeout of one attempt

    @model_validator(mode="after")
    def _backoff_order(self) -> DeliverySettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        return self


class ModelSettings(_Section):
    """Where the ONNX model lives (None = bundled default) and how it runs."""

    dir: Path | None
    providers: list[str] = Field(min_length=1)


class LimitsSettings(_Section):
    """What one peer, one instance or one study may cost the node (hostile or careless input)."""

    socket_timeout_s: float = Field(gt=0)  # an accepted connection that sends nothing for this long is closed
    acse_timeout_s: float = Field(gt=0)  # association negotiation and release
    dimse_timeout_s: float = Field(gt=0)  # between DIMSE messages of an association
    network_timeout_s: float = Field(gt=0)  # an association idle this long is aborted
    max_associations: int = Field(ge=1)  # in total
    max_associations_per_address: int = Field(ge=1)
    max_connections: int = Field(ge=1)  # open TCP connections, associated or not
    max_instance_mb: float = Field(gt=0)  # an encoded dataset (after inflating Deflate)
    max_pixels: int = Field(ge=1)  # Rows x Columns x frames x samples of one image
    max_series_images: int = Field(ge=1)  # images of one series graded; ImagesInAcquisition above it is ignored
    localiser_batch: int = Field(ge=1)  # sagittal slices per localiser run
    worker_memory_mb: int = Field(ge=256)  # address space of a grading worker (RLIMIT_AS)
    grading_timeout_s: float = Field(gt=0)  # one study's grading; a study over it fails, the worker is replaced
    worker_deaths_before_giving_up: int = Field(ge=1)  # a study that killed its worker this often is failed


class LoggingSettings(_Section):
    """Log format (auto = console on a terminal, JSON otherwise) and level."""

    format: Literal["auto", "json", "console"]
    level: Annotated[str, AfterValidator(_check_level)]


class OutputsSettings(_Section):
    """Which optional objects a run writes besides the SR and the Grad-CAM SCs."""

    pdf: bool = True  # the one-page Encapsulated PDF summary (its own series, delivered with the SR)
    # the Key Object Selection ("Of Interest") of the source images of the findings graded Moderate or
    # Severe (its own series, delivered with the SR; none when there is no such finding)
    key_images: bool = True


class WebSettings(_Section):
    """The node's web page (dashboard, upload, /metrics, /healthz), served by ``lumbar-node serve``."""

    bind_address: str = "127.0.0.1"
    port: Port | None = 8080  # None: no web page
    accounts_file: Path = Path("var/accounts.yaml")  # written by `lumbar-node user add`
    session_max_age_s: int = Field(default=28800, ge=60)  # a sign-in lasts at most this long (absolute lifetime)
    session_idle_s: int = Field(default=1800, ge=1)  # ... and ends after this long without a request
    sessions_file: Path | None = None  # the server-side sessions (SQLite); None: sessions.sqlite beside the ledger
    signin_free_attempts: int = Field(default=5, ge=1)  # failed sign-ins per account, and per address, before waits
    signin_wait_s: float = Field(default=1.0, gt=0)  # the first wait past them; each further failure doubles it...
    signin_wait_max_s: float = Field(default=300.0, gt=0)  # ... up to this (never a permanent lockout)
    secure_cookies: bool = False  # the session cookie's Secure flag (set it behind HTTPS)
    metrics_anonymous: bool = False  # /metrics without signing in (else HTTP Basic with an account)
    upload_max_mb: float = Field(default=2048, gt=0)  # one upload, all files together
    page_size: int = Field(default=50, ge=1, le=1000)  # studies per dashboard page


class RetrieveMethod(StrEnum):
    """How a query/retrieve source hands over the instances the node asks for."""

    C_MOVE = "c-move"  # the PACS sends them to the node's own AE title (its storage SCP)
    C_GET = "c-get"  # they come back on the node's own association (C-STORE sub-operations)


class QueryRetrieveSource(_Section):
    """A PACS (or archive) the node may ask for studies and series: a DIMSE Q/R SCP (``ae_title``,
    ``host``, ``port``, ``method``) or a DICOMweb service (``dicomweb``)."""

    name: str = Field(min_length=1, max_length=64)
    ae_title: AETitle | None = None
    host: str | None = Field(default=None, min_length=1)
    port: Port | None = None
    method: RetrieveMethod = RetrieveMethod.C_MOVE
    tls: TLSSettings | None = None  # DIMSE over TLS (None: plain TCP)
    dicomweb: DicomWebService | None = None

    @model_validator(mode="after")
    def _dimse_or_dicomweb(self) -> QueryRetrieveSource:
        dimse = [self.ae_title is not None, self.host is not None, self.port is not None]
        if self.dicomweb is not None:
            if any(dimse) or self.tls is not None:
                raise ValueError("a source is DIMSE (ae_title, host, port) or DICOMweb (dicomweb), not both")
        elif not all(dimse):
            raise ValueError("a DIMSE source needs ae_title, host and port (or give dicomweb: {url: ...})")
        return self


class RetrieveSettings(_Section):
    """How the node asks its query/retrieve sources (``query_retrieve``) for what a study lacks."""

    missing_series: bool = True  # before grading a study without a needed series, ask the PACS for it
    wait_s: float = Field(default=120.0, gt=0)  # at most this long per study (query, retrieve, arrival)
    timeout_s: float = Field(default=30.0, gt=0)  # connection, association and each response of a source


class Settings(_Section):
    """The whole node configuration."""

    node: NodeSettings
    destinations: list[AnyDestination]
    storage: StorageSettings
    study: StudySettings
    delivery: DeliverySettings
    models: ModelSettings
    workers: int = Field(ge=1)
    limits: LimitsSettings
    logging: LoggingSettings
    outputs: OutputsSettings = Field(default_factory=OutputsSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    query_retrieve: list[QueryRetrieveSource] = Field(default_factory=list)  # asked in this order
    retrieve: RetrieveSettings = Field(default_factory=RetrieveSettings)

    @model_validator(mode="after")
    def _unique_destinations(self) -> Settings:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError(f"destination names must be unique (got {names})")
        return self

    @model_validator(mode="after")
    def _unique_sources(self) -> Settings:
        names = [s.name for s in self.query_retrieve]
        if len(names) != len(set(names)):
            raise ValueError(f"query_retrieve source names must be unique (got {names})")
        return self


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level of a config file must be a mapping")
    return data


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base``: dicts recursively, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Set ``LUMBAR_NODE__A__B=value`` as ``data[a][b]``; return {key path: variable name}."""
    applied: dict[tuple[str, ...], str] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = tuple(name[len(ENV_PREFIX):].lower().split("__"))
        if not all(parts):
            raise ConfigError(f"{name}: malformed variable name, expected {ENV_PREFIX}SECTION__KEY")
        try:
            value = yaml.safe_load(environ[name])
        except yaml.YAMLError as exc:
            raise ConfigError(f"{name}: cannot parse value {environ[name]!r}: {exc}") from exc
        node = data
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {'.'.join(parts[: i + 1])} is not a section")
        node[parts[-1]] = value
        applied[parts] = name
    return applied


def _in_file(data: Any, loc: tuple[Any, ...]) -> bool:
    """True when the value at ``loc`` (or a list/scalar containing it) was set by ``data``."""
    for part in loc:
        if not isinstance(data, dict):
            return True
        if part not in data:
            return False
        data = data[part]
    return True


def _without_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """An error's location without the destination kind pydantic puts after the list index
    (``destinations.0.dimse.port`` is ``destinations.0.port`` in the file)."""
    return tuple(part for i, part in enumerate(loc)
                 if not (i > 0 and isinstance(loc[i - 1], int) and part in DESTINATION_KINDS))


def load_settings(config_file: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load defaults, merge ``config_file`` and ``LUMBAR_NODE__*`` variables; raise ConfigError if invalid."""
    environ = os.environ if environ is None else environ
    data = _read_yaml(DEFAULT_CONFIG)
    file_data: dict[str, Any] = {}
    if config_file is not None:
        file_data = _read_yaml(Path(config_file))
        data = _merge(data, file_data)
    from_env = _apply_env(data, environ)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = _without_tags(tuple(err["loc"]))
            key = ".".join(str(p) for p in loc) or "(top level)"
            plain = err["type"] != "missing" and not isinstance(err["input"], (dict, list))
            got = f" (got {err['input']!r})" if plain else ""
            env_var = next((var for path, var in from_env.items()
                            if loc and (loc[: len(path)] == path or path[: len(loc)] == loc)), None)
            if env_var:
                source = f"environment variable {env_var}"
            elif config_file is not None and _in_file(file_data, loc):
                source = str(config_file)
            else:
                source = str(DEFAULT_CONFIG)
            problems.append(f"{key}: {err['msg']}{got} [from {source}]")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None
