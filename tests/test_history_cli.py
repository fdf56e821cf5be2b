"""``registry-trio events history`` and ``events trace``: through the running server's admin
API, and with the server stopped, on the queue directly (both queues)."""

from __future__ import annotations

import hashlib

import httpx
import trio

from registry_trio.config import parse_config
from registry_trio.server import serve
from tests.test_operator import cli, cli_text, free_port, write_config
from tests.waiting import eventually


async def rejected_blob(http: httpx.AsyncClient, content: bytes) -> None:
    digest = f"sha256:{hashlib.sha256(content).hexdigest()}"
    response = await http.post(
        "/v2/cli/app/blobs/uploads/", params={"digest": digest}, content=content
    )
    assert response.status_code == 201, response.text


async def test_history_and_trace_online_then_offline(nursery, tmp_path, sink, queue):
    sink.status = 400
    config_path, doc = write_config(tmp_path, sink.url, free_port(), queue)
    config = str(config_path)
    shutdown, stopped = trio.Event(), trio.Event()

    async def run_server(task_status=trio.TASK_STATUS_IGNORED):
        try:
            await serve(parse_config(doc), shutdown=shutdown, task_status=task_status)
        finally:
            stopped.set()

    url = await nursery.start(run_server)
    async with httpx.AsyncClient(base_url=url) as http:
        await rejected_blob(http, b"first")
        await rejected_blob(http, b"second")
        dead = await eventually(
            lambda: cli("history", "-c", config, "--failed"), lambda h: len(h["records"]) == 2
        )
        second, first = (r["event"] for r in dead["records"])
        # Fixed: the first is replayed through the server, and delivered.
        sink.status = 200
        assert (await cli("replay", "-c", config, "--id", first))["replayed"] == 1
        online = await eventually(
            lambda: cli("trace", "-c", config, first),
            lambda t: t["steps"][-1]["outcome"] == "delivered",
        )
        listed = await cli("history", "-c", config)
        code, text, _ = await cli_text("trace", "-c", config, first)
    assert code == 0
    shutdown.set()
    await stopped.wait()

    steps = [s["outcome"] for s in online["steps"] if s["outcome"] != "committed"]
    assert steps == ["dead", "replayed", "delivered"]
    assert online["steps"][0]["outcome"] == "committed"
    assert online["sinks"] == [{"sink": "audit", "state": "delivered", "attempts": 2}]
    assert [r["outcome"] for r in listed["records"]] == ["delivered", "replayed", "dead", "dead"]
    assert listed["next"] is None
    # Read for a person: the event, where it stands, each step with its answer, the payload.
    assert f"event {first}: blob.pushed cli/app@sha256:" in text
    assert "audit: delivered after 2 attempt(s)" in text
    for words in ("committed", "HTTP 400", "HTTP 400 from the sink", "by anonymous at"):
        assert words in text, text
    assert "HTTP 200" in text and "payload:" in text

    # The server is gone: the same answers, read from the queue.
    assert await cli("trace", "-c", config, first) == online
    assert await cli("history", "-c", config) == listed
    one = await cli("history", "-c", config, "--limit", "1")
    assert one["records"] == listed["records"][:1] and one["next"] == listed["records"][0]["id"]
    rest = await cli("history", "-c", config, "--before", str(one["next"]))
    assert rest["records"] == listed["records"][1:]
    # An offline replay is recorded too, naming who ran it.
    assert (await cli("replay", "-c", config, "--id", second))["replayed"] == 1
    replayed = await cli("history", "-c", config, "--sink", "audit", "--limit", "1")
    (record,) = replayed["records"]
    assert (record["outcome"], record["event"]) == ("replayed", second)
    assert record["by"].endswith("(registry-trio events replay, offline)")
    code, text, _ = await cli_text("history", "-c", config)
    assert code == 0
    assert text.splitlines()[0].split() == [
        "ID",
        "TIME",
        "SINK",
        "OUTCOME",
        "EVENT",
        "REPOSITORY",
        "ATTEMPT",
        "STATUS",
        "LATENCY",
        "DETAIL",
    ]
    assert len(text.splitlines()) == 6  # the header and five records

    code, _, error = await cli_text("trace", "-c", config, "no-such-event")
    assert code == 1 and "knows nothing of event 'no-such-event'" in error
    code, _, error = await cli_text("trace", "-c", config, "bad\x01id")
    assert code == 1 and "EVENT_ID: must not hold control characters" in error
    code, _, error = await cli_text("history", "-c", config, "--limit", "0")
    assert code == 2 and "must be a number from 1 to 10000" in error
