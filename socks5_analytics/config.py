"""One validated configuration schema for every component.

Values come, lowest priority first, from the defaults below, a YAML file (`--config`), a
`.env` file, `S5A_*` environment variables (`__` nests: `S5A_PROXY__LISTEN`) and finally the
few command-line flags. Unknown keys are errors, so a typo never silently falls back to a
default. A bad value raises `ConfigError` whose message names the key and the problem.
"""

from __future__ import annotations

import contextvars
import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.exceptions import SettingsError

__all__ = [
    "Address",
    "ApiSettings",
    "ConfigError",
    "DatabaseSettings",
    "EventSinkSettings",
    "LogSettings",
    "OperatorSettings",
    "PolicySecretSettings",
    "ProxySettings",
    "Settings",
    "format_address",
    "load_settings",
    "parse_address",
]


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and the problem."""


def parse_address(value: str, *, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """Parse `HOST:PORT`, `[V6]:PORT` or `:PORT` into a (host, port) pair."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [IPV6]:PORT, got {value!r}")
        ipaddress.IPv6Address(host)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        if ":" in host:
            raise ValueError(f"an IPv6 host needs brackets: [{host}]:{port_text}")
        host = host or default_host
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 0-65535, got {port_text!r}")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """The inverse of `parse_address`: brackets around IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address(value: Any) -> tuple[str, int]:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        host, port = value
        if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
            raise ValueError("expected [HOST, PORT] with a string host and an integer port")
        value = format_address(host, port)
    if not isinstance(value, str):
        raise ValueError("expected a string HOST:PORT")
    return parse_address(value)


# NoDecode: an environment value like S5A_PROXY__LISTEN=0.0.0.0:1080 is text, not JSON.
Address = Annotated[tuple[str, int], NoDecode, BeforeValidator(_address)]
Seconds = Annotated[float, Field(gt=0, le=86_400 * 7)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogSettings(_Section):
    """How every component logs."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class TlsClientSettings(_Section):
    """TLS from a proxy node to the collectors (mTLS when a certificate is given)."""

    enabled: bool = False
    # PEM bundle of the CAs that sign the collectors' certificates; null: the system's
    ca_file: Path | None = None
    # this node's client certificate and key (PEM), for collectors that require mTLS
    cert_file: Path | None = None
    key_file: Path | None = None
    # the name to check in the collector's certificate, when it differs from the address
    server_name: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> TlsClientSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class TlsServerSettings(_Section):
    """TLS on the collector's gRPC port; a client CA makes client certificates mandatory."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    # PEM bundle of the CAs that sign the proxies' client certificates: set = mTLS required
    client_ca_file: Path | None = None

    @model_validator(mode="after")
    def _complete(self) -> TlsServerSettings:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("TLS needs cert_file and key_file")
        return self


class EventSinkSettings(_Section):
    """Where a proxy node sends its connection events, and how."""

    sink: Literal["auto", "grpc", "jsonl", "none"] = "auto"
    # NoDecode: S5A_PROXY__EVENTS__COLLECTORS=a:50051,b:50051 is a comma-separated list.
    collectors: Annotated[list[Address], NoDecode] = Field(default_factory=list)
    path: Path = Path("var/events.jsonl")
    buffer_events: int = Field(default=100_000, ge=1, le=10_000_000)
    flush_interval: Seconds = 0.2
    # at most the collector's default `max_batch_items`: a larger batch would be refused
    batch_max_events: int = Field(default=500, ge=1, le=10_000)
    max_inflight_batches: int = Field(default=8, ge=1, le=1024)
    spool_dir: Path = Path("var/spool")
    spool_max_bytes: int = Field(default=1 << 30, ge=1 << 20)
    spool_fsync: Literal["always", "interval", "never"] = "interval"
    spool_fsync_interval: Seconds = 1.0
    heartbeat_interval: Seconds = 5.0
    interim_interval: Seconds = 60.0
    backoff_initial: Seconds = 0.1
    backoff_max: Seconds = 10.0
    drain_timeout: float = Field(default=5.0, ge=0, le=600)
    # Shared secret the collector requires (sent as `authorization: Bearer ...`).
    token: SecretStr | None = Field(default=None, min_length=16)
    tls: TlsClientSettings = TlsClientSettings()

    @field_validator("collectors", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part for part in (p.strip() for p in value.split(",")) if part]
        return value

    @model_validator(mode="after")
    def _grpc_needs_collectors(self) -> EventSinkSettings:
        if self.sink == "grpc" and not self.collectors:
            raise ValueError("sink grpc needs at least one address in collectors")
        return self

    @model_validator(mode="after")
    def _buffer_holds_two_batches(self) -> EventSinkSettings:
        if self.buffer_events < 2 * self.batch_max_events:
            raise ValueError(
                f"buffer_events ({self.buffer_events}) must be at least twice batch_max_events "
                f"({self.batch_max_events}): a smaller buffer fills before a batch is cut, and "
                "events are dropped while the spool still has room")
        return self

    @property
    def kind(self) -> Literal["grpc", "jsonl", "none"]:
        """The sink in effect: `auto` streams to collectors when any are configured."""
        if self.sink == "auto":
            return "grpc" if self.collectors else "jsonl"
        return self.sink


def _optional_address(value: Any) -> Any:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off", "none")):
        return None
    return _address(value)


# HOST:PORT, or null/"off" to disable.
OptionalAddress = Annotated[tuple[str, int] | None, NoDecode, BeforeValidator(_optional_address)]


class TelemetrySettings(_Section):
    """OpenTelemetry traces (the standard OTEL_* variables apply too and win)."""

    # OTLP/gRPC endpoint, e.g. http://127.0.0.1:4317; null: tracing off (unless
    # OTEL_EXPORTER_OTLP_ENDPOINT is set)
    otlp_endpoint: str | None = None
    # Fraction of new traces sampled (parent-based: a sampled parent is always followed)
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)


_SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class PolicySecretSettings(_Section):
    """Watch the operator's policy Secret through the Kubernetes API (sub-second updates)."""

    enabled: bool = False
    # The Secret's namespace; null: the pod's own (the service account's namespace file)
    namespace: str | None = Field(default=None, min_length=1, max_length=63,
                                  pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    # The Secret the operator writes, and its key holding the policy document
    name: str = Field(default="socks5-analytics-policy", min_length=1, max_length=253,
                      pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    key: str = Field(default="policy.yaml", min_length=1, max_length=253,
                     pattern=r"^[-._a-zA-Z0-9]+$")
    # https://HOST:PORT of the API server; null: KUBERNETES_SERVICE_HOST/PORT (in a pod)
    api_server: str | None = Field(default=None, pattern=r"^https?://")
    # The service account's token (re-read on every connection: it rotates) and CA bundle
    token_file: Path = _SERVICE_ACCOUNT / "token"
    ca_file: Path = _SERVICE_ACCOUNT / "ca.crt"


class ProxySettings(_Section):
    """A SOCKS5 proxy node."""

    listen: Address = ("127.0.0.1", 1080)
    # Prometheus /metrics of the node (all workers together); null: off
    metrics_listen: OptionalAddress = ("127.0.0.1", 9101)
    policy_file: Path | None = None
    # Seconds between checks of the policy file for changes (SIGHUP checks at once).
    policy_poll_interval: Seconds = 1.0
    policy_secret: PolicySecretSettings = PolicySecretSettings()
    workers: int = Field(default=1, ge=1, le=64)
    max_connections: int = Field(default=10_000, ge=1, le=1_000_000)
    handshake_timeout: Seconds = 10.0
    connect_timeout: Seconds = 10.0
    dns_timeout: Seconds = 5.0
    dns_cache_ttl: float = Field(default=30.0, ge=0, le=86_400)
    dns_cache_size: int = Field(default=4096, ge=0, le=1_000_000)
    idle_timeout: Seconds = 300.0
    half_close_timeout: Seconds = 30.0
    udp_idle_timeout: Seconds = 120.0
    bind_timeout: Seconds = 60.0
    shutdown_grace: float = Field(default=30.0, ge=0, le=3600)
    relay: Literal["auto", "splice", "copy"] = "auto"
    events: EventSinkSettings = EventSinkSettings()


_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def check_database_url(url: str) -> None:
    """Raise ValueError (never quoting the URL: it may hold a password) unless `url` is a
    PostgreSQL URL asyncpg can use: postgresql:// or postgres://, each host's port a number
    1-65535 (several hosts, comma-separated, are allowed), a known sslmode."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("postgresql", "postgres"):
        raise ValueError("expected a URL postgresql://user:password@host:port/dbname")
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    hosts = netloc.rpartition("@")[2]
    for host in hosts.split(",") if hosts else ():
        if host.startswith("["):
            address, bracket, after = host[1:].partition("]")
            if not bracket:
                raise ValueError(f"host {host!r}: an IPv6 address needs its closing ']'")
            try:
                ipaddress.IPv6Address(address)
            except ValueError:
                raise ValueError(f"host {host!r}: not an IPv6 address") from None
            if after and not after.startswith(":"):
                raise ValueError(f"host {host!r}: expected ':port' after ']'")
            port = after[1:]
        else:
            port = host.rpartition(":")[2] if ":" in host else ""
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"port {port!r} is not a number 1-65535")
    query = rest.partition("?")[2]
    for pair in query.split("&") if query else ():
        name, _, mode = pair.partition("=")
        if name == "sslmode" and mode not in _SSL_MODES:
            raise ValueError(f"sslmode {mode!r} is not one of {', '.join(_SSL_MODES)}")


class DatabaseSettings(_Section):
    """PostgreSQL: where it is, the connection pool, partitions and retention."""

    # postgresql://user:password@host:port/dbname; none: the embedded server (local runs)
    url: str | None = Field(default=None, min_length=1)
    pool_min_size: int = Field(default=1, ge=0, le=100)
    pool_max_size: int = Field(default=10, ge=1, le=1000)
    connect_timeout: Seconds = 10.0
    # server-side statement_timeout for every query the pool runs; 0 disables it
    statement_timeout: float = Field(default=30.0, ge=0, le=86_400)
    # whole UTC days of raw rows and rollups kept besides today; older partitions are dropped
    retention_days: int = Field(default=30, ge=1, le=36_500)
    partitions_ahead_days: int = Field(default=3, ge=1, le=366)
    maintenance_interval: Seconds = 3600.0
    # the embedded server's folder; none: the user's data directory
    embedded_data_dir: Path | None = None
    # PostgreSQL binaries for the embedded server; none: the pgserver wheel, then the system's
    embedded_bin_dir: Path | None = None

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_database_url(value)
        return value

    @model_validator(mode="after")
    def _pool_sizes(self) -> DatabaseSettings:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("pool_min_size must not exceed pool_max_size")
        return self


def _origins(value: Any) -> Any:
    # S5A_API__CORS_ORIGINS=https://a.example,https://b.example: a comma-separated text.
    if isinstance(value, str):
        return [origin.strip() for origin in value.split(",") if origin.strip()]
    return value


class ApiSettings(_Section):
    """The stats API and the dashboard (`socks5-analytics api`)."""

    listen: Address = ("127.0.0.1", 8080)
    # Bearer token every route but /healthz, /readyz and /metrics then requires; none: open
    token: SecretStr | None = Field(default=None, min_length=16)
    # Origins allowed to call the API from a browser (CORS); empty: CORS off
    cors_origins: Annotated[list[str], NoDecode, BeforeValidator(_origins)] = []
    # Largest request (headers and body) in bytes; the API only takes GET requests
    max_request_size: int = Field(default=65_536, ge=1_024, le=16 * 1_048_576)
    # Seconds to receive a whole request; seconds to answer one
    request_timeout: Seconds = 30.0
    response_timeout: Seconds = 60.0
    keep_alive_timeout: Seconds = 5.0
    # Most points one /stats/traffic answer may have
    max_points: int = Field(default=10_000, ge=10, le=1_000_000)


class CollectorSettings(_Section):
    """The gRPC collector: where it listens, how it batches, how it pushes back."""

    # gRPC listen address; loopback locally, 0.0.0.0:50051 in containers
    listen: Address = ("127.0.0.1", 50051)
    # Prometheus /metrics of the collector; null: off
    metrics_listen: OptionalAddress = ("127.0.0.1", 9102)
    # a database write is started at this many events, or `batch_max_delay` after the first
    batch_max_events: int = Field(default=5000, ge=1, le=1_000_000)
    batch_max_delay: Seconds = 0.2
    # events received but not yet committed, all streams together; a full queue stops reading
    queue_max_events: int = Field(default=50_000, ge=1, le=10_000_000)
    # batches of one stream received but not yet answered; more: the stream stops reading
    stream_max_pending: int = Field(default=16, ge=1, le=10_000)
    # concurrent database writes (transactions)
    workers: int = Field(default=2, ge=1, le=64)
    # the largest gRPC message accepted (bytes); larger: RESOURCE_EXHAUSTED
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    # the most events plus interim reports in one Batch; more: RESOURCE_EXHAUSTED. At most
    # 60,000: the Rejection of a batch whose every item is invalid (at least 64 bytes an item)
    # must fit in the 4 MiB that a node's channel takes.
    max_batch_items: int = Field(default=10_000, ge=1, le=60_000)
    # seconds a new stream has to send its Hello; later: DEADLINE_EXCEEDED
    hello_timeout: Seconds = 10.0
    # seconds between writes of the nodes' heartbeats (the latest per node) to proxy_nodes
    nodes_flush_interval: Seconds = 2.0
    # seconds between HTTP/2 pings on an idle connection, and to wait for their answer
    keepalive_time: Seconds = 30.0
    keepalive_timeout: Seconds = 10.0
    # retry of a write while the database is down: first and longest pause (seconds)
    retry_initial_backoff: Seconds = 0.1
    retry_max_backoff: Seconds = 5.0
    # an event stamped further ahead of the collector's clock (seconds) is rejected
    max_clock_skew: Seconds = 300.0
    # registered_domain also honours the PSL's private section (github.io, s3.amazonaws.com)
    psl_private_domains: bool = False
    # seconds SIGTERM gives queued batches to commit and be acked before streams are closed
    shutdown_grace: float = Field(default=10.0, ge=0, le=3600)
    # shared secret every proxy must present (authorization: Bearer ...); null: none required
    token: SecretStr | None = Field(default=None, min_length=16)
    tls: TlsServerSettings = TlsServerSettings()

    @model_validator(mode="after")
    def _backoff(self) -> CollectorSettings:
        if self.retry_initial_backoff > self.retry_max_backoff:
            raise ValueError("retry_initial_backoff must not exceed retry_max_backoff")
        return self


_K8S_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class OperatorSettings(_Section):
    """The Kubernetes operator (`socks5-analytics operator`)."""

    # Namespace watched and where the policy Secret is written; null: the pod's own
    namespace: str | None = Field(default=None, min_length=1, max_length=63, pattern=_K8S_NAME)
    # Watch ProxyUser/IPWhitelist in every namespace (the Secret stays in `namespace`)
    cluster_wide: bool = False
    # The Secret that carries the rendered policy, and its key (the proxies' policy file name)
    policy_secret: str = Field(default="socks5-analytics-policy", min_length=1,
                               max_length=253, pattern=_K8S_NAME)
    policy_key: str = Field(default="policy.yaml", min_length=1, max_length=253,
                            pattern=r"^[-._a-zA-Z0-9]+$")
    # YAML with the policy's `destinations` and `limits`; null: the proxies' defaults
    base_policy_file: Path | None = None
    # Seconds of quiet after a change before rendering, so a burst gives one write
    debounce: float = Field(default=0.5, ge=0, le=60)
    # The stats API, to count the nodes running each resource's policy; null: not counted
    api_url: str | None = Field(default=None, pattern=r"^https?://")
    api_token: SecretStr | None = Field(default=None, min_length=16)
    rollout_interval: Seconds = 5.0
    # Nodes without a heartbeat for this long are not counted
    node_stale_after: Seconds = 30.0
    # HOST:PORT of kopf's liveness endpoint, GET /healthz (the chart probes it); null: off
    health_listen: OptionalAddress = None


_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "s5a_config_file", default=None
)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML itself keeps the
    last one without a word, so a typo'd override would silently win or lose)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping says so below
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found the key {key!r} twice", key_node.start_mark)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _unique_mapping)


def load_yaml(text: str) -> Any:
    """YAML as yaml.safe_load reads it, but a key given twice in a mapping is an error."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects


class _YamlFileSource(PydanticBaseSettingsSource):
    """The `--config` YAML file, read once; its syntax errors name the line."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole mapping

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get()
        if path is None:
            return {}
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
        try:
            data = load_yaml(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        return data


class _MappingSections(PydanticBaseSettingsSource):
    """Another source, whose sections (`proxy:`, `S5A_PROXY=…`) must be mappings.

    Sources are merged key by key, so a section that is not a mapping (`proxy: 5`) would be
    dropped without a word whenever another source sets a key in it; this says so first.
    """

    def __init__(self, settings_cls: type[BaseSettings], inner: PydanticBaseSettingsSource,
                 origin: str) -> None:
        super().__init__(settings_cls)
        self.inner = inner
        self.origin = origin

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole mapping

    def __call__(self) -> dict[str, Any]:
        try:
            data = self.inner()
        except SettingsError as exc:
            # pydantic-settings names the field only in its message text.
            field = str(exc).split('"')[1] if str(exc).count('"') >= 2 else "a section"
            raise ConfigError(
                f"invalid configuration: {field}: {self.origin} S5A_{field.upper()} is not "
                f"a JSON object; set its keys one by one (S5A_{field.upper()}__KEY=value)"
            ) from exc
        for name, value in data.items():
            annotation = self.settings_cls.model_fields[name].annotation \
                if name in self.settings_cls.model_fields else None
            if (isinstance(annotation, type) and issubclass(annotation, BaseModel)
                    and not isinstance(value, dict)):
                shown = _without_password(value) if isinstance(value, str) else value
                raise ConfigError(
                    f"invalid configuration: {name}: expected a mapping of keys in "
                    f"{self.origin}, got {shown!r}")
        return data


class Settings(BaseSettings):
    """Every component's configuration; each reads its own section."""

    model_config = SettingsConfigDict(
        env_prefix="S5A_",
        env_nested_delimiter="__",
        env_file=".env",
        # A shared .env (docker compose reads it too) may hold other programs' variables.
        dotenv_filtering="match_prefix",
        extra="forbid",
        frozen=True,
    )

    node_id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128)
    log: LogSettings = LogSettings()
    proxy: ProxySettings = ProxySettings()
    database: DatabaseSettings = DatabaseSettings()
    collector: CollectorSettings = CollectorSettings()
    api: ApiSettings = ApiSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    operator: OperatorSettings = OperatorSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,
                _MappingSections(settings_cls, env_settings, "the environment"),
                _MappingSections(settings_cls, dotenv_settings, "the .env file"),
                _MappingSections(settings_cls, _YamlFileSource(settings_cls), "the config file"))


# A query parameter that carries a secret (libpq's `password`, `sslpassword`; a `token`).
_SECRET_PARAMETER = re.compile(r"(?i)([?&][a-z_]*(?:password|secret|token)=)[^&#]*")


def _without_password(text: str) -> str:
    """`text` with the password of a URL's user info (`user:***@host`) and the value of a
    secret query parameter (`password=***`) masked: errors get logged.

    A bad URL is what this is for, so nothing is assumed of it: the scheme may be missing
    and the password may hold an unescaped `@`. The user info ends at the last `@`; masking
    too much of a malformed URL is the safe mistake."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    userinfo, at, tail = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{tail}"
    return _SECRET_PARAMETER.sub(r"\1***", f"{scheme}{sep}{rest}")


def _annotation_at(loc: tuple[Any, ...]) -> Any:
    """The annotation of the settings field at `loc` (an error's location), or None."""
    model: Any = Settings
    annotation: Any = None
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not isinstance(part, str) or fields is None or part not in fields:
            return None
        annotation = fields[part].annotation
        model = annotation
    return annotation


def _is_secret(loc: tuple[Any, ...]) -> bool:
    """Whether the field at `loc` holds a secret (a `SecretStr`, alone or in a union)."""
    annotation = _annotation_at(loc)
    return annotation is SecretStr or SecretStr in get_args(annotation)


def _describe(error: Any) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    given = error.get("input")
    context = error.get("ctx") or {}
    if (error["type"] in ("too_short", "too_long") and isinstance(given, str)
            and "actual_length" in context):
        # pydantic counts a SecretStr's length in "items"; a string's are characters.
        least = error["type"] == "too_short"
        bound = context.get("min_length" if least else "max_length")
        plural = "" if bound == 1 else "s"
        message = (f"Value should have at {'least' if least else 'most'} {bound} "
                   f"character{plural}, not {context['actual_length']}")
    if _is_secret(error["loc"]):
        return f"{key}: {message}"  # never the value of a secret, whatever its type
    if isinstance(given, str) and ("@" in given or "=" in given):
        given = _without_password(given)
    if error["type"] != "extra_forbidden" and not isinstance(given, (dict, list)):
        return f"{key}: {message} (got {given!r})"
    return f"{key}: {message}"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from every source; raise `ConfigError` naming each bad key."""
    unknown = sorted(
        name for name in os.environ
        if name.upper().startswith("S5A_")
        and name[4:].split("__", 1)[0].lower() not in Settings.model_fields
    )
    if unknown:
        raise ConfigError(
            f"invalid configuration: {', '.join(unknown)}: unknown environment variable "
            f"(sections: {', '.join(Settings.model_fields)})"
        )
    token = _config_file.set(config_file)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(_describe(error) for error in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from exc
    finally:
        _config_file.reset(token)
