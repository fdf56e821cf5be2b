"""Operator surface: sink status, dead letters and replay, over the admin API and the CLI."""

from __future__ import annotations

import functools
import json
import socket
import sys
from pathlib import Path

import httpx
import trio

from registry_trio.client import RegistryClient, make_image
from registry_trio.config import parse_config
from registry_trio.server import serve
from tests.waiting import eventually


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(
    tmp_path: Path, sink_url: str, port: int, queue: dict | None = None
) -> tuple[Path, dict]:
    doc = {
        "storage": {"rootDirectory": str(tmp_path / "registry_data")},
        "http": {"address": "127.0.0.1", "port": port},
        "extensions": {
            "events": {
                "enable": True,
                "queue": queue or {"directory": str(tmp_path / "queue_data")},
                "sinks": [
                    {
                        "type": "http",
                        "address": sink_url,
                        "name": "audit",
                        "retry": {"initialBackoff": "10ms", "maxBackoff": "20ms"},
                    }
                ],
            }
        },
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    return path, doc


async def admin_sinks(http: httpx.AsyncClient) -> list[dict]:
    return (await http.get("/_registry/events/sinks")).json()["sinks"]


async def cli(*args: str) -> dict:
    result = await trio.run_process(
        [sys.executable, "-m", "registry_trio", "events", *args, "--json"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


async def test_dead_letters_status_and_replay(nursery, tmp_path, sink, queue):
    sink.status = 400
    port = free_port()
    config_path, doc = write_config(tmp_path, sink.url, port, queue)
    shutdown = trio.Event()
    url = await nursery.start(functools.partial(serve, parse_config(doc), shutdown=shutdown))

    async with httpx.AsyncClient(base_url=url) as http:
        await RegistryClient(url, client=http).push_image("ops/app", "v1", make_image((256,)))
        sinks = await eventually(
            lambda: admin_sinks(http),
            lambda sinks: sinks[0]["dead"] == 4 and sinks[0]["pending"] == 0,
        )
    (status,) = sinks
    assert status["name"] == "audit"
    assert status["lastError"] == "rejected: HTTP 400 from the sink"

    # The CLI finds the running server through the config and shows the same.
    (cli_status,) = await cli("status", "-c", str(config_path))
    assert cli_status["dead"] == 4 and cli_status["lastError"] == status["lastError"]
    dead = await cli("dead", "-c", str(config_path))
    dead_ids = [d["id"] for d in dead["deadLetters"]]
    assert len(dead_ids) == 4 and dead["next"] is None
    assert {d["action"] for d in dead["deadLetters"]} == {
        "blob.pushed",
        "repository.created",
        "manifest.pushed",
    }

    # Receiver fixed: replay one, then the rest; they arrive with their original ids.
    sink.status = 200
    assert (await cli("replay", "-c", str(config_path), "--id", dead_ids[0]))["replayed"] == 1
    await sink.wait_for(lambda evs: len(evs) == 1)
    assert (await cli("replay", "-c", str(config_path)))["replayed"] == 3
    events = await sink.wait_for(lambda evs: len(evs) == 4)
    assert [e["id"] for e in events] == dead_ids  # order and ids preserved
    # The sink has the events before the worker records its 2xx: wait for the acks too.
    async with httpx.AsyncClient(base_url=url) as http:
        sinks = await eventually(
            lambda: admin_sinks(http), lambda sinks: sinks[0]["delivered"] == 4
        )
    (after,) = await cli("status", "-c", str(config_path))
    assert after["dead"] == 0 and after["delivered"] == 4


async def test_cli_works_with_the_server_stopped(nursery, tmp_path, sink, queue):
    sink.status = 400
    config_path, doc = write_config(tmp_path, sink.url, free_port(), queue)
    shutdown = trio.Event()
    done = trio.Event()

    async def run_server(task_status=trio.TASK_STATUS_IGNORED):
        try:
            await serve(parse_config(doc), shutdown=shutdown, task_status=task_status)
        finally:
            done.set()

    url = await nursery.start(run_server)
    async with httpx.AsyncClient(base_url=url) as http:
        await RegistryClient(url, client=http).push_image("ops/app", "v1", make_image((256,)))
        await eventually(
            lambda: admin_sinks(http),
            lambda sinks: sinks[0]["dead"] == 4 and sinks[0]["pending"] == 0,
        )
    shutdown.set()
    await done.wait()

    (status,) = await cli("status", "-c", str(config_path))
    assert status["dead"] == 4 and status["inFlight"] == 0
    dead = await cli("dead", "-c", str(config_path), "--limit", "3")
    assert len(dead["deadLetters"]) == 3 and dead["next"] is not None
    rest = await cli("dead", "-c", str(config_path), "--after", str(dead["next"]))
    assert len(rest["deadLetters"]) == 1
    assert (await cli("replay", "-c", str(config_path)))["replayed"] == 4
    (status,) = await cli("status", "-c", str(config_path))
    assert status["dead"] == 0 and status["pending"] == 4

    # Restarted with the receiver fixed, the server delivers what the CLI replayed.
    sink.status = 200
    await nursery.start(functools.partial(serve, parse_config(doc), shutdown=trio.Event()))
    events = await sink.wait_for(lambda evs: len(evs) == 4)
    assert [e["id"] for e in events] == [d["id"] for d in dead["deadLetters"] + rest["deadLetters"]]


async def test_admin_api_is_loopback_only_without_auth(registry, http):
    # Events off: the admin API says so, rather than pretending to have no sinks.
    response = await http.get("/_registry/events/sinks")
    assert response.status_code == 404
    assert response.json()["errors"][0]["message"] == "the events extension is not enabled"
