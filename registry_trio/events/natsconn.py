"""How to reach a NATS server: one place for the options a sink and the queue both need.

A NATS sink and a JetStream queue are configured alike (``address``, ``credentials``,
``tls``, ``timeout``); this turns such a config into nats-py's ``connect`` options and lists
the secrets that must never appear in an error text or a log line.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import nats.errors

from ..config import CredentialsConfig, TLSConfig

__all__ = ["NATSEndpoint", "connect_options", "describe_failure", "secrets"]


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
    tls = config.tls
    if tls is None:
        if (config.address or "").startswith("tls://"):
            return ssl.create_default_context()
        return None
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file and tls.key_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def secrets(config: NATSEndpoint) -> list[str]:
    """Everything that must never appear in an error text or a log line."""
    out = []
    if config.credentials is not None:
        out += [config.credentials.password or "", config.credentials.token or ""]
    parts = urlsplit(config.address or "")
    out += [parts.password or "", parts.username or ""]
    return [s for s in out if s]


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


def describe_failure(exc: BaseException, hidden: Sequence[str]) -> str:
    """A NATS failure in words, with every string in ``hidden`` blanked out."""
    if isinstance(exc, asyncio.TimeoutError | nats.errors.TimeoutError):
        text = f"timed out ({type(exc).__name__})"
    else:
        detail = str(exc).strip()
        text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    for secret in hidden:
        text = text.replace(secret, "***")
    return text
