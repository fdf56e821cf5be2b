"""NATS with TLS configured never talks plain text, whatever the server (or a man in the
middle) says in its INFO.

nats-py upgrades a connection to TLS only when the server's INFO asks for it; a server, or an
attacker on the path, that leaves ``tls_required`` out would otherwise receive CONNECT with
the credentials in plain text, then the events. :class:`PlainNATS` is such a server: it
speaks just enough of the protocol to accept a plain-text client (INFO without TLS, a PONG
for every PING) and records every byte it receives, so a client that fell for it would
deliver to it. With TLS configured, a sink or the JetStream queue must send it nothing.
"""

from __future__ import annotations

import json
import logging

import pytest
import trio

from bench.registry_client import make_image
from registry_trio.config import ConfigError
from registry_trio.events.queue import QueueError, running_queue
from registry_trio.events.sinks import DELIVERED, Message, Result
from registry_trio.events.sinks.nats import NATSSink
from tests.conftest import events_config, make_config, start_registry
from tests.nats_server import nats_server
from tests.tcp_proxy import tcp_proxy
from tests.test_nats import nats_sink, push_all, sink_config, sink_statuses, tls_server_config
from tests.tls_certs import make_tls_files
from tests.waiting import eventually

PASSWORD = "plain-pw-31"
TOKEN = "plain-tok-47"
ADDRESS_PASSWORD = "plain-addr-59"
SECRETS = (PASSWORD, TOKEN, ADDRESS_PASSWORD)
REFUSAL = "does not require TLS; refusing to send credentials or events in plain text"
# The first byte of a TLS record carrying a handshake message (here: the ClientHello).
TLS_HANDSHAKE = 0x16


class PlainNATS:
    """A NATS server without TLS that records what each connection sends; see the module doc."""

    def __init__(self) -> None:
        self.port = 0
        self.connections: list[bytearray] = []  # every byte received, one entry per connection

    @property
    def received(self) -> bytes:
        return b"".join(self.connections)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        received = bytearray()
        self.connections.append(received)
        info = {
            "server_id": "PLAIN",
            "version": "2.15.1",
            "proto": 1,
            "host": "127.0.0.1",
            "port": self.port,
            "headers": True,
            "max_payload": 1 << 20,
            "auth_required": True,
        }
        async with stream:
            try:
                await stream.send_all(b"INFO " + json.dumps(info).encode() + b"\r\n")
                partial = b""
                async for chunk in stream:
                    received += chunk
                    # Every PING is answered (CONNECT's and each flush's), so a client that
                    # accepts plain text connects and delivers.
                    *lines, partial = (partial + chunk).split(b"\r\n")
                    if pongs := lines.count(b"PING"):
                        await stream.send_all(b"PONG\r\n" * pongs)
            except trio.BrokenResourceError:
                pass  # the client hung up, as a refusing one does


async def plain_nats(nursery: trio.Nursery) -> PlainNATS:
    server = PlainNATS()
    await nursery.start(server.serve)
    return server


async def test_nats_sinks_with_tls_send_nothing_to_a_server_without_it(nursery, tmp_path):
    tls = make_tls_files(tmp_path / "tls", client=True)
    ca = {"caFile": str(tls.ca)}
    user = {"credentials": {"username": "registry", "password": PASSWORD}}
    token = {"credentials": {"token": TOKEN}}
    cert, key = str(tls.client_cert), str(tls.client_key)
    # name: (address, the tls block, credentials) -- every way of asking for TLS.
    refusing: dict[str, tuple[str, dict[str, object] | None, dict[str, object]]] = {
        "tls-scheme": ("tls://{host}", None, user),
        "ca-file": ("nats://{host}", ca, token),
        "skip-verify": (  # the credentials in the address
            f"nats://registry:{ADDRESS_PASSWORD}@{{host}}",
            {"insecureSkipVerify": True},
            {},
        ),
        "client-cert": ("nats://{host}", {**ca, "certFile": cert, "keyFile": key}, {}),
        "empty-tls-block": ("nats://{host}", {}, token),
        "handshake-first": ("tls://{host}", {**ca, "handshakeFirst": True}, token),
    }
    servers = {name: await plain_nats(nursery) for name in [*refusing, "no-tls"]}
    sinks = []
    for name, (address, sink_tls, credentials) in refusing.items():
        address = address.format(host=f"127.0.0.1:{servers[name].port}")
        extra = {"tls": sink_tls} if sink_tls is not None else {}
        sinks.append(nats_sink(address, name=name, timeout="500ms", **extra, **credentials))
    # The control: without TLS configured, plain text is what was asked for, and the fake
    # server takes the events (as it would have from every sink above before the fix).
    sinks.append(nats_sink(f"nats://127.0.0.1:{servers['no-tls'].port}", name="no-tls", **user))

    async with trio.open_nursery() as serving:
        registry = await start_registry(serving, events_config(tmp_path, *sinks))
        await push_all(registry, [("downgrade/app", "v1", make_image((1024,)))])
        statuses = await eventually(
            lambda: sink_statuses(registry),
            # Settled: each sink has delivered the push's 4 events or failed at least once.
            lambda s: all(
                status["delivered"] == 4 or status["failedAttempts"] >= 1 for status in s.values()
            ),
        )
        registry.shutdown.set()  # gracefully: see test_nats's TLS tests

    assert PASSWORD.encode() in servers["no-tls"].received  # the fake server is believable
    for name in refusing:
        status, server = statuses[name], servers[name]
        assert (status["delivered"], status["pending"], status["dead"]) == (0, 4, 0), status
        assert status["lastError"].startswith("cannot reach NATS: "), status
        assert server.connections, name
        if name == "handshake-first":
            # TLS from the first byte: a ClientHello, which the plain server cannot answer.
            assert all(data[0] == TLS_HANDSHAKE for data in server.connections if data), name
            assert not [s for s in SECRETS if s.encode() in server.received], name
        else:
            assert server.received == b"", (name, bytes(server.received[:200]))
            assert f"server at 127.0.0.1:{server.port} {REFUSAL}" in status["lastError"], status


async def test_sink_refuses_plain_text_on_reconnection(tmp_path):
    """A man in the middle who takes over after the sink connected over TLS gets nothing."""
    tls = make_tls_files(tmp_path / "tls")
    server_config = tls_server_config(tls) + f'authorization {{ token: "{TOKEN}" }}\n'
    message = Message({}, b"{}", "evt-1")
    async with (
        nats_server(tmp_path / "nats", server_config) as server,
        tcp_proxy(server.port) as proxy,
        trio.open_nursery() as nursery,
    ):
        impostor = await plain_nats(nursery)
        config = sink_config(
            tmp_path, proxy.url, tls={"caFile": str(tls.ca)}, credentials={"token": TOKEN}
        )
        sink = NATSSink(config)
        try:
            assert await sink.send([message]) == (1, DELIVERED)
            await proxy.cut()
            proxy.target_port = impostor.port
            await proxy.restore()
            sent, outcome = await eventually(
                lambda: sink.send([message]),
                # The impostor was reached, and the send went through it or was refused.
                lambda result: (
                    bool(impostor.connections) and (result[0] == 1 or REFUSAL in result[1].error)
                ),
                within=10,
            )
        finally:
            await sink.aclose()
        nursery.cancel_scope.cancel()
    assert (sent, outcome.result) == (0, Result.RETRY)
    assert outcome.error.startswith("cannot reach NATS: PlainTextRefusedError: "), outcome
    assert impostor.connections
    assert impostor.received == b""


async def test_jetstream_queue_with_tls_sends_nothing_to_a_server_without_it(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    async with trio.open_nursery() as nursery:
        server = await plain_nats(nursery)
        queue = {
            "type": "jetstream",
            "address": f"tls://127.0.0.1:{server.port}",
            "directory": str(tmp_path / "queue_data"),
            "timeout": "250ms",
            "credentials": {"username": "registry", "password": PASSWORD},
        }
        config = events_config(tmp_path, queue=queue)
        with pytest.RaisesGroup(QueueError, allow_unwrapped=True, flatten_subgroups=True) as err:
            async with running_queue(config.extensions.events):
                pass
        nursery.cancel_scope.cancel()
    (refused,) = err.value.exceptions if hasattr(err.value, "exceptions") else (err.value,)
    where = f"127.0.0.1:{server.port}"
    assert str(refused) == (
        f"cannot open the JetStream queue 'REGISTRY_EVENTS' at tls://{where} within 1s: "
        f"PlainTextRefusedError: server at {where} {REFUSAL}"
    )
    assert server.connections
    assert server.received == b""
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"NATS server at {where} {REFUSAL}" in warnings


async def test_handshake_first_reaches_a_server_that_wants_tls_first(tmp_path):
    tls = make_tls_files(tmp_path / "tls")
    files = f"cert_file: {json.dumps(str(tls.cert))}, key_file: {json.dumps(str(tls.key))}"
    server_config = (
        f'tls {{ {files}, handshake_first: true }}\nauthorization {{ token: "{TOKEN}" }}\n'
    )
    message = Message({}, b"{}", "evt-1")
    async with nats_server(tmp_path / "nats", server_config) as server:
        address = f"tls://127.0.0.1:{server.port}"
        first = {"tls": {"caFile": str(tls.ca), "handshakeFirst": True}}
        credentials = {"credentials": {"token": TOKEN}}
        sink = NATSSink(sink_config(tmp_path, address, **first, **credentials))
        # The server really wants TLS first: a client waiting for its INFO gets nothing.
        info_first = {"tls": {"caFile": str(tls.ca)}, "timeout": "300ms"}
        waiting = NATSSink(sink_config(tmp_path, address, **info_first, **credentials))
        try:
            assert await sink.send([message]) == (1, DELIVERED)
            sent, outcome = await waiting.send([message])
            assert (sent, outcome.result) == (0, Result.RETRY)
        finally:
            await sink.aclose()
            await waiting.aclose()
        queue = {
            "type": "jetstream",
            "address": address,
            "directory": str(tmp_path / "queue_data"),
            **first,
            **credentials,
        }
        async with running_queue(events_config(tmp_path, queue=queue).extensions.events) as q:
            assert q.instance_id  # opened: connected, streams and consumers in place


def test_handshake_first_is_for_nats_only(tmp_path):
    sink = {"type": "http", "address": "https://example.test", "tls": {"handshakeFirst": True}}
    with pytest.raises(ConfigError) as err:
        make_config(tmp_path, extensions={"events": {"enable": True, "sinks": [sink]}})
    assert err.value.path == "extensions.events.sinks[0].tls.handshakeFirst"
    assert "only NATS" in err.value.reason
