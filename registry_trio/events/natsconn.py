"""How to reach a NATS server: one place for the options a sink and the queue both need.

A NATS sink and a JetStream queue are configured alike (``address``, ``credentials``,
``tls``, ``timeout``); this turns such a config into nats-py's ``connect`` options and lists
the secrets that must never appear in an error text or a log line (see ``failures``).
"""

from __future__ import annotations

import ssl
from typing import Any, Protocol

from ..config import CredentialsConfig, TLSConfig

__all__ = ["NATSEndpoint", "connect_options"]


class NATSEndpoint(Protocol):
    @property
    def address(self) -> str | None: ...
    @property
    def credentials(self) -> CredentialsConfig | None: ...
    @property
    def tls(self) -> TLSConfig | None: ...
    @property
    def timeout(self) -> float: ...


def _tls_context(config: NATSEndpoint) -> ssl.SSLContext | None:
    if config.tls is not None:
        return config.tls.ssl_context()
    if (config.address or "").startswith("tls://"):
        return ssl.create_default_context()
    return None


def connect_options(config: NATSEndpoint, name: str) -> dict[str, Any]:
    """nats-py ``connect`` keyword arguments: reconnect forever, with credentials and TLS."""
    options: dict[str, Any] = {
        "servers": [config.address],
        "name": name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,  # forever: the connection outlives any outage
        "connect_timeout": float(config.timeout),
    }
    tls = _tls_context(config)
    if tls is not None:
        options["tls"] = tls
    creds = config.credentials
    if creds is not None:
        if creds.username is not None:
            options["user"] = creds.username
            options["password"] = creds.password or ""
        if creds.token:
            options["token"] = creds.token
        if creds.creds_file:
            options["user_credentials"] = creds.creds_file
        if creds.nkey_file:
            options["nkeys_seed"] = creds.nkey_file
    return options
