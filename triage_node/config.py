"""Typed, validated configuration: ``config.toml`` + environment overrides + built-in defaults.

Precedence, lowest to highest: the defaults named in this module, the TOML file
(``--config FILE`` or ``$TRIAGE_NODE_CONFIG``), environment variables for secrets and
deployment paths (``TRIAGE_NODE_DATA_DIR``, ``TRIAGE_NODE_DATABASE_URL``,
``TRIAGE_NODE_BROKER_URL``, ``TRIAGE_NODE_API_TOKEN``, ``TRIAGE_NODE_SPOOL_TOKEN``), then
command-line flags (applied by the CLI with :func:`dataclasses.replace`).

Every section is a frozen dataclass; :func:`load_config` validates while it builds them
and raises :class:`~triage_node.errors.ConfigError` naming the key and the bad value.
Unknown keys are errors too: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from triage_node.errors import ConfigError

DEFAULT_AE_TITLE = "ICHTRIAGE"
DEFAULT_DICOM_PORT = 11112
DEFAULT_MAX_ASSOCIATIONS = 32
DEFAULT_ACSE_TIMEOUT = 30.0
DEFAULT_DIMSE_TIMEOUT = 60.0
DEFAULT_NETWORK_TIMEOUT = 120.0
#: The largest P-DATA PDU we accept; large PDUs mean fewer, bigger socket reads.
DEFAULT_MAX_PDU = 4 * 1024 * 1024
DEFAULT_API_PORT = 8080
#: Receive loops of the Storage SCP: our own (``native``) or pynetdicom's.
DICOM_ENGINES = ("native", "pynetdicom")
DEFAULT_DICOM_ENGINE = "native"

ENV_CONFIG = "TRIAGE_NODE_CONFIG"
ENV_DATA_DIR = "TRIAGE_NODE_DATA_DIR"
ENV_DATABASE_URL = "TRIAGE_NODE_DATABASE_URL"
ENV_BROKER_URL = "TRIAGE_NODE_BROKER_URL"
ENV_API_TOKEN = "TRIAGE_NODE_API_TOKEN"
ENV_SPOOL_TOKEN = "TRIAGE_NODE_SPOOL_TOKEN"

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: printable, no backslash
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def default_data_dir() -> Path:
    """The data directory when none is configured: ``$XDG_DATA_HOME/triage-node``."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "triage-node"


@dataclass(frozen=True, slots=True)
class CallerRule:
    """A calling AE allowed to associate; ``host`` empty means from any address."""

    ae_title: str
    host: str = ""

    def matches(self, ae_title: str, address: str) -> bool:
        """Whether a caller with this AE title and IP address is covered by the rule."""
        return ae_title.strip() == self.ae_title and (not self.host or self.host == address)


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """TLS for DICOM (PS3.15 B.1); all paths PEM. Empty ``cert`` means TLS off."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    require_client_cert: bool = True

    @property
    def enabled(self) -> bool:
        """True when a certificate is configured."""
        return bool(self.cert)


@dataclass(frozen=True, slots=True)
class DicomConfig:
    """``[dicom]``: the Storage SCP."""

    ae_title: str = DEFAULT_AE_TITLE
    #: reject associations whose called AE title is not ``ae_title``
    require_called_ae: bool = False
    host: str = "0.0.0.0"
    port: int = DEFAULT_DICOM_PORT
    allowed_callers: tuple[CallerRule, ...] = ()
    max_associations: int = DEFAULT_MAX_ASSOCIATIONS
    #: receiving processes sharing the port (SO_REUSEPORT); 0 = one per CPU core
    processes: int = 0
    acse_timeout: float = DEFAULT_ACSE_TIMEOUT
    dimse_timeout: float = DEFAULT_DIMSE_TIMEOUT
    network_timeout: float = DEFAULT_NETWORK_TIMEOUT
    max_pdu_size: int = DEFAULT_MAX_PDU
    #: seconds associations get to finish after SIGTERM before they are aborted
    shutdown_grace: float = 10.0
    tls: TLSConfig = field(default_factory=TLSConfig)
    #: receive loop: "native" (triage_node.ulserver) or "pynetdicom"
    engine: str = DEFAULT_DICOM_ENGINE

    @property
    def effective_processes(self) -> int:
        """Number of receiving processes actually started."""
        return self.processes or max(1, min(os.cpu_count() or 1, 8))


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """``[storage]``: the spool of received instances."""

    path: Path
    #: fsync files and directories before acknowledging (only ever off in benchmarks)
    fsync: bool = True
    #: refuse new instances (0xA700) when less than this is free on the spool's disk
    min_free_mb: int = 512
    #: serve stored instances over HTTP to workers that cannot see the spool (0 = off)
    http_port: int = 0
    http_host: str = "127.0.0.1"
    #: bearer token the spool server requires and workers send (env TRIAGE_NODE_SPOOL_TOKEN)
    http_token: str = ""


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """``[database]``."""

    url: str


DEFAULT_HEAD_BODY_PARTS = ("HEAD", "BRAIN", "SKULL", "CEREBRUM", "NEURO")
DEFAULT_HEAD_PATTERNS = (r"head", r"brain", r"cran", r"cereb", r"skull", r"\bhd\b", r"neuro")


@dataclass(frozen=True, slots=True)
class TriageConfig:
    """``[triage]``: when a series is complete, and which series are triaged."""

    #: a series is complete when nothing arrived for this long (Orthanc's StableAge)
    stable_seconds: float = 60.0
    #: ...or this long after an association that delivered it was released
    release_settle_seconds: float = 2.0
    #: fewer stored axial CT slices than this: not triaged
    min_slices: int = 10
    #: largest angle between the slice normal and the patient's z axis (gantry tilt), degrees
    max_tilt_degrees: float = 35.0
    #: BodyPartExamined values that mean head (upper case)
    body_parts: tuple[str, ...] = DEFAULT_HEAD_BODY_PARTS
    #: regular expressions (case-insensitive) on series or study description meaning head
    description_patterns: tuple[str, ...] = DEFAULT_HEAD_PATTERNS


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """``[queue]``: empty ``broker_url`` = the embedded durable local transport."""

    broker_url: str = ""
    #: Redis: a task not acknowledged this long after delivery (its worker died) is
    #: delivered again
    visibility_timeout: float = 3600.0
    #: infer slices in batches of this many while a series arrives (0 = only at the end)
    eager_batch: int = 16
    #: where a worker reads slices: empty = ``[storage] path`` (same host or a shared
    #: volume); else the SCP host's spool server, e.g. "http://scp-host:11113"
    spool_url: str = ""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """``[model]``: the artifact the worker loads (resolved at load time: an empty ``path``
    becomes the packaged demo model when the installation has it; ``enabled = false`` makes
    it empty, and workers then only assemble and queue)."""

    path: str = ""
    device: str = "auto"
    enabled: bool = True


#: The demo model shipped in the package (phantom-trained; see README).
PACKAGED_MODEL = "data/demo-model.tnm"


def packaged_model_path() -> Path | None:
    """The packaged demo model's file, or None when this installation has none."""
    from importlib import resources

    entry = resources.files("triage_node").joinpath(PACKAGED_MODEL)
    return Path(str(entry)) if entry.is_file() else None


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    """One ``[[destinations]]`` entry: a PACS that receives our results."""

    ae_title: str
    host: str
    port: int
    tls: TLSConfig = field(default_factory=TLSConfig)


DEFAULT_DISCLAIMER = "Triage aid - not for diagnostic use"


@dataclass(frozen=True, slots=True)
class ResultsConfig:
    """``[results]``: the Structured Report and its delivery to ``[[destinations]]``."""

    #: also send the SR of series below the threshold (flagged series are always sent)
    send_negative: bool = False
    #: free text put into every SR
    disclaimer: str = DEFAULT_DISCLAIMER
    #: attempts per destination before a delivery is given up (failed)
    max_attempts: int = 10
    #: retry delays: backoff_base_seconds * 2**(attempt - 1), at most backoff_max_seconds,
    #: of which a random part (up to half) is dropped (jitter)
    backoff_base_seconds: float = 30.0
    backoff_max_seconds: float = 3600.0
    #: seconds allowed for connecting, association negotiation and each response
    timeout: float = 30.0
    #: how often the delivery loop looks for due deliveries, seconds
    poll_seconds: float = 2.0
    #: also send a Secondary Capture key image (key slice + heatmap) with each SR
    key_image: bool = True


API_AUTH_MODES = ("auto", "required")


@dataclass(frozen=True, slots=True)
class ApiUser:
    """One ``[[api.users]]`` entry: a radiologist who signs in with HTTP basic auth."""

    name: str
    #: hex SHA-256 of the password (``printf %s PASSWORD | sha256sum``)
    password_sha256: str


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """``[api]``: the worklist API and page."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_API_PORT
    token: str = ""
    #: "auto": credentials (``token`` or ``users``) are required when ``host`` is not a
    #: loopback address, and checked whenever configured; "required": also on loopback
    auth: str = "auto"
    users: tuple[ApiUser, ...] = ()


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """``[retention]``: what ``triage-node retention`` removes, and when."""

    #: spooled images of settled series (done with every SR delivered, or not triaged)
    #: older than this many days are removed; 0 = keep them forever
    images_days: int = 30
    #: database rows of settled series, and audit events, older than this many days are
    #: removed; 0 = keep them forever (must be 0 or >= images_days)
    rows_days: int = 0


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """``[logging]``."""

    level: str = "INFO"
    json: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    """The whole effective configuration."""

    data_dir: Path
    dicom: DicomConfig
    storage: StorageConfig
    database: DatabaseConfig
    triage: TriageConfig = field(default_factory=TriageConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    destinations: tuple[DestinationConfig, ...] = ()
    api: ApiConfig = field(default_factory=ApiConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    source: str = "built-in defaults"

    def redacted(self) -> dict[str, Any]:
        """The configuration as a dict, secrets masked: what start-up logs show."""
        from triage_node.logs import redact_url  # level 0 helper, imported late

        data: dict[str, Any] = _to_plain(self)
        data["database"]["url"] = redact_url(self.database.url)
        data["queue"]["broker_url"] = redact_url(self.queue.broker_url)
        if self.api.token:
            data["api"]["token"] = "***"
        for user in data["api"]["users"]:
            user["password_sha256"] = "***"
        if self.storage.http_token:
            data["storage"]["http_token"] = "***"
        return data


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --------------------------------------------------------------------------- validation


class _Section:
    """Typed reads from one TOML table; remembers which keys were used."""

    def __init__(self, table: Mapping[str, Any], prefix: str) -> None:
        if not isinstance(table, Mapping):
            raise ConfigError(f"{prefix.rstrip('.')}: expected a table, got {table!r}")
        self.table = table
        self.prefix = prefix
        self.used: set[str] = set()

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        return self.table.get(key, default)

    def fail(self, key: str, value: Any, why: str) -> ConfigError:
        return ConfigError(f"{self.prefix}{key} = {value!r}: {why}")

    def str_(self, key: str, default: str) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self.fail(key, value, "expected a string")
        return value

    def bool_(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, value, "expected true or false")
        return value

    def int_(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, value, "expected an integer")
        if not lo <= value <= hi:
            raise self.fail(key, value, f"must be between {lo} and {hi}")
        return value

    def float_(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, value, "expected a number")
        if not lo <= value <= hi:
            raise self.fail(key, value, f"must be between {lo} and {hi}")
        return float(value)

    def strings_(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(key, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, value, "expected a list of strings")
        return tuple(value)

    def ae_(self, key: str, default: str) -> str:
        value = self.str_(key, default)
        if not _AE_RE.match(value) or not value.strip():
            raise self.fail(key, value, "an AE title is 1-16 printable characters, no backslash")
        return value.strip()

    def host_(self, key: str, default: str) -> str:
        value = self.str_(key, default)
        if not value or any(c.isspace() for c in value):
            raise self.fail(key, value, "expected a host name or IP address")
        return value

    def sub(self, key: str) -> _Section:
        return _Section(self._get(key, {}), f"{self.prefix}{key}.")

    def check_unknown(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(f"unknown key {self.prefix}{unknown[0]} (known: "
                              f"{', '.join(sorted(self.used))})")


def _tls(section: _Section) -> TLSConfig:
    tls = TLSConfig(
        cert=section.str_("cert", ""),
        key=section.str_("key", ""),
        ca=section.str_("ca", ""),
        require_client_cert=section.bool_("require_client_cert", True),
    )
    section.check_unknown()
    for name in ("cert", "key", "ca"):
        value = getattr(tls, name)
        if value and not Path(value).is_file():
            raise section.fail(name, value, "file not found")
    if tls.cert and not tls.key:
        raise section.fail("key", tls.key, "required when cert is set")
    return tls


def _callers(section: _Section) -> tuple[CallerRule, ...]:
    raw = section._get("allowed_callers", [])
    if not isinstance(raw, list):
        raise section.fail("allowed_callers", raw, "expected a list of {ae_title, host} tables")
    rules = []
    for i, item in enumerate(raw):
        sub = _Section(item, f"{section.prefix}allowed_callers[{i}].")
        ae = sub.ae_("ae_title", "")
        host = sub.str_("host", "")
        sub.check_unknown()
        if host:
            try:
                ipaddress.ip_address(host)
            except ValueError as exc:
                raise sub.fail("host", host, "expected an IP address") from exc
        rules.append(CallerRule(ae_title=ae, host=host))
    return tuple(rules)


def _dicom(section: _Section) -> DicomConfig:
    cfg = DicomConfig(
        ae_title=section.ae_("ae_title", DEFAULT_AE_TITLE),
        require_called_ae=section.bool_("require_called_ae", False),
        host=section.host_("host", "0.0.0.0"),
        port=section.int_("port", DEFAULT_DICOM_PORT, 0, 65535),
        allowed_callers=_callers(section),
        max_associations=section.int_("max_associations", DEFAULT_MAX_ASSOCIATIONS, 1, 10000),
        processes=section.int_("processes", 0, 0, 64),
        acse_timeout=section.float_("acse_timeout", DEFAULT_ACSE_TIMEOUT, 0.1, 3600),
        dimse_timeout=section.float_("dimse_timeout", DEFAULT_DIMSE_TIMEOUT, 0.1, 3600),
        network_timeout=section.float_("network_timeout", DEFAULT_NETWORK_TIMEOUT, 0.1, 86400),
        max_pdu_size=section.int_("max_pdu_size", DEFAULT_MAX_PDU, 0, 2**31 - 1),
        shutdown_grace=section.float_("shutdown_grace", 10.0, 0, 3600),
        tls=_tls(section.sub("tls")),
        engine=section.str_("engine", DEFAULT_DICOM_ENGINE),
    )
    section.check_unknown()
    if cfg.engine not in DICOM_ENGINES:
        raise section.fail("engine", cfg.engine, f"expected one of {', '.join(DICOM_ENGINES)}")
    if 0 < cfg.max_pdu_size < 4096:
        raise section.fail("max_pdu_size", cfg.max_pdu_size, "0 (no limit) or at least 4096")
    return cfg


def _destinations(raw: Any) -> tuple[DestinationConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"destinations = {raw!r}: expected [[destinations]] tables")
    out = []
    for i, item in enumerate(raw):
        sec = _Section(item, f"destinations[{i}].")
        dest = DestinationConfig(
            ae_title=sec.ae_("ae_title", ""),
            host=sec.host_("host", ""),
            port=sec.int_("port", 104, 1, 65535),
            tls=_tls(sec.sub("tls")),
        )
        sec.check_unknown()
        out.append(dest)
    return tuple(out)


def _api_users(section: _Section) -> tuple[ApiUser, ...]:
    raw = section._get("users", [])
    if not isinstance(raw, list):
        raise section.fail("users", raw, "expected [[api.users]] tables {name, password_sha256}")
    users: list[ApiUser] = []
    for i, item in enumerate(raw):
        sub = _Section(item, f"{section.prefix}users[{i}].")
        user = ApiUser(name=sub.str_("name", ""), password_sha256=sub.str_("password_sha256", ""))
        sub.check_unknown()
        if not user.name or ":" in user.name or any(c.isspace() for c in user.name):
            raise sub.fail("name", user.name, "a user name is non-empty, without ':' or spaces")
        if not re.fullmatch(r"[0-9a-f]{64}", user.password_sha256.lower()):
            raise sub.fail("password_sha256", "...", "expected 64 hex digits (sha256sum)")
        if any(u.name == user.name for u in users):
            raise sub.fail("name", user.name, "duplicate user")
        users.append(dataclasses.replace(user, password_sha256=user.password_sha256.lower()))
    return tuple(users)


def _results(section: _Section) -> ResultsConfig:
    cfg = ResultsConfig(
        send_negative=section.bool_("send_negative", False),
        disclaimer=section.str_("disclaimer", DEFAULT_DISCLAIMER),
        max_attempts=section.int_("max_attempts", 10, 1, 10000),
        backoff_base_seconds=section.float_("backoff_base_seconds", 30.0, 0.01, 86400),
        backoff_max_seconds=section.float_("backoff_max_seconds", 3600.0, 0.01, 7 * 86400),
        timeout=section.float_("timeout", 30.0, 0.1, 3600),
        poll_seconds=section.float_("poll_seconds", 2.0, 0.01, 3600),
        key_image=section.bool_("key_image", True),
    )
    section.check_unknown()
    if not cfg.disclaimer.strip():
        raise section.fail("disclaimer", cfg.disclaimer, "must not be empty")
    if len(cfg.disclaimer) > 1024:
        raise section.fail("disclaimer", cfg.disclaimer[:40] + "...", "at most 1024 characters")
    if cfg.backoff_max_seconds < cfg.backoff_base_seconds:
        raise section.fail("backoff_max_seconds", cfg.backoff_max_seconds,
                           f"must be >= backoff_base_seconds ({cfg.backoff_base_seconds})")
    return cfg


def _path(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def build_config(
    data: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    source: str = "built-in defaults",
    base_dir: Path | None = None,
) -> Config:
    """Validate a parsed TOML mapping (possibly empty) into a :class:`Config`.

    Parameters
    ----------
    data : Mapping
        The parsed TOML document.
    env : Mapping, optional
        Environment for overrides; defaults to ``os.environ``.
    source : str
        Where the data came from, for messages and the start-up log.
    base_dir : Path, optional
        Relative paths in the file are resolved against this (the file's folder).

    Raises
    ------
    ConfigError
        With the offending key and value in the message.
    """
    env = os.environ if env is None else env
    base = base_dir or Path.cwd()
    root = _Section(data, "")

    data_dir_raw = env.get(ENV_DATA_DIR) or root.str_("data_dir", "")
    root.used.add("data_dir")
    data_dir = _path(data_dir_raw, base) if data_dir_raw else default_data_dir()

    dicom = _dicom(root.sub("dicom"))

    st = root.sub("storage")
    storage_path = st.str_("path", "")
    storage = StorageConfig(
        path=_path(storage_path, base) if storage_path else data_dir / "spool",
        fsync=st.bool_("fsync", True),
        min_free_mb=st.int_("min_free_mb", 512, 0, 10**9),
        http_port=st.int_("http_port", 0, 0, 65535),
        http_host=st.host_("http_host", "127.0.0.1"),
        http_token=env.get(ENV_SPOOL_TOKEN) or st.str_("http_token", ""),
    )
    st.used.add("http_token")
    st.check_unknown()

    db = root.sub("database")
    url = env.get(ENV_DATABASE_URL) or db.str_("url", "")
    db.used.add("url")
    db.check_unknown()
    if not url:
        url = f"sqlite:///{data_dir / 'triage-node.db'}"
    if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", url):
        raise ConfigError(f"database.url = {url.split('@')[-1]!r}: expected sqlite:/// or "
                          "postgresql+psycopg:// URL")

    tr = root.sub("triage")
    triage = TriageConfig(
        stable_seconds=tr.float_("stable_seconds", 60.0, 0.1, 86400),
        release_settle_seconds=tr.float_("release_settle_seconds", 2.0, 0, 3600),
        min_slices=tr.int_("min_slices", 10, 1, 10000),
        max_tilt_degrees=tr.float_("max_tilt_degrees", 35.0, 0, 90),
        body_parts=tuple(v.upper() for v in tr.strings_("body_parts", DEFAULT_HEAD_BODY_PARTS)),
        description_patterns=tr.strings_("description_patterns", DEFAULT_HEAD_PATTERNS),
    )
    tr.check_unknown()
    for pattern in triage.description_patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise tr.fail("description_patterns", pattern, f"not a regular expression: {exc}"
                          ) from exc

    qu = root.sub("queue")
    queue = QueueConfig(
        broker_url=env.get(ENV_BROKER_URL) or qu.str_("broker_url", ""),
        visibility_timeout=qu.float_("visibility_timeout", 3600.0, 1, 7 * 86400),
        eager_batch=qu.int_("eager_batch", 16, 0, 4096),
        spool_url=qu.str_("spool_url", ""),
    )
    qu.used.add("broker_url")
    if queue.spool_url and not re.match(r"^https?://[^/\s]+/?$", queue.spool_url):
        raise qu.fail("spool_url", queue.spool_url, "expected http://host:port")
    qu.check_unknown()

    re_sec = root.sub("retention")
    retention = RetentionConfig(images_days=re_sec.int_("images_days", 30, 0, 36500),
                                rows_days=re_sec.int_("rows_days", 0, 0, 36500))
    re_sec.check_unknown()
    if retention.rows_days and retention.rows_days < retention.images_days:
        raise re_sec.fail("rows_days", retention.rows_days,
                          f"must be 0 or >= images_days ({retention.images_days})")

    mo = root.sub("model")
    model = ModelConfig(path=mo.str_("path", ""), device=mo.str_("device", "auto"),
                        enabled=mo.bool_("enabled", True))
    mo.check_unknown()
    if not model.enabled:
        model = dataclasses.replace(model, path="")
    elif not model.path:
        model = dataclasses.replace(model, path=str(packaged_model_path() or ""))

    api_sec = root.sub("api")
    api = ApiConfig(
        host=api_sec.host_("host", "127.0.0.1"),
        port=api_sec.int_("port", DEFAULT_API_PORT, 0, 65535),
        token=env.get(ENV_API_TOKEN) or api_sec.str_("token", ""),
        auth=api_sec.str_("auth", "auto"),
        users=_api_users(api_sec),
    )
    api_sec.used.add("token")
    api_sec.check_unknown()
    if api.auth not in API_AUTH_MODES:
        raise api_sec.fail("auth", api.auth, f"expected one of {', '.join(API_AUTH_MODES)}")

    lg = root.sub("logging")
    level = lg.str_("level", "INFO").upper()
    if level not in _LOG_LEVELS:
        raise lg.fail("level", level, f"one of {', '.join(_LOG_LEVELS)}")
    logging_cfg = LoggingConfig(level=level, json=lg.bool_("json", False))
    lg.check_unknown()

    results = _results(root.sub("results"))
    destinations = _destinations(root._get("destinations", []))
    root.check_unknown()
    return Config(
        data_dir=data_dir,
        dicom=dicom,
        storage=storage,
        database=DatabaseConfig(url=url),
        triage=triage,
        queue=queue,
        retention=retention,
        model=model,
        destinations=destinations,
        api=api,
        logging=logging_cfg,
        results=results,
        source=source,
    )


def load_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Load the configuration from ``path``, ``$TRIAGE_NODE_CONFIG`` or built-in defaults.

    Raises
    ------
    ConfigError
        If the file is missing, is not valid TOML, or holds an invalid key or value.
    """
    env = os.environ if env is None else env
    chosen = path if path is not None else env.get(ENV_CONFIG) or None
    if chosen is None:
        return build_config({}, env=env)
    file = Path(chosen).expanduser()
    try:
        with file.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {file}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc}") from exc
    return build_config(data, env=env, source=str(file), base_dir=file.parent.resolve())
