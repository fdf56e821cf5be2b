"""JetStream as the queue: what only a shared queue must show (the guarantees common to both
queues run against it in test_events_delivery, test_events_crash and test_operator).

- An unreachable JetStream refuses the push (503) rather than acknowledging an event it did
  not store, and the server keeps serving.
- Scale-out: two registry processes on one storage directory and one stream, pushes spread
  across both, one killed for good mid-load: the survivor delivers every acknowledged push's
  event. Zero lost.
- A partition: the lease holder stays up but loses NATS while the other instance keeps it;
  the other takes the lease and delivers, the first gives way once back. Zero lost, in order.
- A stream that already exists is checked: one that cannot keep the promise (memory storage)
  stops start-up; a different duplicate window is brought in line; a replica count the
  server will not change stops start-up naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import nats
import pytest
import trio
from nats.js import api

from bench.registry_client import RegistryClient, make_image
from registry_trio.events.asyncio_thread import AsyncioThread
from registry_trio.events.queue import QueueError, running_queue
from registry_trio.events.queue.jetstream import (
    JetStreamOperations,
    compare_streams,
    subject_covers,
)
from tests.conftest import counts_until, events_config, start_registry
from tests.nats_server import nats_server
from tests.procs import ServerProcess, server_process
from tests.sink import HTTPSinkServer
from tests.tcp_proxy import tcp_proxy
from tests.tls_certs import make_tls_files
from tests.waiting import eventually

# Logged by the instance that holds a sink's delivery lease.
LEASE_TAKEN = "this instance delivers it now"


def jetstream_queue(url: str, directory: Path) -> dict:
    return {"type": "jetstream", "address": url, "directory": str(directory), "ackWait": "2s"}


def http_sink(sink: HTTPSinkServer) -> dict:
    return {
        "type": "http",
        "address": sink.url,
        "timeout": "2s",
        "retry": {"initialBackoff": "10ms", "maxBackoff": "100ms"},
    }


def manifest_tags(events: list[dict]) -> list[str]:
    return [e["data"]["reference"] for e in events if e["type"] == "zotregistry.image.updated"]


async def push(url: str, tag: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        return await RegistryClient(url, client=http).push_image("js/app", tag, make_image((300,)))


async def test_unreachable_jetstream_refuses_the_push_and_loses_nothing(nursery, tmp_path, sink):
    async with nats_server(tmp_path / "nats") as nats:
        queue = {**jetstream_queue(nats.url, tmp_path / "queue_data"), "timeout": "1s"}
        config = events_config(tmp_path, http_sink(sink), queue=queue)
        registry = await start_registry(nursery, config)
        assert (await push(registry.url, "before")).status_code == 201

        await nats.kill()
        image = make_image((300,))
        async with httpx.AsyncClient(base_url=registry.url, timeout=10) as http:
            layer = image.layers[0]
            response = await http.post(
                "/v2/js/app/blobs/uploads/", params={"digest": layer.digest}, content=layer.data
            )
            # Not a 201 for an event that is stored nowhere: the client will retry.
            assert response.status_code == 503
            error = response.json()["errors"][0]
            assert error["code"] == "UNAVAILABLE" and "JetStream" in error["message"]
            # The server keeps serving what needs no event.
            assert (await http.get("/v2/")).status_code == 200

        await nats.start()  # same port, same store
        async with httpx.AsyncClient(base_url=registry.url, timeout=10) as http:
            retried = await RegistryClient(registry.url, client=http).push_image(
                "js/app", "during", image
            )
        assert retried.status_code == 201
        events = await sink.wait_for(lambda evs: "during" in manifest_tags(evs))
        # An acknowledgement lost in the outage may send "before" again: the same event.
        unique = list({e["id"]: e for e in events}.values())
        assert manifest_tags(unique) == ["before", "during"]
        counts = await counts_until(config, sink.url, lambda c: c.pending == 0)
        assert counts.dead == 0


async def test_the_delivery_lease_lapses_by_the_challengers_own_clock(tmp_path, sink):
    """Two instances contend for a sink's lease; neither reads the other's wall clock.

    The challenger's clock is driven by hand: however far it runs ahead, a lease its holder
    keeps renewing (a new revision each time) is never taken; one left unrenewed for the
    ttl, as the challenger measures it, is.
    """
    async with nats_server(tmp_path / "nats") as server:
        events = events_config(
            tmp_path, http_sink(sink), queue=jetstream_queue(server.url, tmp_path / "q")
        ).extensions.events
        name, ttl = str(events.sinks[0].name), 5.0
        holder = JetStreamOperations(events.queue, events.sinks, "holder", events.history)
        challenger = JetStreamOperations(events.queue, events.sinks, "challenger", events.history)
        now = [0.0]
        challenger.clock = lambda: now[0]
        thread = AsyncioThread("test-lease")
        try:
            await thread.run(holder.open)
            await thread.run(challenger.open)

            async def lead(instance: JetStreamOperations) -> bool:
                return await thread.run(instance.lead, name, ttl)

            assert await lead(holder)
            for _ in range(3):
                assert not await lead(challenger)
                now[0] += 1000 * ttl  # far ahead, but the holder renews in between
                assert await lead(holder)
            assert not await lead(challenger)  # first sight of the latest revision
            now[0] += ttl * 0.9
            assert not await lead(challenger)
            now[0] += ttl * 0.2  # unrenewed for more than ttl: the holder is gone
            assert await lead(challenger)
            assert not await lead(holder)  # it lost the lease, and knows it
            assert await lead(challenger)  # renewing needs no waiting
        finally:
            for instance in (holder, challenger):
                with contextlib.suppress(Exception):
                    await thread.run(instance.close)
            await thread.aclose()


async def test_delivery_rides_out_an_outage_longer_than_ackwait(nursery, tmp_path, sink, caplog):
    """JetStream gone for longer than ackWait: the lease cannot be renewed, delivery stops
    with warnings (no crash report), and resumes on its own once NATS is back."""
    caplog.set_level(logging.INFO)
    async with nats_server(tmp_path / "nats") as server:
        queue = {**jetstream_queue(server.url, tmp_path / "queue_data"), "timeout": "1s"}
        config = events_config(tmp_path, http_sink(sink), queue=queue)
        registry = await start_registry(nursery, config)
        assert (await push(registry.url, "before")).status_code == 201
        await sink.wait_for(lambda evs: "before" in manifest_tags(evs))

        async def logged(text: str) -> int:
            return sum(text in r.getMessage() for r in caplog.records)

        await server.kill()
        # Three failed renewals, one every ackWait/3: the lease has lapsed by now.
        await eventually(lambda: logged("delivery lease failed"), lambda n: n >= 3, within=30)
        await server.start()
        assert (await push(registry.url, "after")).status_code == 201
        events = await sink.wait_for(lambda evs: "after" in manifest_tags(evs))
        unique = list({e["id"]: e for e in events}.values())
        assert manifest_tags(unique) == ["before", "after"]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def write_instance_config(tmp_path: Path, name: str, nats_url: str, sink: HTTPSinkServer) -> Path:
    """One instance's config: shared storage and stream, its own directory for its id."""
    directory = tmp_path / name
    directory.mkdir()
    doc = {
        "storage": {"rootDirectory": str(tmp_path / "registry_data")},
        "http": {"address": "127.0.0.1", "port": 0},
        "log": {"level": "info"},
        "extensions": {
            "events": {
                "enable": True,
                "queue": jetstream_queue(nats_url, directory / "queue_data"),
                "sinks": [http_sink(sink)],
            }
        },
    }
    path = directory / "config.json"
    path.write_text(json.dumps(doc))
    return path


async def test_scale_out_survivor_delivers_what_a_dead_instance_accepted(nursery, tmp_path):
    sink = HTTPSinkServer(delay=0.02)  # slow enough that a backlog is in flight at the kill
    await sink.start(nursery)
    acknowledged: dict[str, str] = {}  # tag -> the instance that acknowledged it
    async with (
        nats_server(tmp_path / "nats") as nats,
        server_process(write_instance_config(tmp_path, "a", nats.url, sink)) as a,
        server_process(write_instance_config(tmp_path, "b", nats.url, sink)) as b,
    ):
        instances = {"a": a, "b": b}

        # The instance that delivers the sink (it holds the lease) is the one to kill: the
        # survivor must then take over what it was sending, orphans first.
        async def lease_holder() -> str | None:
            holders = [name for name, i in instances.items() if LEASE_TAKEN in i.current_output]
            return holders[0] if holders else None

        victim = await eventually(lease_holder, lambda name: name is not None)
        survivor = "b" if victim == "a" else "a"
        dead = trio.Event()
        victim_has_enough = trio.Event()  # it acknowledged a share of the load: kill it
        enough = trio.Event()  # the survivor took over, and pushes went on past that
        stop_at: list[int] = []  # how many acknowledged pushes are enough, once known

        async def pusher(worker: int) -> None:
            # Round robin across both instances, as a load balancer would; on past the
            # takeover, so that fresh events wait beside the dead one's unacknowledged run.
            n = 0
            while not enough.is_set():
                n += 1
                name = "ab"[(worker + n) % 2]
                if name == victim and dead.is_set():
                    name = survivor  # the balancer's health check took it out
                tag = f"w{worker}-{n}"
                try:
                    response = await push(instances[name].url, tag)
                except (httpx.HTTPError, OSError):
                    continue  # it died under this push: not acknowledged
                if response.status_code == 201:
                    acknowledged[tag] = name
                    if sum(1 for who in acknowledged.values() if who == victim) >= 6:
                        victim_has_enough.set()
                    if stop_at and len(acknowledged) >= stop_at[0]:
                        enough.set()

        async with trio.open_nursery() as pushers:
            for worker in range(4):
                pushers.start_soon(pusher, worker)
            with trio.fail_after(60):
                await victim_has_enough.wait()
            await instances[victim].kill()  # for good: it is never restarted
            dead.set()
            await instances[survivor].wait_for_output(LEASE_TAKEN.encode(), 30)
            stop_at.append(len(acknowledged) + 12)

        by_victim = {tag for tag, who in acknowledged.items() if who == victim}
        assert len(by_victim) >= 6 and len(acknowledged) > len(by_victim)
        events = await sink.wait_for(
            lambda evs: set(manifest_tags(evs)) >= set(acknowledged), within=60
        )
    # Zero lost: every acknowledged push's event arrived, whichever instance accepted it.
    assert set(manifest_tags(events)) >= set(acknowledged)
    sources = {e["data"]["reference"]: e["source"] for e in events if "reference" in e["data"]}
    # Both instances accepted pushes (their events name different sources).
    assert len({sources[tag] for tag in acknowledged}) == 2
    # Duplicates (around the kill) are the same event: same id, same content.
    by_id: dict[str, dict] = {}
    for event in events:
        assert by_id.setdefault(event["id"], event) == event
    # In order across instances: each worker pushed one image after the other, each event
    # committed before its 2xx, so its images' events arrive (first copies) in push order.
    first_seen = list(dict.fromkeys(manifest_tags(events)))
    for worker in range(4):
        mine = [t for t in first_seen if t.startswith(f"w{worker}-") and t in acknowledged]
        assert mine == sorted(mine, key=lambda tag: int(tag.split("-")[1])), mine


async def test_a_partitioned_lease_holder_gives_way_and_nothing_is_lost(tmp_path, sink):
    """A network partition: the instance holding the sink's lease (A) stays up but loses
    NATS, while the other (B) keeps it. A stops delivering, B takes the lease once A stops
    renewing it and delivers what it accepts meanwhile; A, reachable again, finds the lease
    taken and leaves delivery to B. Every acknowledged push's event arrives, in push order.

    A reaches NATS through a proxy that the test cuts and restores (see tests/tcp_proxy.py);
    a push through A while it is cut off may be refused (503), so A gets pushes only while
    connected.
    """
    pushed: list[str] = []  # every acknowledged push, in push order (one at a time)
    # The push that each blob and tag came with: its events (blob pushed, manifest pushed)
    # carry it as their reference.
    push_of: dict[str, int] = {}

    async def push_through(instance: ServerProcess, tag: str) -> None:
        image = make_image((300,))
        async with httpx.AsyncClient(base_url=instance.url, timeout=10) as http:
            response = await RegistryClient(instance.url, client=http).push_image(
                "js/app", tag, image
            )
        assert response.status_code == 201, (tag, response.status_code, response.text)
        for reference in (image.config.digest, *(layer.digest for layer in image.layers), tag):
            push_of[reference] = len(pushed)
        pushed.append(tag)

    async def all_delivered() -> list[dict]:
        return await sink.wait_for(lambda evs: set(manifest_tags(evs)) >= set(pushed))

    async with (
        nats_server(tmp_path / "nats") as nats,
        tcp_proxy(nats.port) as proxy,
        server_process(write_instance_config(tmp_path, "a", proxy.url, sink)) as a,
    ):
        await a.wait_for_output(LEASE_TAKEN.encode())  # A delivers the sink, alone so far
        # Reads the sink's counts on a queue of its own (an id of its own, no delivery).
        observer = events_config(
            tmp_path, http_sink(sink), queue=jetstream_queue(nats.url, tmp_path / "observer")
        )
        async with server_process(write_instance_config(tmp_path, "b", nats.url, sink)) as b:
            for n in range(3):
                await push_through(a, f"a{n}")
            await all_delivered()
            # And acknowledged: A holds nothing when it is cut off. (Cut while an ack is on
            # its way, the ack fails after queue.timeout and A's delivery task restarts,
            # holding no lease, so "lost the delivery lease" is never logged.)
            await counts_until(observer, sink.url, lambda c: c.pending == 0)

            await proxy.cut()  # A loses NATS; the nats-server and B go on
            await a.wait_for_output(b"jetstream queue: disconnected", 5)
            for n in range(3):
                await push_through(b, f"b{n}")  # B's queue is fine: stored, acknowledged
            # Only the lease holder delivers: B must have taken the lease from A.
            await all_delivered()
            await b.wait_for_output(LEASE_TAKEN.encode(), 5)
            await a.wait_for_output(b"lost the delivery lease", 5)

            await proxy.restore()
            await a.wait_for_output(b"jetstream queue: reconnected", 10)
            for n in range(3):
                await push_through(a, f"c{2 * n}")
                await push_through(b, f"c{2 * n + 1}")
            await all_delivered()
            # Nothing left in the queue: whatever was handed out went to the sink.
            await counts_until(observer, sink.url, lambda c: c.pending == 0)
            events = sink.events()
            outputs = {"a": a.current_output, "b": b.current_output}

    # Zero lost: every acknowledged push's event arrived, whichever instance accepted it.
    assert set(manifest_tags(events)) >= set(pushed)
    # Duplicates (around the takeover: at least once) are the same event.
    by_id: dict[str, dict] = {}
    for event in events:
        assert by_id.setdefault(event["id"], event) == event
    # Every event of every acknowledged push arrived (its blobs' too).
    references = {e["data"].get("reference") for e in events}
    assert set(push_of) <= references, sorted(set(push_of) - references)
    # In order: each push was acknowledged before the next began, so the unique events
    # arrive in push order, across both instances and the change of lease holder.
    unique = list(by_id.values())
    arrived = [e["data"]["reference"] for e in unique if e["data"].get("reference") in push_of]
    order = [push_of[reference] for reference in arrived]
    assert order == sorted(order), [f"{pushed[push_of[r]]}:{r[:14]}" for r in arrived]
    assert manifest_tags(unique) == pushed
    # Pushes through each instance were accepted by that instance (their sources differ).
    sources = {e["data"]["reference"]: e["source"] for e in events if "reference" in e["data"]}
    assert len({sources[tag] for tag in pushed if tag.startswith("a")}) == 1
    assert sources["a0"] != sources["b0"] == sources["c1"] and sources["c0"] == sources["a0"]
    # Warnings (disconnected, the lease failed, lost), never an error.
    for name, output in outputs.items():
        assert not re.search(r"^\S+ \S+ (ERROR|CRITICAL) ", output, re.MULTILINE), (name, output)
        assert "Traceback" not in output, (name, output)
    # A only delivered at first: it never took the lease back.
    assert outputs["a"].count(LEASE_TAKEN) == 1 and outputs["b"].count(LEASE_TAKEN) == 1


def write_serve_config(tmp_path: Path, queue: dict) -> Path:
    """A config for ``registry-trio serve`` with the events extension on that queue."""
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "storage": {"rootDirectory": str(tmp_path / "data")},
                "http": {"address": "127.0.0.1", "port": 0},
                "extensions": {"events": {"enable": True, "queue": queue}},
            }
        )
    )
    return path


SERVE = [sys.executable, "-m", "registry_trio", "serve", "-c"]


def test_unreachable_jetstream_stops_start_up_with_the_reason(tmp_path):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nothing listens here once the socket is closed
    queue = {**jetstream_queue(f"nats://127.0.0.1:{port}", tmp_path / "q"), "timeout": "250ms"}
    path = write_serve_config(tmp_path, queue)
    result = subprocess.run(
        [*SERVE, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot start: cannot open the JetStream queue 'REGISTRY_EVENTS'" in result.stderr
    assert "ConnectionRefusedError" in result.stderr
    assert "Traceback" not in result.stderr


async def on_jetstream(url: str, operation):
    """``await operation(js)`` on a connection of its own (nats-py runs on asyncio)."""
    thread = AsyncioThread("test-jetstream")

    async def run():
        nc = await nats.connect(url)
        try:
            return await operation(nc.jetstream())
        finally:
            await nc.close()

    try:
        return await thread.run(run)
    finally:
        await thread.aclose()


def main_stream(**config) -> api.StreamConfig:
    """The queue's stream as the queue creates it by default, but for ``config``."""
    defaults = {
        "name": "REGISTRY_EVENTS",
        "subjects": ["REGISTRY_EVENTS.sink.*"],
        "retention": api.RetentionPolicy.INTEREST,
        "storage": api.StorageType.FILE,
        "duplicate_window": 120.0,
    }
    return api.StreamConfig(**{**defaults, **config})


async def stream_config(url: str, name: str = "REGISTRY_EVENTS") -> api.StreamConfig:
    async def info(js):
        return (await js.stream_info(name)).config

    return await on_jetstream(url, info)


async def test_existing_memory_stream_stops_start_up(tmp_path):
    async with nats_server(tmp_path / "nats") as server:
        created = main_stream(storage=api.StorageType.MEMORY)
        await on_jetstream(server.url, lambda js: js.add_stream(created))
        path = write_serve_config(tmp_path, jetstream_queue(server.url, tmp_path / "q"))
        with trio.fail_after(60):
            result = await trio.run_process([*SERVE, str(path)], capture_stderr=True, check=False)
        stderr = result.stderr.decode()
        assert result.returncode == 1, stderr
        assert "cannot start: cannot open the JetStream queue 'REGISTRY_EVENTS'" in stderr
        assert "stream 'REGISTRY_EVENTS' exists with memory storage" in stderr
        assert "the queue needs file storage" in stderr
        assert "extensions.events.queue.stream" in stderr
        assert "Traceback" not in stderr
        # Refused, not changed: the operator's stream is as it was.
        assert (await stream_config(server.url)).storage == "memory"


async def test_existing_stream_gets_the_configured_duplicate_window(
    nursery, tmp_path, sink, caplog
):
    caplog.set_level(logging.INFO)
    async with nats_server(tmp_path / "nats") as server:
        await on_jetstream(server.url, lambda js: js.add_stream(main_stream(duplicate_window=5)))
        queue = {**jetstream_queue(server.url, tmp_path / "queue_data"), "duplicateWindow": "1m"}
        config = events_config(tmp_path, http_sink(sink), queue=queue)
        registry = await start_registry(nursery, config)

        updated = [r.getMessage() for r in caplog.records if "brought in line" in r.getMessage()]
        assert updated == [
            "jetstream queue: stream 'REGISTRY_EVENTS' brought in line with "
            "extensions.events.queue.duplicateWindow: 5s -> 60s"
        ]
        found = await stream_config(server.url)
        assert found.duplicate_window == 60
        assert (found.storage, found.retention) == ("file", "interest")
        assert (await push(registry.url, "edited")).status_code == 201
        events = await sink.wait_for(lambda evs: "edited" in manifest_tags(evs))
        assert manifest_tags(events) == ["edited"]


async def test_replicas_the_server_will_not_change_stop_start_up(tmp_path):
    async with nats_server(tmp_path / "nats") as server:
        await on_jetstream(server.url, lambda js: js.add_stream(main_stream(num_replicas=1)))
        # A single nats-server cannot hold three replicas, nor make the stream hold them.
        queue = {**jetstream_queue(server.url, tmp_path / "q"), "replicas": 3, "timeout": "2s"}
        config = events_config(tmp_path, queue=queue)
        with pytest.RaisesGroup(QueueError, allow_unwrapped=True, flatten_subgroups=True) as err:
            async with running_queue(config.extensions.events):
                pass
        (refused,) = err.value.exceptions if hasattr(err.value, "exceptions") else (err.value,)
        assert "stream 'REGISTRY_EVENTS' exists with replicas 1" in str(refused)
        assert "non-clustered" in str(refused)  # the server's reason
        assert "set extensions.events.queue.replicas to 1" in str(refused)
        assert (await stream_config(server.url)).num_replicas == 1


@pytest.mark.parametrize(
    ("pattern", "covers"),
    [
        ("S.sink.*", True),
        ("S.sink.>", True),
        ("S.>", True),
        (">", True),
        ("*.sink.*", True),
        ("S.sink.abc", False),
        ("S.sink", False),
        ("S.sink.*.x", False),
        ("S.dead.*", False),
        ("T.>", False),
    ],
)
def test_subject_covers(pattern, covers):
    assert subject_covers(pattern, "S.sink.*") is covers


@pytest.mark.parametrize(
    ("limits", "refused"),
    [
        ({}, False),
        ({"max_msgs": -1, "max_bytes": -1, "max_age": 0}, False),  # how the server says none
        ({"max_age": 3600.0}, True),
        ({"max_msgs": 1000}, True),
        ({"max_bytes": 1 << 30}, True),
        ({"max_msgs_per_subject": 10}, True),
        ({"max_msgs": 1000, "discard": api.DiscardPolicy.NEW}, False),  # refuses, not drops
    ],
)
def test_an_existing_stream_that_discards_old_messages_is_refused(limits, refused):
    wanted = api.StreamConfig(
        name="S",
        subjects=["S.sink.*"],
        retention=api.RetentionPolicy.INTEREST,
        storage=api.StorageType.FILE,
    )
    found = dataclasses.replace(wanted, **limits)
    problems, _ = compare_streams(found, wanted)
    assert bool(problems) is refused, problems
    if refused:
        assert next(iter(limits)) in problems[0]


async def test_queue_over_tls_with_credentials(nursery, tmp_path, sink):
    tls = make_tls_files(tmp_path / "tls")
    server_config = (
        f"tls {{ cert_file: {json.dumps(str(tls.cert))}, key_file: {json.dumps(str(tls.key))} }}\n"
        'authorization { user: "registry", password: "queue-pw-31" }\n'
    )
    async with nats_server(tmp_path / "nats", server_config) as nats:
        address = f"tls://127.0.0.1:{nats.port}"
        queue = {
            **jetstream_queue(address, tmp_path / "queue_data"),
            "tls": {"caFile": str(tls.ca)},
            "credentials": {"username": "registry", "password": "queue-pw-31"},
        }
        config = events_config(tmp_path, http_sink(sink), queue=queue)
        registry = await start_registry(nursery, config)
        assert (await push(registry.url, "secure")).status_code == 201
        events = await sink.wait_for(lambda evs: "secure" in manifest_tags(evs))
        assert len(events) == 4

        # A wrong password is refused with the server's reason, and never shown.
        wrong = {**queue, "credentials": {"username": "registry", "password": "wrong-pw-77"}}
        bad = events_config(tmp_path, http_sink(sink), queue={**wrong, "timeout": "500ms"})
        with pytest.RaisesGroup(QueueError, allow_unwrapped=True, flatten_subgroups=True) as err:
            async with running_queue(bad.extensions.events):
                pass
        (refused,) = err.value.exceptions if hasattr(err.value, "exceptions") else (err.value,)
        assert "Authorization Violation" in str(refused)
        assert "wrong-pw-77" not in str(refused)
