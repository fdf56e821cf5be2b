"""The delivery history: every attempt of every event, recorded by the queue and served to
operators (``/_registry/events/history``, ``/_registry/events/trace/{id}``, the CLI).

Real server, real HTTP sink; the ``queue`` fixture runs the path tests on both queues.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from registry_trio.config import ConfigError, HistoryConfig
from registry_trio.events import Action, Event, Source, Target
from registry_trio.events.queue import Attempt, HistoryQuery, Outbox, OwedEvent
from registry_trio.events.queue.history import SCAN_MAX
from tests.conftest import events_config, start_registry
from tests.sink import HTTPSinkServer
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


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


async def all_pages(http: httpx.AsyncClient, **params: Any) -> tuple[list[dict], int]:
    """Every record the filters match, page by page; and how many pages that took."""
    records, pages, cursor = [], 0, None
    while True:
        page = await history(http, **params, **({} if cursor is None else {"before": cursor}))
        records += page["records"]
        pages += 1
        cursor = page["next"]
        if cursor is None:
            return records, pages


async def test_history_filters_and_pages(nursery, tmp_path, sink, queue):
    refusing = HTTPSinkServer(status=400)
    await refusing.start(nursery)
    sinks = [http_sink(sink), http_sink(refusing, name="refusing")]
    registry = await start_registry(nursery, events_config(tmp_path, *sinks, queue=queue))
    async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
        digests = [await push_blob(http, "a/one", f"one {i}".encode()) for i in range(3)]
        digests += [await push_blob(http, "b/two", f"two {i}".encode()) for i in range(2)]
        full = await eventually(
            lambda: history(http, limit=1000), lambda p: len(p["records"]) == 10
        )
        everything = full["records"]
        assert everything == (await all_pages(http))[0]
        ids = [r["id"] for r in everything]
        assert ids == sorted(ids, reverse=True)  # newest first
        assert {(r["sink"], r["outcome"]) for r in everything} == {
            ("audit", "delivered"),
            ("refusing", "dead"),
        }

        async def matching(**params: Any) -> list[dict]:
            return (await all_pages(http, **params))[0]

        assert await matching(sink="audit") == [r for r in everything if r["sink"] == "audit"]
        assert await matching(outcome="dead") == [r for r in everything if r["sink"] != "audit"]
        assert await matching(outcome="delivered,dead") == everything
        assert await matching(outcome="failed,replayed") == []
        assert await matching(repository="a/one") == [
            r for r in everything if r["repository"] == "a/one"
        ]
        assert len(await matching(repository="a/one")) == 6
        digest_records = await matching(digest=digests[0])
        assert {r["sink"] for r in digest_records} == {"audit", "refusing"}
        event_id = digest_records[0]["event"]
        assert await matching(event=event_id) == digest_records
        assert await matching(sink="audit", repository="b/two", outcome="delivered") == [
            r for r in everything if r["sink"] == "audit" and r["repository"] == "b/two"
        ]
        assert await matching(sink="nobody") == []
        assert await matching(repository="c/three") == []

        # Time ranges are inclusive, and cut the newest-first list anywhere.
        times = sorted({parse_time(r["time"]) for r in everything})
        middle = datetime.fromtimestamp(times[len(times) // 2], UTC).isoformat()
        newer = await matching(since=middle)
        older = await matching(until=middle)
        assert newer and older
        assert all(parse_time(r["time"]) >= times[len(times) // 2] for r in newer)
        assert all(parse_time(r["time"]) <= times[len(times) // 2] for r in older)
        assert len(newer) + len(older) == len(everything) + sum(
            parse_time(r["time"]) == times[len(times) // 2] for r in everything
        )
        assert await matching(until="2000-01-01T00:00:00") == []
        assert await matching(since="2999-01-01T00:00:00+02:00") == []

        # Pages of 3: each record once, in order; the last page says there is no next.
        paged, pages = await all_pages(http, limit=3)
        assert paged == everything and pages == 4
        # A page that ends exactly at the last record does not promise another.
        exact = await history(http, limit=10)
        assert len(exact["records"]) == 10 and exact["next"] is None
        below = await history(http, before=everything[4]["id"], limit=1000)
        assert below["records"] == everything[5:]


BAD_PARAMETERS = [
    ({"limit": "0"}, "limit"),
    ({"limit": "1001"}, "limit"),
    ({"limit": "10" * 40}, "limit"),
    ({"limit": "-1"}, "limit"),
    ({"limit": "1e3"}, "limit"),
    ({"limit": ""}, "limit"),
    ({"before": "abc"}, "before"),
    ({"before": "0"}, "before"),
    ({"before": "9" * 30}, "before"),
    ({"before": "9223372036854775808"}, "before"),
    ({"since": "yesterday"}, "since"),
    ({"since": "2026-02-30T00:00:00Z"}, "since"),
    ({"since": "9" * 5000}, "since"),
    ({"until": "2026-11-23T25:00:00"}, "until"),
    ({"since": "2026-11-24T00:00:00Z", "until": "2026-11-23T00:00:00Z"}, "since"),
    ({"outcome": "bogus"}, "outcome"),
    ({"outcome": "delivered,"}, "outcome"),
    ({"outcome": ""}, "outcome"),
    ({"event": "x" * 257}, "event"),
    ({"event": "a\x00b"}, "event"),
    ({"repository": "a\nb"}, "repository"),
    ({"digest": "d" * 1025}, "digest"),
    ({"sink": ""}, "sink"),
    ({"sinks": "audit"}, "sinks"),
    ({"limit; DROP TABLE history": "1"}, "limit; DROP TABLE history"),
]


async def test_bad_history_parameters_get_a_400_naming_them(nursery, tmp_path, sink):
    registry = await start_registry(nursery, events_config(tmp_path, http_sink(sink)))
    async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
        await push_blob(http, "bad/app", b"something to list")
        await eventually(lambda: history(http), lambda p: p["records"])
        for params, parameter in BAD_PARAMETERS:
            response = await http.get("/_registry/events/history", params=params)
            assert response.status_code == 400, (params, response.text)
            (error,) = response.json()["errors"]
            assert error["code"] == "UNSUPPORTED"
            assert error["message"].startswith(f"{parameter}: "), (params, error)
            assert error["detail"] == {"parameter": parameter}
        # A parameter given twice is refused too (which one would count?).
        twice = await http.get("/_registry/events/history?sink=audit&sink=other")
        assert twice.status_code == 400 and twice.json()["errors"][0]["detail"] == {
            "parameter": "sink"
        }
        # The history is still there, whole.
        assert len((await history(http))["records"]) == 1

        for target, status in [
            ("/_registry/events/trace/" + "x" * 257, 400),
            ("/_registry/events/trace/a%00b", 400),
            ("/_registry/events/trace/a%0Ab", 400),
            ("/_registry/events/trace/%F0%9F%90%9B", 404),  # printable, and unknown
            ("/_registry/events/trace/' OR 1=1 --", 404),
            ("/_registry/events/trace/..%2F..%2Fetc", 404),
            ("/_registry/events/trace/", 404),
        ]:
            response = await http.get(target)
            assert response.status_code == status, (target, response.text)
            assert response.json()["errors"][0]["code"] in ("UNSUPPORTED", "NAME_UNKNOWN"), target
        for method in ("POST", "PUT", "DELETE"):
            response = await http.request(method, "/_registry/events/history")
            assert response.status_code == 405, (method, response.status_code)


async def test_a_filter_no_index_serves_examines_a_bounded_share_per_page(tmp_path):
    outbox = Outbox(tmp_path)
    count = 25_000
    events = [
        Event(
            Action.BLOB_PUSHED,
            Target(repository=f"r/{i % 2}", digest=f"sha256:{i:064x}"),
            Source("a", "i"),
        )
        for i in range(count)
    ]
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        await outbox.append([(e, ["s"]) for e in events])
        owed = [OwedEvent(seq, e, 0, 0.0) for seq, e in enumerate(events, start=1)]
        await outbox.ack("s", owed, [Attempt(time.time(), 0.001, 1, "HTTP 200")] * count)

        # Nothing matches: each page examines 10,000 records at most, and says where the
        # next one goes on; the third reaches the oldest record.
        cursors = []
        page = await outbox.history(HistoryQuery(repository="nowhere"))
        while page.next is not None:
            assert page.records == []
            cursors.append(page.next)
            page = await outbox.history(HistoryQuery(repository="nowhere", before=page.next))
        assert cursors == [count - SCAN_MAX + 1, count - 2 * SCAN_MAX + 1]
        # What matches comes a page at a time, newest first.
        page = await outbox.history(HistoryQuery(repository="r/1", limit=100))
        assert [r.event_id for r in page.records] == [
            e.id for e in events[::-1] if e.target.repository == "r/1"
        ][:100]
        assert page.next == page.records[-1].id
        outbox.close()


async def history_rows(tmp_path: Path) -> tuple[int, int]:
    """(history rows, events rows) in the outbox file."""

    def count() -> tuple[int, int]:
        with contextlib.closing(sqlite3.connect(tmp_path / "queue_data" / "events.db")) as db:
            (rows,) = db.execute("SELECT COUNT(*) FROM history").fetchone()
            (events,) = db.execute("SELECT COUNT(*) FROM events").fetchone()
            return rows, events

    return await trio.to_thread.run_sync(count)


async def test_history_is_held_to_its_row_budget(nursery, tmp_path, sink, queue):
    registry = await start_registry(
        nursery, events_config(tmp_path, http_sink(sink), queue=queue, history={"maxRows": 5})
    )
    async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
        digests = [await push_blob(http, "budget/app", f"blob {i}".encode()) for i in range(8)]
        await sink.wait_for(lambda events: len(events) == 8)
        newest_five = digests[:2:-1]
        # The oldest went first.
        await eventually(
            lambda: history(http), lambda p: [r["digest"] for r in p["records"]] == newest_five
        )
    if queue.get("type") != "jetstream":
        # Each delivered event stays while a record names it, and goes with its last one.
        assert await eventually(lambda: history_rows(tmp_path), lambda n: n == (5, 5))


async def test_history_is_held_to_its_age(nursery, tmp_path, sink, queue):
    registry = await start_registry(
        nursery, events_config(tmp_path, http_sink(sink), queue=queue, history={"maxAge": "3s"})
    )
    async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
        event_ids = set()
        for i in range(3):
            await push_blob(http, "aged/app", f"blob {i}".encode())
        recorded = await eventually(lambda: history(http), lambda p: len(p["records"]) == 3)
        event_ids = {r["event"] for r in recorded["records"]}
        assert {e["id"] for e in sink.events()} == event_ids
        await eventually(lambda: history(http), lambda p: p["records"] == [])
        for event_id in event_ids:
            gone = await http.get(f"/_registry/events/trace/{event_id}")
            assert gone.status_code == 404
    if queue.get("type") != "jetstream":
        assert await history_rows(tmp_path) == (0, 0)


async def test_history_off_records_nothing_and_keeps_no_event(nursery, tmp_path, sink, queue):
    registry = await start_registry(
        nursery, events_config(tmp_path, http_sink(sink), queue=queue, history={"enable": False})
    )
    async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
        await push_blob(http, "off/app", b"unrecorded")
        (event,) = await sink.wait_for(lambda events: len(events) == 1)
        await eventually(
            lambda: http.get("/_registry/events/sinks"),
            lambda r: r.json()["sinks"][0]["delivered"] == 1,
        )
        assert (await history(http))["records"] == []
        assert (await http.get(f"/_registry/events/trace/{event['id']}")).status_code == 404
    if queue.get("type") != "jetstream":
        assert await history_rows(tmp_path) == (0, 0)


# The outbox's tables as the registry wrote them before the history (main, 2026-12-02).
SCHEMA_BEFORE_HISTORY = """
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE deliveries (
    sink TEXT NOT NULL,
    seq INTEGER NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (sink, seq)
) WITHOUT ROWID;
CREATE INDEX deliveries_by_state ON deliveries (sink, state, seq);
CREATE INDEX deliveries_by_seq ON deliveries (seq);
CREATE TABLE sink_counters (
    sink TEXT PRIMARY KEY,
    delivered INTEGER NOT NULL DEFAULT 0,
    failed_attempts INTEGER NOT NULL DEFAULT 0,
    dead INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    last_error_at REAL,
    last_delivered_at REAL
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def write_queue_before_history(directory: Path, pending: Event, dead: Event) -> None:
    """A queue file of the earlier layout: one event pending for "audit", one dead there."""
    directory.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(directory / "events.db")) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA_BEFORE_HISTORY)
        db.execute("INSERT INTO meta VALUES ('instance_id', 'before')")
        for seq, event in ((1, pending), (2, dead)):
            db.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?)",
                (seq, event.id, event.to_bytes(), event.time.timestamp()),
            )
        db.execute("INSERT INTO deliveries(sink, seq) VALUES ('audit', 1)")
        db.execute(
            "INSERT INTO deliveries VALUES ('audit', 2, 2, 1, 0, ?)",
            ("rejected: HTTP 400 from the sink",),
        )
        db.commit()


async def test_a_queue_file_from_before_the_history_opens_and_gains_it(nursery, tmp_path, sink):
    pending, dead = (
        Event(
            Action.BLOB_PUSHED,
            Target(repository="old/app", digest=f"sha256:{c * 64}"),
            Source("a", "before"),
        )
        for c in "ab"
    )
    await trio.to_thread.run_sync(
        write_queue_before_history, tmp_path / "queue_data", pending, dead
    )
    registry = await start_registry(nursery, events_config(tmp_path, http_sink(sink)))
    async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
        await sink.wait_for(lambda events: [e["id"] for e in events] == [pending.id])
        replayed = await http.post("/_registry/events/dead/replay", json={"sink": "audit"})
        assert replayed.json()["replayed"] == 1
        await sink.wait_for(lambda events: [e["id"] for e in events] == [pending.id, dead.id])
        path = await eventually(
            lambda: trace(http, dead.id), lambda t: t["sinks"][0]["state"] == "delivered"
        )
        new = await push_blob(http, "old/app", b"after the upgrade")
        fresh = await eventually(lambda: history(http, digest=new), lambda p: p["records"])
        fresh_path = await trace(http, fresh["records"][0]["event"])
    # Committed before the queue recorded commit times: the time is unknown, not invented.
    assert path["steps"][0] == {"outcome": "committed", "time": None, "seq": 2}
    assert outcomes(path["steps"]) == ["committed", "replayed", "delivered"]
    assert path["payload"]["id"] == dead.id
    assert fresh_path["steps"][0]["time"] is not None


async def test_every_worker_serves_the_same_history_and_it_outlives_the_deliverer(
    nursery, tmp_path
):
    from tests.procs import server_process
    from tests.test_workers import leader_pid, push, workers_config

    sink = HTTPSinkServer()
    await sink.start(nursery)
    async with server_process(workers_config(tmp_path, sink)) as server:
        for i in range(3):
            assert (await push(server.url, "multi/app", f"v{i}", b"%d" % i)).status_code == 201
        await sink.wait_for(lambda events: len(events) == 10)  # 3 x (2 blobs, 1 manifest) + 1

        async def fresh_history() -> dict[str, Any]:
            # A connection of its own: the kernel picks the worker that answers.
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
                return await history(http, limit=1000)

        complete = await eventually(fresh_history, lambda p: len(p["records"]) == 10)
        answers = [await fresh_history() for _ in range(40)]
        served = set(
            re.findall(
                r"\[(worker \d)\] registry_trio\.access[^\n]*/_registry/events/history",
                server.current_output,
            )
        )
        assert served == {"worker 1", "worker 2"}, "one worker answered every request"
        assert all(answer == complete for answer in answers)

        # The deliverer dies; the next one's records follow the dead one's.
        os.kill(await leader_pid(server), signal.SIGKILL)
        assert (await push(server.url, "multi/app", "v3", b"3")).status_code == 201
        after = await eventually(fresh_history, lambda p: len(p["records"]) == 13)
    assert after["records"][3:] == complete["records"]
    assert after["records"][0]["id"] > complete["records"][0]["id"]


def stored_seqs(path: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [row[0] for row in db.execute("SELECT seq FROM events ORDER BY seq")]


async def test_pruning_keeps_an_event_while_a_record_names_it_or_a_sink_owes_it(tmp_path):
    outbox = Outbox(tmp_path, history=HistoryConfig(max_rows=1))
    first, second = (
        Event(Action.BLOB_PUSHED, Target(repository="prune/app"), Source("a", "i"))
        for _ in range(2)
    )
    ok, refused = Attempt(time.time(), 0.001, 1, "HTTP 200"), Attempt(time.time(), 0.001, 1)
    owed_first, owed_second = OwedEvent(1, first, 0, 0.0), OwedEvent(2, second, 0, 0.0)

    async def prune_then_stored() -> list[int]:
        assert await outbox.prune_history() == 1
        return await trio.to_thread.run_sync(stored_seqs, outbox.path)

    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        await outbox.append([(first, ["a", "b"]), (second, ["a"])])
        await outbox.ack("a", [owed_first], [ok])
        await outbox.ack("a", [owed_second], [ok])
        # The first event's only record goes, but "b" still owes it: it stays.
        assert await prune_then_stored() == [1, 2]
        await outbox.retry_later("b", [owed_first], time.time(), refused)
        # The second's only record goes, and nobody owes it: it goes too.
        assert await prune_then_stored() == [1]
        await outbox.ack("b", [OwedEvent(1, first, 1, 0.0)], [ok])
        # A record of the first goes, but a newer one names it: it stays.
        assert await prune_then_stored() == [1]
        trace = await outbox.trace(first.id)
        assert trace is not None and [r.step for r in trace.records] == ["delivered"]
        assert trace.owed == {} and trace.event == first
        assert await outbox.trace(second.id) is None
        outbox.close()


async def test_pruning_a_long_history_does_not_hold_up_delivery(nursery, tmp_path, sink):
    # A history far past the budget the server starts with: pruning it takes many batches.
    outbox = Outbox(tmp_path / "queue_data")
    backlog = [
        Event(Action.BLOB_PUSHED, Target(repository="old/app"), Source("a", "i"))
        for _ in range(30_000)
    ]
    async with trio.open_nursery() as setup:
        await setup.start(outbox.run)
        await outbox.append([(e, ["audit"]) for e in backlog])
        owed = [OwedEvent(seq, e, 0, 0.0) for seq, e in enumerate(backlog, start=1)]
        await outbox.ack("audit", owed, [Attempt(time.time(), 0.001, 1, "HTTP 200")] * len(owed))
        outbox.close()
    assert (await history_rows(tmp_path))[0] == 30_000

    registry = await start_registry(
        nursery, events_config(tmp_path, http_sink(sink), history={"maxRows": 10})
    )
    async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
        digest = await push_blob(http, "new/app", b"delivered while pruning")
        # Its acknowledgement (and record) lands between two of the pruner's transactions.
        page = await eventually(lambda: history(http, digest=digest), lambda p: p["records"])
        rows_then = (await history_rows(tmp_path))[0]
        await eventually(lambda: history_rows(tmp_path), lambda n: n == (10, 10))
    assert page["records"][0]["outcome"] == "delivered"
    assert rows_then > 1000, "pruning was over before the event was delivered: no evidence"


async def test_the_jetstream_history_keeps_to_its_limits_and_skips_what_is_no_record(
    nursery, tmp_path, sink, caplog
):
    from registry_trio.events.queue import running_queue
    from tests.nats_server import nats_server
    from tests.test_jetstream_queue import jetstream_queue, on_jetstream

    async with nats_server(tmp_path / "nats") as server:
        queue = jetstream_queue(server.url, tmp_path / "queue_data")
        config = events_config(tmp_path, http_sink(sink), queue=queue, history={"maxRows": 50})
        registry = await start_registry(nursery, config)
        async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
            await push_blob(http, "js/app", b"a record among junk")
            (record,) = (await eventually(lambda: history(http), lambda p: p["records"]))["records"]

            # Anyone allowed to publish on the history's subjects can put anything there.
            async def junk(js):
                for body in (b"not json", b"[1, 2]", b'{"sink": 1}', b'{"step": "nonsense"}'):
                    await js.publish("REGISTRY_EVENTS.history.junk.junk", body)

            await on_jetstream(server.url, junk)
            assert (await history(http))["records"] == [record]
            assert (await trace(http, record["event"]))["steps"][-1] == record

        info = await on_jetstream(server.url, lambda js: js.stream_info("REGISTRY_EVENTS_HISTORY"))
        assert (info.config.max_msgs, info.config.max_age) == (50, 7 * 24 * 3600)
        assert info.config.storage == "file" and info.config.discard == "old"
        # Another budget at the next start: the stream is brought in line with it.
        fewer = events_config(tmp_path, queue=queue, history={"maxRows": 20, "maxAge": "1h"})
        async with running_queue(fewer.extensions.events):
            pass
        info = await on_jetstream(server.url, lambda js: js.stream_info("REGISTRY_EVENTS_HISTORY"))
        assert (info.config.max_msgs, info.config.max_age) == (20, 3600)
        changed = [r.getMessage() for r in caplog.records if "brought in line" in r.getMessage()]
        assert any("extensions.events.history.maxRows: 50 -> 20" in line for line in changed)
        assert any("extensions.events.history.maxAge: 604800s -> 3600s" in line for line in changed)


@pytest.mark.parametrize(
    ("history", "key", "reason"),
    [
        ({"maxAge": "0s"}, "maxAge", "must be at least 1s"),
        ({"maxAge": "500ms"}, "maxAge", "must be at least 1s"),
        ({"maxAge": "a week"}, "maxAge", "invalid duration"),
        ({"maxRows": 0}, "maxRows", "must be between 1 and 1000000000"),
        ({"maxRows": "1000"}, "maxRows", "expected an integer"),
        ({"enable": "yes"}, "enable", "expected true or false"),
        ({"maxrows": 5}, "maxrows", "unknown key"),
    ],
)
def test_a_misconfigured_history_names_its_key(tmp_path, history, key, reason):
    with pytest.raises(ConfigError) as refused:
        events_config(tmp_path, history=history)
    assert refused.value.path == f"extensions.events.history.{key}"
    assert reason in str(refused.value)
