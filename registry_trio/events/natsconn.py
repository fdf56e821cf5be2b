"""How to reach a NATS server: one place for the options a sink and the queue both need.

A NATS sink and a JetStream queue are configured alike (``address``, ``credentials``,
``tls``, ``timeout``); this turns such a config into nats-py's client and ``connect`` options.

TLS is configured by a ``tls://`` address or a ``tls`` block (even an empty one). Then the
connection is TLS or nothing: nats-py upgrades only when the server's INFO says
``tls_required``, and would otherwise send CONNECT (credentials included) and then the events
in plain text to any server, or man in the middle, that leaves it out. :func:`new_client`
gives a client that refuses instead (:class:`PlainTextRefusedError`), as the Go client does.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any, Protocol

import nats.errors
from nats.aio.client import Client
from nats.aio.transport import TcpTransport

from ..config import CredentialsConfig, TLSConfig

__all__ = ["NATSEndpoint", "PlainTextRefusedError", "connect_options", "new_client"]

log = logging.getLogger("registry_trio.events.natsconn")


class NATSEndpoint(Protocol):
    @property
    def address(self) -> str | None: ...
    @property
    def credentials(self) -> CredentialsConfig | None: ...
    @property
    def tls(self) -> TLSConfig | None: ...
    @property
    def timeout(self) -> float: ...


class PlainTextRefusedError(nats.errors.Error):
    """TLS is configured but the server did not require it, so nothing was sent.

    A ``nats.errors.Error``: nats-py reports it to ``error_cb`` and tries again later (the
    server may come back with TLS), as after any failed connection attempt. Another exception
    type would escape its connect loop and end its reconnection task.
    """


class _TLSOnlyClient(Client):
    """A nats-py client that sends nothing on a connection that is not TLS.

    nats-py (2.16) has no public option for this: ``tls`` and ``tls://`` only say how to
    upgrade *if* the server asks. Nor a public hook between reading INFO and writing CONNECT,
    so this overrides the private ``_connect_command``: nats-py builds CONNECT with it on every
    connection and reconnection, after any TLS upgrade and before the first byte is written.
    tests/test_nats_tls_downgrade.py fails if a nats-py release stops calling it there.
    """

    # One warning per run of refusals, not one per attempt (nats-py retries every 0.5-2 s).
    _refusal_logged = False

    def _connect_command(self) -> bytes:
        transport = self._transport
        assert isinstance(transport, TcpTransport), "config allows only nats:// and tls://"
        writer = transport._io_writer  # private too: the asyncio stream, replaced on upgrade
        assert writer is not None
        if writer.get_extra_info("ssl_object") is None:
            host, port = writer.get_extra_info("peername")[:2]
            refusal = PlainTextRefusedError(
                f"server at {host}:{port} does not require TLS; "
                "refusing to send credentials or events in plain text"
            )
            if not self._refusal_logged:
                self._refusal_logged = True
                log.warning("NATS %s", refusal)
            raise refusal
        self._refusal_logged = False
        return super()._connect_command()


def _wants_tls(config: NATSEndpoint) -> bool:
    return config.tls is not None or (config.address or "").startswith("tls://")


def new_client(config: NATSEndpoint) -> Client:
    """An unconnected nats-py client; with TLS configured, one that never talks plain text."""
    return _TLSOnlyClient() if _wants_tls(config) else Client()


def _tls_context(config: NATSEndpoint) -> ssl.SSLContext | None:
    if config.tls is not None:
        return config.tls.ssl_context()
    if _wants_tls(config):
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
    if config.tls is not None and config.tls.handshake_first:
        # TLS before the server's INFO: for a server with `handshake_first` (nats-server 2.10.4+).
        options["tls_handshake_first"] = True
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
