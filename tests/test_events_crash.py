"""Crash safety of events: the server is a real subprocess, killed with SIGKILL or SIGTERM."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import httpx
import trio

from bench.registry_client import RegistryClient, make_image
from tests.procs import server_process, write_config
from tests.sink import HTTPSinkServer


def events_overrides(
    tmp_path: Path, sink: HTTPSinkServer, queue: dict | None = None, **sink_extra: object
) -> dict:
    return {
        "extensions": {
            "events": {
                "enable": True,
                "queue": queue or {"directory": str(tmp_path / "queue_data")},
                "shutdownTimeout": "5s",
                "sinks": [
                    {
                        "type": "http",
                        "address": sink.url,
                        "timeout": "2s",
                        "retry": {"initialBackoff": "10ms", "maxBackoff": "100ms"},
                        **sink_extra,
                    }
                ],
            }
        }
    }


def manifest_events(sink: HTTPSinkServer) -> list[dict]:
    return [e for e in sink.events() if e["type"] == "zotregistry.image.updated"]


async def test_event_is_durable_before_the_2xx(nursery, tmp_path, queue):
    sink = HTTPSinkServer()
    await sink.start(nursery)
    await sink.stop()  # the receiver is down: the event cannot leave before the kill
    config = write_config(tmp_path, **events_overrides(tmp_path, sink, queue))
    async with server_process(config) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            response = await RegistryClient(server.url, client=http).push_image(
                "durable/app", "v1", make_image((512,))
            )
        assert response.status_code == 201
        await server.kill()  # kill -9 right after the 2xx
        await sink.start(nursery)
        await server.start()
        events = await sink.wait_for(lambda evs: len(manifest_events(sink)) == 1)
    (pushed,) = manifest_events(sink)
    assert pushed["data"]["request"]["id"] == response.headers["X-Request-Id"]
    assert pushed["data"]["digest"] == response.headers["Docker-Content-Digest"]
    # All four, in order, though the restarted server found them half-taken by the killed one.
    assert [e["type"].rsplit(".", 2)[-2:] for e in events] == [
        ["blob", "pushed"],
        ["blob", "pushed"],
        ["repository", "created"],
        ["image", "updated"],
    ]


async def test_crash_soak_loses_no_acknowledged_event(nursery, tmp_path, queue):
    """Pushes run while the server is SIGKILLed at random moments, then restarted."""
    sink = HTTPSinkServer()
    await sink.start(nursery)
    config = write_config(tmp_path, **events_overrides(tmp_path, sink, queue))
    acknowledged: dict[str, str] = {}  # tag -> X-Request-Id of the 2xx
    kills = 6
    async with server_process(config) as server:
        stop_pushing = trio.Event()
        acked_more = trio.Event()  # set (and replaced) at every acknowledged push

        async def acknowledged_at_least(n: int) -> None:
            while len(acknowledged) < n:
                await acked_more.wait()

        async def pusher(worker: int) -> None:
            n = 0
            while not stop_pushing.is_set():
                tag = f"w{worker}-{n}"
                try:
                    async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
                        response = await RegistryClient(server.url, client=http).push_image(
                            "soak/app", tag, make_image((256,))
                        )
                    acknowledged[tag] = response.headers["X-Request-Id"]
                    n += 1
                    nonlocal acked_more
                    acked_more.set()
                    acked_more = trio.Event()
                except (httpx.HTTPError, OSError):
                    await trio.sleep(0.01)  # ok-sleep: the server is down; try again

        async with trio.open_nursery() as pushers:
            for worker in range(4):
                pushers.start_soon(pusher, worker)
            for _ in range(kills):
                # Each incarnation acknowledges some pushes (however slow the machine is)...
                with trio.fail_after(30):
                    await acknowledged_at_least(len(acknowledged) + 2)
                # ...and dies at a random moment under load: the load pattern, not a sync.
                await trio.sleep(random.uniform(0.0, 0.5))  # ok-sleep
                await server.kill()
                await server.start()
            stop_pushing.set()

        assert len(acknowledged) >= kills * 2, "too few pushes for the soak to mean anything"
        await sink.wait_for(
            lambda evs: (
                {e["data"]["reference"] for e in manifest_events(sink)} >= set(acknowledged)
            ),
            within=60,
        )
    copies: dict[str, list[dict]] = defaultdict(list)
    for event in sink.events():
        copies[event["id"]].append(event)
    # At least once: every acknowledged push arrived, with the request that made it.
    by_tag = {e["data"]["reference"]: e for e in manifest_events(sink)}
    for tag, request_id in acknowledged.items():
        assert by_tag[tag]["data"]["request"]["id"] == request_id
    # Duplicates (around the kills) carry the same id and the same content.
    for duplicates in copies.values():
        assert all(d == duplicates[0] for d in duplicates)


async def test_sigterm_finishes_in_flight_and_resumes_exactly_there(nursery, tmp_path, queue):
    sink = HTTPSinkServer(delay=0.2)  # slow: a backlog builds up
    await sink.start(nursery)
    config = write_config(tmp_path, **events_overrides(tmp_path, sink, queue))
    async with server_process(config) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            client = RegistryClient(server.url, client=http)
            for i in range(5):
                await client.push_image("term/app", f"v{i}", make_image((256,)))
        await sink.wait_for(lambda evs: len(evs) >= 1)
        with trio.fail_after(10):
            assert await server.terminate() == 0  # clean exit within the deadline
        before = len(sink.events())
        assert before < 16, "everything was delivered before SIGTERM; the test proves nothing"
        sink.delay = 0
        await server.start()
        events = await sink.wait_for(lambda evs: len(evs) >= 16)
    ids = [e["id"] for e in events]
    # Exactly there: nothing lost, and nothing delivered before the stop was sent again.
    assert len(ids) == 16 and len(set(ids)) == 16
    assert [e["data"]["reference"] for e in manifest_events(sink)] == [f"v{i}" for i in range(5)]
