"""One typed configuration tree, loaded from zot's JSON layout and validated once.

The file layout is zot's (``distSpecVersion``, ``storage.rootDirectory``, ``http.address``,
``http.port``, ``log.level``, ``extensions``) so an operator's zot config reads naturally here.
Keys are camelCase in the file and snake_case in Python; the loader maps one to the other.

Validation is strict on purpose: an unknown key or a wrong type raises :class:`ConfigError`
naming the full key path (``extensions.events.sinks[1].timeout``), because a typo that is
silently ignored in a registry config is how events end up going nowhere.

One module, though long: the tree reads top to bottom as the file does, and the loader that
maps JSON onto it is a few functions that every section shares.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import ssl
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "Config",
    "ConfigError",
    "Duration",
    "HTTPConfig",
    "HTTPTLSConfig",
    "HistoryConfig",
    "LogConfig",
    "StorageConfig",
    "UploadPurgingConfig",
    "load_config",
    "parse_config",
    "parse_duration",
]


class ConfigError(ValueError):
    """A configuration problem; the message always names the offending key path."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path or '<root>'}: {reason}")
        self.path = path
        self.reason = reason


class Duration(float):
    """Seconds, written in the file as a Go-style duration string (``"500ms"``, ``"1m30s"``)."""


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(text: str) -> Duration:
    """Parse a Go ``time.ParseDuration`` string into seconds; ``"0"`` is allowed as in Go."""
    if text == "0":
        return Duration(0.0)
    pos, total = 0, 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r} (expected e.g. '500ms', '1s', '5m')")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not text:
        raise ValueError("empty duration")
    return Duration(total)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


@dataclasses.dataclass(frozen=True)
class UploadPurgingConfig:
    """Removal of abandoned upload sessions (distribution's ``uploadpurging``, same defaults).

    A session goes once nothing was written to it for ``age``: idle, not merely old, so a
    slow upload that keeps sending is never cut off.
    """

    enable: bool = True
    age: Duration = Duration(7 * 86400.0)
    interval: Duration = Duration(86400.0)

    def __post_init__(self) -> None:
        if self.age <= 0:
            raise ConfigError("age", "must be greater than zero")
        if self.interval <= 0:
            raise ConfigError("interval", "must be greater than zero")


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    root_directory: str = "registry_data"
    # Periodic garbage collection (zot's keys): untagged manifests and unreferenced blobs
    # older than gcDelay are removed every gcInterval.
    gc: bool = False
    gc_interval: Duration = Duration(3600.0)
    gc_delay: Duration = Duration(3600.0)
    upload_purging: UploadPurgingConfig = dataclasses.field(default_factory=UploadPurgingConfig)

    def __post_init__(self) -> None:
        if self.gc_interval <= 0:
            raise ConfigError("gcInterval", "must be greater than zero")


ACCESS_ACTIONS = ("read", "create", "update", "delete")
# http.workers above this is a typo, not a machine: each worker is a Python process.
MAX_WORKERS = 256


def _check_actions(actions: tuple[str, ...], key: str) -> None:
    for i, action in enumerate(actions):
        if action not in ACCESS_ACTIONS:
            raise ConfigError(f"{key}[{i}]", f"unknown action {action!r}; use {ACCESS_ACTIONS}")


@dataclasses.dataclass(frozen=True)
class HtpasswdConfig:
    path: str

    def __post_init__(self) -> None:
        if not os.access(self.path, os.R_OK):
            raise ConfigError("path", f"cannot read htpasswd file {self.path}")


@dataclasses.dataclass(frozen=True)
class BearerConfig:
    """Token authentication as distribution and zot accept it (JWTs from a token service)."""

    realm: str
    service: str
    # PEM certificate or public key of the token service's signing key.
    cert: str
    # When set, a token's ``iss`` must equal it.
    issuer: str | None = None

    def __post_init__(self) -> None:
        if not os.access(self.cert, os.R_OK):
            raise ConfigError("cert", f"cannot read {self.cert}")


@dataclasses.dataclass(frozen=True)
class FailedLoginsConfig:
    """How many failed basic logins a client may make within ``window``; then it gets 429."""

    limit: int = 10
    window: Duration = Duration(60.0)

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= 1_000_000:
            raise ConfigError("limit", "must be between 1 and 1000000")
        if self.window <= 0:
            raise ConfigError("window", "must be greater than zero")


@dataclasses.dataclass(frozen=True)
class AuthConfig:
    htpasswd: HtpasswdConfig | None = None
    bearer: BearerConfig | None = None
    failed_logins: FailedLoginsConfig = dataclasses.field(default_factory=FailedLoginsConfig)


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    actions: tuple[str, ...]
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_actions(self.actions, "actions")


@dataclasses.dataclass(frozen=True)
class RepositoryPolicyConfig:
    policies: tuple[PolicyConfig, ...] = ()
    # Actions for any authenticated user; anonymousPolicy for requests without credentials.
    default_policy: tuple[str, ...] = ()
    anonymous_policy: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_actions(self.default_policy, "defaultPolicy")
        _check_actions(self.anonymous_policy, "anonymousPolicy")


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    users: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AccessControlConfig:
    repositories: dict[str, RepositoryPolicyConfig] = dataclasses.field(default_factory=dict)
    admin_policy: PolicyConfig | None = None
    groups: dict[str, GroupConfig] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class HTTPTLSConfig:
    """HTTPS, with zot's keys; the files are read and checked at start (registry_trio.tls)."""

    # PEM: the server's certificate (then its chain), and its unencrypted private key.
    cert: str
    key: str
    # PEM CA certificate(s): when set, every client must present a certificate one of them
    # signed (mutual TLS), and the certificate's name is the actor of its requests.
    cacert: str | None = None


@dataclasses.dataclass(frozen=True)
class HTTPConfig:
    address: str = "127.0.0.1"
    # zot writes the port as a string; both spellings are accepted.
    port: int | str = 5000
    # Upper bound of a manifest body; OCI asks registries to accept at least 4 MiB.
    max_manifest_size: int = 4 * 1024 * 1024
    # How long SIGTERM waits for in-flight requests before closing connections.
    graceful_timeout: Duration = Duration(10.0)
    # Worker processes serving the one listening socket: one per CPU this process may run
    # on. 1 serves from this process alone, with no supervisor.
    workers: int = dataclasses.field(default_factory=lambda: len(os.sched_getaffinity(0)))
    # A request body is given up (408, connection closed) when nothing of it arrives for
    # bodyIdleTimeout, or when it averages under bodyMinRate bytes/s (0: no minimum) once
    # past a first bodyIdleTimeout: a stalled or trickling client cannot hold a connection.
    body_idle_timeout: Duration = Duration(30.0)
    body_min_rate: int = 1024
    # Announced to upload sessions as OCI-Chunk-Min-Length (0: not announced). Advice to
    # clients on their PATCH size, not enforced: the spec puts the duty on the client.
    chunk_min_length: int = 0
    auth: AuthConfig | None = None
    access_control: AccessControlConfig | None = None
    # Peers (CIDRs) whose X-Forwarded-For / Forwarded headers are believed.
    trusted_proxies: tuple[str, ...] = ()
    tls: HTTPTLSConfig | None = None

    def __post_init__(self) -> None:
        try:
            port = int(self.port)
        except ValueError:
            raise ConfigError("port", f"not a port number: {self.port!r}") from None
        if not 0 <= port <= 65535:
            raise ConfigError("port", f"{port} is outside 0-65535")
        object.__setattr__(self, "port", port)
        for i, cidr in enumerate(self.trusted_proxies):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(f"trustedProxies[{i}]", f"not a CIDR: {cidr!r}") from None
        if self.max_manifest_size < 4 * 1024 * 1024:
            raise ConfigError("maxManifestSize", "must be at least 4 MiB (4194304)")
        if self.body_idle_timeout <= 0:
            raise ConfigError("bodyIdleTimeout", "must be greater than zero")
        if self.body_min_rate < 0:
            raise ConfigError("bodyMinRate", "must be 0 (no minimum) or more bytes per second")
        if self.chunk_min_length < 0:
            raise ConfigError("chunkMinLength", "must be 0 (not announced) or more bytes")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError("workers", f"must be from 1 to {MAX_WORKERS}")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    output: str | None = None
    # "text" (readable lines) or "json" (one JSON object per line).
    format: str = "text"

    LEVELS: ClassVar[tuple[str, ...]] = ("debug", "info", "warn", "warning", "error")

    def __post_init__(self) -> None:
        if self.level.lower() not in self.LEVELS:
            raise ConfigError("level", f"unknown level {self.level!r}; use one of {self.LEVELS}")
        if self.format not in ("text", "json"):
            raise ConfigError("format", f"unknown format {self.format!r}; use 'text' or 'json'")


@dataclasses.dataclass(frozen=True)
class RetryConfig:
    """Exponential backoff with full jitter; the budget ends in the dead-letter store."""

    initial_backoff: Duration = Duration(0.5)
    max_backoff: Duration = Duration(60.0)
    # 0 means no limit on attempts; maxAge still bounds how long an event is retried.
    max_attempts: int = 0
    max_age: Duration = Duration(86400.0)

    def __post_init__(self) -> None:
        if self.initial_backoff <= 0:
            raise ConfigError("initialBackoff", "must be greater than zero")
        if self.max_backoff < self.initial_backoff:
            raise ConfigError("maxBackoff", "must be at least initialBackoff")
        if self.max_attempts < 0:
            raise ConfigError("maxAttempts", "must be 0 (unlimited) or more")


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """Several events per request, for formats that carry many."""

    max_events: int = 100
    # How long to wait for a batch to fill once the first event is there; 0 sends at once.
    max_wait: Duration = Duration(0.0)

    def __post_init__(self) -> None:
        if not 1 <= self.max_events <= 10000:
            raise ConfigError("maxEvents", "must be between 1 and 10000")


@dataclasses.dataclass(frozen=True)
class CredentialsConfig:
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    token: str | None = dataclasses.field(default=None, repr=False)
    # NATS only: a .creds file (JWT + nkey seed) or an nkey seed file.
    creds_file: str | None = None
    nkey_file: str | None = None

    def __post_init__(self) -> None:
        if (self.username is None) != (self.password is None):
            raise ConfigError(
                "password" if self.password is None else "username",
                "username and password go together",
            )


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure_skip_verify: bool = False
    # NATS only: TLS before the server's INFO, for a server configured with `handshake_first`.
    handshake_first: bool = False

    def __post_init__(self) -> None:
        for key, value in (
            ("caFile", self.ca_file),
            ("certFile", self.cert_file),
            ("keyFile", self.key_file),
        ):
            if value is not None and not os.access(value, os.R_OK):
                raise ConfigError(key, f"cannot read {value}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError(
                "keyFile" if self.key_file is None else "certFile",
                "certFile and keyFile go together",
            )

    def ssl_context(self) -> ssl.SSLContext:
        """The client-side context these settings describe (for HTTP and NATS alike).

        ``insecureSkipVerify`` only stops checking the server: a client certificate is
        still presented when one is configured.
        """
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.cert_file and self.key_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


@dataclasses.dataclass(frozen=True)
class HMACConfig:
    secret: str = dataclasses.field(repr=False)
    header: str = "X-Registry-Signature"

    def __post_init__(self) -> None:
        if not self.secret:
            raise ConfigError("secret", "must not be empty")


# The values of registry_trio.events.model.Action, spelled out because config imports nothing
# of the registry (events import config); tests/test_structure.py keeps the two equal.
EVENT_ACTIONS = frozenset(
    {
        "manifest.pushed",
        "manifest.deleted",
        "tag.deleted",
        "repository.created",
        "blob.pushed",
        "blob.mounted",
        "blob.deleted",
        "manifest.pulled",
        "blob.pulled",
    }
)


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """Which events a sink receives (distribution's ``ignore`` semantics, inverted where
    an include list reads better). Pull actions reach a sink only when listed here."""

    actions: tuple[str, ...] | None = None
    repositories: tuple[str, ...] | None = None
    ignore_media_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for i, action in enumerate(self.actions or ()):
            if action not in EVENT_ACTIONS:
                raise ConfigError(
                    f"actions[{i}]", f"unknown action {action!r}; use {sorted(EVENT_ACTIONS)}"
                )


def redact_address(address: str) -> str:
    """An address fit to show: any ``user:password@`` in it is dropped."""
    parts = urlsplit(address)
    if parts.username is None and parts.password is None:
        return address
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


SINK_FORMATS = ("cloudevents", "cloudevents-binary", "cloudevents-batch", "distribution")


@dataclasses.dataclass(frozen=True)
class SinkConfig:
    type: str
    address: str
    # Empty: derived from the address (see __post_init__).
    name: str = ""
    timeout: Duration = Duration(5.0)
    format: str = "cloudevents"
    credentials: CredentialsConfig | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    tls: TLSConfig | None = None
    hmac: HMACConfig | None = None
    retry: RetryConfig = dataclasses.field(default_factory=RetryConfig)
    batch: BatchConfig = dataclasses.field(default_factory=BatchConfig)
    # Above 1, events are delivered in parallel and out of order.
    concurrency: int = 1
    filter: FilterConfig = dataclasses.field(default_factory=FilterConfig)

    # NATS only: the subject to publish on, and "core" (publish + flush) or "jetstream"
    # (publish with acknowledgement, Nats-Msg-Id = event id so the stream drops duplicates).
    channel: str | None = None
    mode: str | None = None

    def __post_init__(self) -> None:
        if self.type == "http":
            if not self.address.startswith(("http://", "https://")):
                raise ConfigError(
                    "address", f"an http sink needs an http(s):// URL, not {self.address!r}"
                )
            for key, value in (("channel", self.channel), ("mode", self.mode)):
                if value is not None:
                    raise ConfigError(key, "only nats sinks take this key")
            if self.tls is not None and self.tls.handshake_first:
                raise ConfigError(
                    "tls.handshakeFirst", "only NATS sinks and the JetStream queue take this key"
                )
        elif self.type == "nats":
            if not self.address.startswith(("nats://", "tls://")):
                raise ConfigError(
                    "address", f"a nats sink needs a nats:// or tls:// URL, not {self.address!r}"
                )
            if not self.channel:
                raise ConfigError("channel", "a nats sink needs the subject to publish on")
            if self.mode is None:
                object.__setattr__(self, "mode", "core")
            if self.mode not in ("core", "jetstream"):
                raise ConfigError("mode", f"unknown mode {self.mode!r}; use 'core' or 'jetstream'")
            if self.format != "cloudevents":
                raise ConfigError(
                    "format", "nats sinks publish structured CloudEvents JSON, as zot does"
                )
        else:
            raise ConfigError("type", f"unknown sink type {self.type!r}; use 'http' or 'nats'")
        if self.format not in SINK_FORMATS:
            raise ConfigError(
                "format", f"unknown format {self.format!r}; use one of {SINK_FORMATS}"
            )
        if self.timeout <= 0:
            raise ConfigError("timeout", "must be greater than zero")
        if not 1 <= self.concurrency <= 64:
            raise ConfigError("concurrency", "must be between 1 and 64")
        if not self.name:
            # The address (and subject) is what stays stable when sinks are reordered; the
            # name shows in logs, metrics and the admin API, so never with a password in it.
            address = redact_address(self.address)
            name = address if self.channel is None else f"{address}#{self.channel}"
            object.__setattr__(self, "name", name)

    @property
    def batches(self) -> bool:
        """Whether this sink's format carries several events per request."""
        return self.format in ("cloudevents-batch", "distribution")

    @property
    def events_per_message(self) -> int:
        """The most events one request (or NATS message) carries."""
        return self.batch.max_events if self.batches else 1

    @property
    def ordered(self) -> bool:
        """Whether events go out in enqueue order (one delivery loop)."""
        return self.concurrency == 1


_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclasses.dataclass(frozen=True)
class QueueConfig:
    """Where events wait for delivery: the embedded SQLite outbox, or a JetStream stream."""

    type: str = "sqlite"
    # sqlite: the outbox file's directory. jetstream: where this instance keeps its id.
    directory: str = "queue_data"
    # JetStream only: the server, the stream (created when missing) and how to reach it.
    address: str | None = None
    stream: str = "REGISTRY_EVENTS"
    credentials: CredentialsConfig | None = None
    tls: TLSConfig | None = None
    timeout: Duration = Duration(5.0)
    # Stream settings: a stream is created with them, an existing one brought in line at
    # start (see docs/scaling.md on durability).
    replicas: int = 1
    duplicate_window: Duration = Duration(120.0)
    # How long a delivery may go unacknowledged before JetStream hands it to another
    # instance: the time to notice an instance that died.
    ack_wait: Duration = Duration(30.0)

    def __post_init__(self) -> None:
        if self.type == "sqlite":
            for key, value in (
                ("address", self.address),
                ("credentials", self.credentials),
                ("tls", self.tls),
            ):
                if value is not None:
                    raise ConfigError(key, "only a jetstream queue takes this key")
            return
        if self.type != "jetstream":
            raise ConfigError(
                "type", f"unknown queue type {self.type!r}; use 'sqlite' or 'jetstream'"
            )
        if not self.address or not self.address.startswith(("nats://", "tls://")):
            raise ConfigError(
                "address", f"a jetstream queue needs a nats:// or tls:// URL, not {self.address!r}"
            )
        if not _STREAM_NAME.fullmatch(self.stream):
            raise ConfigError("stream", "use letters, digits, '-' and '_' (at most 64)")
        if not 1 <= self.replicas <= 5:
            raise ConfigError("replicas", "must be between 1 and 5")
        for key, seconds in (
            ("timeout", self.timeout),
            ("duplicateWindow", self.duplicate_window),
            ("ackWait", self.ack_wait),
        ):
            if seconds <= 0:
                raise ConfigError(key, "must be greater than zero")


# The delivery history's default row budget: a row costs ~0.2 KB plus, while it is kept, the
# event it names (~0.5-1.5 KB of JSON, shared by that event's rows), so 200,000 rows stay
# within a few hundred MB of disk, and a page filtered on what no index covers examines a
# bounded share of them.
HISTORY_MAX_ROWS = 200_000


@dataclasses.dataclass(frozen=True)
class HistoryConfig:
    """What the queue remembers of each event's path: every delivery attempt, dead letter and
    replay, for ``maxAge`` and at most ``maxRows`` records (the oldest go first)."""

    enable: bool = True
    max_age: Duration = Duration(7 * 24 * 3600.0)
    max_rows: int = HISTORY_MAX_ROWS

    def __post_init__(self) -> None:
        if self.max_age < 1:
            raise ConfigError("maxAge", "must be at least 1s")
        if not 1 <= self.max_rows <= 1_000_000_000:
            raise ConfigError("maxRows", "must be between 1 and 1000000000")


@dataclasses.dataclass(frozen=True)
class EventsConfig:
    enable: bool = False
    sinks: tuple[SinkConfig, ...] = ()
    queue: QueueConfig = dataclasses.field(default_factory=QueueConfig)
    history: HistoryConfig = dataclasses.field(default_factory=HistoryConfig)
    # CloudEvents types are "<prefix>.image.updated" etc.; zot's prefix by default.
    type_prefix: str = "zotregistry"
    # On SIGTERM, how long in-flight deliveries may take before they are left queued.
    shutdown_timeout: Duration = Duration(5.0)

    def __post_init__(self) -> None:
        seen: dict[str, int] = {}
        for i, sink in enumerate(self.sinks):
            if sink.name in seen:
                raise ConfigError(
                    f"sinks[{i}].name",
                    f"duplicate sink name {sink.name!r} (also sinks[{seen[sink.name]}])",
                )
            seen[sink.name] = i


@dataclasses.dataclass(frozen=True)
class ExtensionsConfig:
    events: EventsConfig = dataclasses.field(default_factory=EventsConfig)


@dataclasses.dataclass(frozen=True)
class Config:
    dist_spec_version: str = "1.1.1"
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)
    http: HTTPConfig = dataclasses.field(default_factory=HTTPConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    extensions: ExtensionsConfig = dataclasses.field(default_factory=ExtensionsConfig)


class _Dataclass(Protocol):
    """Any dataclass, as ``dataclasses.fields`` takes it (typeshed's own is for checkers only)."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


_D = TypeVar("_D", bound=_Dataclass)


def _convert(value: Any, annotation: Any, path: str) -> Any:
    """Convert one JSON value to ``annotation``, raising ConfigError that names ``path``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if annotation is Duration:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a duration string like '1s', got {value!r}")
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise ConfigError(path, str(exc)) from None
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return _build(annotation, value, path)
    if origin is tuple:
        # Only ``tuple[T, ...]``: a JSON list, kept immutable like the frozen config around it.
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {type(value).__name__}")
        item_type, _ = typing.get_args(annotation)
        return tuple(_convert(item, item_type, f"{path}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected an object, got {type(value).__name__}")
        _, value_type = typing.get_args(annotation)
        return {k: _convert(v, value_type, f"{path}.{k}") for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} at {path}")


def _build(cls: type[_D], data: Any, path: str) -> _D:
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {_camel(f.name): f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        field = fields.get(key)
        child = f"{path}.{key}" if path else key
        if field is None:
            known = ", ".join(sorted(fields)) or "none"
            raise ConfigError(child, f"unknown key (known keys here: {known})")
        kwargs[field.name] = _convert(value, hints[field.name], child)
    for key, field in fields.items():
        required = (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )
        if required and field.name not in kwargs:
            raise ConfigError(f"{path}.{key}" if path else key, "required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # __post_init__ checks name their key relative to their own object.
        raise ConfigError(f"{path}.{exc.path}" if path else exc.path, exc.reason) from None


def parse_config(data: Any) -> Config:
    """Build a validated :class:`Config` from already-decoded JSON."""
    return _build(Config, data, "")


def load_config(path: str | Path | None) -> Config:
    """Load the config file at ``path``, or the embedded defaults when ``path`` is None.

    The embedded default is the SPEC's: 127.0.0.1:5000, storage in ``registry_data/`` and the
    event queue in ``queue_data/`` (events on, no sinks until a config adds some), no auth.
    A config file states what it wants: without ``extensions.events`` events are off, as in zot.
    """
    if path is None:
        return parse_config({"extensions": {"events": {"enable": True}}})
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("", f"{path} is not valid JSON: {exc}") from None
    return parse_config(data)
