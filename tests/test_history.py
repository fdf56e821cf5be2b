"""The delivery history: every attempt of every event, recorded by the queue and served to
operators (``/_registry/events/history``, ``/_registry/events/trace/{id}``, the CLI).

Real server, real HTTP sink; the ``queue`` fixture runs the path tests on both queues.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.conftest import events_config, start_registry
from tests.waiting import eventually


def http_sink(sink: Any, **extra: Any) -> dict[str, Any]:
    return {
        "type": "http",
        "name": "audit",
        "address": sink.url,
        "timeout": "2s",
        "retry": {"initialBackoff": "10ms", "maxBackoff": "50ms"},
        **extra,
    }


async def push_blob(http: httpx.AsyncClient, repository: str, content: bytes) -> str:
    """A monolithic blob upload: exactly one event (blob.pushed). Returns the digest."""
    digest = f"sha256:{hashlib.sha256(content).hexdigest()}"
    response = await http.post(
        f"/v2/{repository}/blobs/uploads/", params={"digest": digest}, content=content
    )
    assert response.status_code == 201, response.text
    return digest


async def history(http: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await http.get("/_registry/events/history", params=params)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def trace(http: httpx.AsyncClient, event_id: str) -> dict[str, Any]:
    response = await http.get(f"/_registry/events/trace/{event_id}")
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def outcomes(records: list[dict[str, Any]]) -> list[str]:
    return [r["outcome"] for r in records]


async def test_trace_follows_an_event_through_an_outage_a_rejection_and_a_replay(
    nursery, tmp_path, sink, queue
):
    registry = await start_registry(nursery, events_config(tmp_path, http_sink(sink), queue=queue))
    await sink.stop()
    async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
        digest = await push_blob(http, "hist/app", b"through thick and thin")
        # The sink is down: attempts fail, with the reason in words.
        page = await eventually(
            lambda: history(http, outcome="failed"), lambda p: len(p["records"]) >= 3
        )
        event_id = page["records"][0]["event"]
        # Back, but refusing it for good: a dead letter.
        sink.status = 400
        await sink.start(nursery)
        await eventually(lambda: history(http, outcome="dead"), lambda p: p["records"])
        # Fixed: the operator replays it, and it is delivered.
        sink.status = 200
        replayed = await http.post("/_registry/events/dead/replay", json={"sink": "audit"})
        assert replayed.json()["replayed"] == 1
        path = await eventually(
            lambda: trace(http, event_id), lambda t: t["steps"][-1]["outcome"] == "delivered"
        )

    steps = path["steps"]
    names = outcomes(steps)
    failures = names.count("failed")
    assert failures >= 3
    # JetStream publishes a replayed event anew: a second commit, at a new position.
    again = ["committed"] if queue.get("type") == "jetstream" else []
    assert names == ["committed", *["failed"] * failures, "dead", "replayed", *again, "delivered"]
    committed = steps[0]
    attempts = [step for step in steps if step["outcome"] != "committed"]
    assert committed["seq"] == attempts[0]["seq"] and committed["time"] is not None
    if again:
        assert [s["seq"] for s in steps if s["outcome"] == "committed"][1] == attempts[-1]["seq"]
    assert all(step["sink"] == "audit" and step["event"] == event_id for step in attempts)
    # Times never go back; ids follow the order the queue recorded the steps in.
    times = [step["time"] for step in steps]
    assert times == sorted(times)
    ids = [step["id"] for step in attempts]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    failed = attempts[:failures]
    assert [step["attempt"] for step in failed] == list(range(1, failures + 1))
    for step in failed:
        assert step["status"] is None  # no answer came: the sink was down
        assert "ConnectError" in step["error"], step["error"]
        assert step["retryAt"] is not None
        assert step["batch"] == 1 and step["latencyMs"] >= 0
    dead, replay, delivered = attempts[failures:]
    assert dead["status"] == "HTTP 400" and dead["error"] == "HTTP 400 from the sink"
    assert dead["attempt"] == failures + 1
    assert replay["by"].startswith("anonymous at 127.0.0.1")
    assert replay["attempt"] is None and replay["status"] is None
    # A replay starts the attempts over.
    assert delivered["status"] == "HTTP 200" and delivered["error"] is None
    assert delivered["attempt"] == 1 and delivered["latencyMs"] > 0

    assert path["event"] == event_id and path["truncated"] is False
    assert path["action"] == "blob.pushed" and path["repository"] == "hist/app"
    assert path["digest"] == digest
    assert path["payload"]["id"] == event_id
    assert path["payload"]["target"]["digest"] == digest
    assert path["sinks"] == [{"sink": "audit", "state": "delivered", "attempts": failures + 2}]
    # What the receiver got is that event, once.
    assert [e["id"] for e in sink.events()] == [event_id]


async def test_every_attempt_is_recorded_with_its_batch(nursery, tmp_path, sink, queue):
    batched = {"format": "cloudevents-batch", "batch": {"maxEvents": 10, "maxWait": "200ms"}}
    registry = await start_registry(
        nursery, events_config(tmp_path, http_sink(sink, **batched), queue=queue)
    )
    async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
        await sink.stop()
        for i in range(4):
            await push_blob(http, "batch/app", f"blob {i}".encode())
        await eventually(lambda: history(http, outcome="failed"), lambda p: p["records"])
        await sink.start(nursery)
        page = await eventually(
            lambda: history(http, outcome="delivered"), lambda p: len(p["records"]) == 4
        )
    sizes = [len(r.json()) for r in sink.received]
    assert sum(sizes) == 4
    # Each event's record names the size of the request that carried it.
    assert sorted(r["batch"] for r in page["records"]) == sorted(
        size for size in sizes for _ in range(size)
    )
    assert {r["status"] for r in page["records"]} == {"HTTP 200"}


async def test_the_trace_of_an_unknown_event_is_a_404(nursery, tmp_path, sink):
    registry = await start_registry(nursery, events_config(tmp_path, http_sink(sink)))
    async with httpx.AsyncClient(base_url=registry.url) as http:
        response = await http.get("/_registry/events/trace/no-such-event")
    assert response.status_code == 404
    (error,) = response.json()["errors"]
    assert error["code"] == "UNSUPPORTED" and "no-such-event" in error["message"]


async def test_an_event_not_attempted_yet_is_traced_from_its_commit(nursery, tmp_path, sink):
    await sink.stop()
    registry = await start_registry(nursery, events_config(tmp_path, http_sink(sink)))
    async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
        await push_blob(http, "wait/app", b"first")
        await eventually(lambda: history(http, outcome="failed"), lambda p: p["records"])
        # In order, the second waits behind the first's retries: never attempted.
        await push_blob(http, "wait/app", b"second")
        first, second = await trio.to_thread.run_sync(queued_event_ids, tmp_path)
        waiting = await trace(http, second)
        retrying = await trace(http, first)
    assert outcomes(waiting["steps"]) == ["committed"]
    assert waiting["sinks"] == [{"sink": "audit", "state": "pending", "attempts": 0}]
    assert waiting["payload"]["id"] == second and waiting["repository"] == "wait/app"
    assert retrying["sinks"][0]["state"] == "retrying"
    assert outcomes(retrying["steps"])[:2] == ["committed", "failed"]


def queued_event_ids(tmp_path: Path) -> list[str]:
    """The ids of the events in the outbox, in queue order (read from the file)."""
    with contextlib.closing(sqlite3.connect(tmp_path / "queue_data" / "events.db")) as db:
        return [row[0] for row in db.execute("SELECT event_id FROM events ORDER BY seq")]
