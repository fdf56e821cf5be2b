"""Operator surface: sink status, dead letters and replay, over the admin API and the CLI."""

from __future__ import annotations

import contextlib
import datetime
import functools
import ipaddress
import json
import os
import re
import socket
import sqlite3
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from bench.registry_client import RegistryClient, make_image
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


# -- what docs/operations.md promises of the operator surface ----------------------------------


async def cli_text(*args: str, env: dict[str, str | None] | None = None) -> tuple[int, str, str]:
    """``registry-trio events …`` as a person runs it: exit code, stdout, stderr."""
    result = await trio.run_process(
        [sys.executable, "-m", "registry_trio", "events", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None},
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def table(text: str) -> list[list[str]]:
    """The CLI's table: columns are separated by two spaces or more."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if line.strip()]


STATUS_FIELDS = {
    "name",
    "type",
    "pending",
    "inFlight",
    "delivered",
    "failedAttempts",
    "dead",
    "oldestPendingAge",
    "lastError",
    "lastErrorAt",
    "lastDeliveredAt",
    "recovered",
}


def unix_time(iso: str) -> float:
    """An ISO-8601 UTC time of the status (``…Z``) as a Unix time."""
    assert iso.endswith("Z"), iso
    return datetime.datetime.fromisoformat(iso).timestamp()


async def test_status_shows_every_documented_field_in_json_and_the_table(nursery, tmp_path, sink):
    sink.status = 503  # a transient failure: retried, never buried, so the events stay pending
    config_path, doc = write_config(tmp_path, sink.url, free_port())
    url = await nursery.start(functools.partial(serve, parse_config(doc), shutdown=trio.Event()))
    before = time.time()
    async with httpx.AsyncClient(base_url=url) as http:
        await RegistryClient(url, client=http).push_image("ops/app", "v1", make_image((256,)))
        (status,) = await eventually(
            lambda: admin_sinks(http),
            lambda s: s[0]["failedAttempts"] >= 2 and (s[0]["oldestPendingAge"] or 0) > 0,
        )
    assert set(status) >= STATUS_FIELDS
    assert (status["name"], status["type"]) == ("audit", "http")
    assert (status["pending"], status["delivered"], status["dead"]) == (4, 0, 0)
    assert "HTTP 503" in status["lastError"]
    assert before <= unix_time(status["lastErrorAt"]) <= time.time()
    assert status["lastDeliveredAt"] is None and status["recovered"] is False
    assert 0 < status["oldestPendingAge"] < 60

    (cli_status,) = await cli("status", "-c", str(config_path))
    assert set(cli_status) >= STATUS_FIELDS and cli_status["pending"] == 4

    code, out, err = await cli_text("status", "-c", str(config_path))
    assert code == 0, err
    header, *rows, (delivered_by,) = table(out)
    # One process serves here: it delivers, and has no worker number.
    assert re.fullmatch(r"delivered by: pid \d+", delivered_by), delivered_by
    assert header == [
        "SINK",
        "TYPE",
        "PENDING",
        "IN FLIGHT",
        "DELIVERED",
        "FAILED",
        "DEAD",
        "OLDEST",
        "LAST ERROR",
    ]
    (row,) = rows
    assert row[:3] == ["audit", "http", "4"]
    assert row[4] == "0" and int(row[5]) >= 2 and row[6] == "0"
    assert row[7].endswith("s") and "HTTP 503" in row[8]
    assert re.fullmatch(r"\d+s ago: .*HTTP 503.*", row[8]) and "recovered" not in row[8]


async def test_status_says_how_long_ago_the_last_error_was_and_whether_delivery_recovered(
    nursery, tmp_path, sink, queue
):
    sink.status = 503
    config_path, doc = write_config(tmp_path, sink.url, free_port(), queue)
    url = await nursery.start(functools.partial(serve, parse_config(doc), shutdown=trio.Event()))
    async with httpx.AsyncClient(base_url=url) as http:
        await RegistryClient(url, client=http).push_image("ops/app", "v1", make_image((256,)))
        (failing,) = await eventually(
            lambda: admin_sinks(http), lambda s: s[0]["failedAttempts"] >= 1
        )
        assert failing["recovered"] is False and failing["lastDeliveredAt"] is None
        code, out, err = await cli_text("status", "-c", str(config_path))
        assert code == 0, err
        last_error = table(out)[1][8]
        assert re.fullmatch(r"\d+s ago: .*HTTP 503.*", last_error), last_error
        assert "recovered" not in last_error

        sink.status = 200
        (recovered,) = await eventually(
            lambda: admin_sinks(http), lambda s: s[0]["delivered"] == 4 and s[0]["recovered"]
        )
    # The error is still shown, with its time; the delivery after it says it is over.
    assert "HTTP 503" in recovered["lastError"]
    assert unix_time(recovered["lastDeliveredAt"]) > unix_time(recovered["lastErrorAt"])
    (cli_status,) = await cli("status", "-c", str(config_path))
    assert cli_status["recovered"] is True
    assert cli_status["lastErrorAt"] == recovered["lastErrorAt"]
    code, out, err = await cli_text("status", "-c", str(config_path))
    assert code == 0, err
    last_error = table(out)[1][8]
    assert re.fullmatch(r"\d+s ago: .*HTTP 503.* \(recovered since\)", last_error), last_error


# The sink_counters table as registries before last_delivered_at created it.
OLD_SINK_COUNTERS = """
CREATE TABLE sink_counters (
    sink TEXT PRIMARY KEY,
    delivered INTEGER NOT NULL DEFAULT 0,
    failed_attempts INTEGER NOT NULL DEFAULT 0,
    dead INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    last_error_at REAL
);
"""


async def test_a_queue_file_of_an_older_registry_gets_the_new_column_and_keeps_its_counts(
    nursery, tmp_path, sink
):
    config_path, doc = write_config(tmp_path, sink.url, free_port())
    (tmp_path / "queue_data").mkdir()
    with contextlib.closing(sqlite3.connect(tmp_path / "queue_data" / "events.db")) as old:
        old.executescript(OLD_SINK_COUNTERS)
        old.execute(
            "INSERT INTO sink_counters VALUES ('audit', 3, 2, 0, 'HTTP 503 from the sink', ?)",
            (time.time() - 3600,),
        )
        old.commit()

    # Read offline first (the events command opens the file on its own), then served.
    (offline,) = await cli("status", "-c", str(config_path))
    assert (offline["delivered"], offline["failedAttempts"]) == (3, 2)
    assert offline["recovered"] is False and offline["lastDeliveredAt"] is None
    url = await nursery.start(functools.partial(serve, parse_config(doc), shutdown=trio.Event()))
    async with httpx.AsyncClient(base_url=url) as http:
        await RegistryClient(url, client=http).push_image("ops/app", "v1", make_image((256,)))
        (status,) = await eventually(lambda: admin_sinks(http), lambda s: s[0]["delivered"] == 7)
    assert status["lastError"] == "HTTP 503 from the sink"
    assert status["recovered"] is True


DEAD_LETTER_FIELDS = {"seq", "id", "action", "repository", "attempts", "lastError", "event"}


async def test_dead_letters_page_with_limit_after_and_next(nursery, tmp_path, sink):
    sink.status = 400
    config_path, doc = write_config(tmp_path, sink.url, free_port())
    url = await nursery.start(functools.partial(serve, parse_config(doc), shutdown=trio.Event()))
    async with httpx.AsyncClient(base_url=url) as http:
        await RegistryClient(url, client=http).push_image("ops/app", "v1", make_image((256,)))
        await eventually(
            lambda: admin_sinks(http),
            lambda sinks: sinks[0]["dead"] == 4 and sinks[0]["pending"] == 0,
        )
        first = await http.get("/_registry/events/dead", params={"sink": "audit", "limit": 3})
        assert first.status_code == 200
        page = first.json()
        assert page["sink"] == "audit" and len(page["deadLetters"]) == 3
        assert page["next"] == page["deadLetters"][-1]["seq"]
        rest = (
            await http.get(
                "/_registry/events/dead", params={"sink": "audit", "after": page["next"]}
            )
        ).json()
        everything = (await http.get("/_registry/events/dead", params={"sink": "audit"})).json()
        # A page that ends exactly at the last letter promises no other.
        exact = await http.get("/_registry/events/dead", params={"sink": "audit", "limit": 4})
        assert len(exact.json()["deadLetters"]) == 4 and exact.json()["next"] is None
        for limit in (0, 1001):
            refused = await http.get(
                "/_registry/events/dead", params={"sink": "audit", "limit": limit}
            )
            assert refused.status_code == 400
            assert refused.json()["errors"][0]["message"] == "limit must be between 1 and 1000"
    assert len(rest["deadLetters"]) == 1 and rest["next"] is None
    letters = page["deadLetters"] + rest["deadLetters"]
    assert letters == everything["deadLetters"] and everything["next"] is None
    seqs = [d["seq"] for d in letters]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    for letter in letters:
        assert set(letter) == DEAD_LETTER_FIELDS
        assert letter["event"]["id"] == letter["id"]
        assert letter["repository"] == "ops/app" and letter["attempts"] == 1
        assert letter["lastError"] == "rejected: HTTP 400 from the sink"

    # The same pages in the CLI's table, with the cursor for the next one.
    code, out, err = await cli_text("dead", "-c", str(config_path), "--limit", "3")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[-1] == f"more: --after {page['next']}"
    header, *rows = table("\n".join(lines[:-1]))
    assert header == ["SEQ", "EVENT ID", "ACTION", "REPOSITORY", "ATTEMPTS", "LAST ERROR"]
    assert [row[:4] for row in rows] == [
        [str(d["seq"]), d["id"], d["action"], "ops/app"] for d in page["deadLetters"]
    ]
    code, out, err = await cli_text("dead", "-c", str(config_path), "--limit", "0")
    assert code == 2 and "must be a number from 1 to 1000" in err
    code, out, err = await cli_text("dead", "-c", str(config_path), "--after", str(page["next"]))
    assert code == 0, err
    assert "more:" not in out and [row[1] for row in table(out)[1:]] == [letters[3]["id"]]

    code, out, err = await cli_text("replay", "-c", str(config_path), "--id", letters[0]["id"])
    assert code == 0, err
    assert out.strip() == "replayed 1 dead letter(s) of sink audit"


async def test_admin_api_and_cli_need_an_admin_login_when_auth_is_on(nursery, tmp_path, sink):
    from tests.test_auth import ACCESS_CONTROL, PASSWORDS, write_htpasswd

    config_path, doc = write_config(tmp_path, sink.url, free_port())
    doc["http"]["auth"] = {"htpasswd": {"path": str(write_htpasswd(tmp_path / "htpasswd"))}}
    doc["http"]["accessControl"] = ACCESS_CONTROL  # carol is the only adminPolicy user
    config_path.write_text(json.dumps(doc))
    url = await nursery.start(functools.partial(serve, parse_config(doc), shutdown=trio.Event()))

    async def get(auth=None) -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, auth=auth) as http:
            return await http.get("/_registry/events/sinks")

    anonymous = await get()
    assert anonymous.status_code == 401
    assert anonymous.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert anonymous.headers["WWW-Authenticate"] == 'Basic realm="registry-trio"'
    assert (await get(("carol", "not-her-password"))).status_code == 401
    # alice may do anything in team/**, bob read and create: neither is an administrator.
    for user in ("alice", "bob"):
        denied = await get((user, PASSWORDS[user]))
        assert denied.status_code == 403, user
        assert denied.json()["errors"][0]["code"] == "DENIED"
    async with httpx.AsyncClient(base_url=url, auth=("bob", PASSWORDS["bob"])) as http:
        replay = await http.post("/_registry/events/dead/replay", json={"sink": "audit"})
        assert replay.status_code == 403
    admin = await get(("carol", PASSWORDS["carol"]))
    assert admin.status_code == 200
    assert [s["name"] for s in admin.json()["sinks"]] == ["audit"]

    # The CLI logs in with REGISTRY_TRIO_USER, and says why when it cannot.
    code, _, err = await cli_text(
        "status", "-c", str(config_path), env={"REGISTRY_TRIO_USER": None}
    )
    assert code == 1 and "answered 401" in err, err
    assert "REGISTRY_TRIO_USER=user:password" in err  # how to log in
    wrong = {"REGISTRY_TRIO_USER": "carol:not-her-password"}
    code, _, err = await cli_text("status", "-c", str(config_path), env=wrong)
    assert code == 1 and "answered 401" in err, err
    assert "the user and password in REGISTRY_TRIO_USER were refused" in err
    bob = {"REGISTRY_TRIO_USER": f"bob:{PASSWORDS['bob']}"}
    code, _, err = await cli_text("status", "-c", str(config_path), env=bob)
    assert code == 1 and "answered 403" in err and "not an administrator" in err, err
    carol = {"REGISTRY_TRIO_USER": f"carol:{PASSWORDS['carol']}"}
    code, out, err = await cli_text("status", "-c", str(config_path), "--json", env=carol)
    assert code == 0, err
    assert [s["name"] for s in json.loads(out)] == ["audit"]


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if ipaddress.ip_address(address).is_loopback else address


async def test_admin_api_answers_only_loopback_clients_without_auth(nursery, tmp_path, sink):
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to call from")
    _, doc = write_config(tmp_path, sink.url, 0)
    doc["http"]["address"] = "0.0.0.0"
    url = await nursery.start(functools.partial(serve, parse_config(doc), shutdown=trio.Event()))
    port = int(url.rsplit(":", 1)[1])
    async with httpx.AsyncClient(base_url=f"http://{address}:{port}") as remote:
        assert (await remote.get("/v2/")).status_code == 200  # the registry itself is served
        denied = await remote.get("/_registry/events/sinks")
        assert denied.status_code == 403
        assert denied.json()["errors"][0]["code"] == "DENIED"
        assert (await remote.get("/_registry/events/dead")).status_code == 403
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as local:
        assert (await local.get("/_registry/events/sinks")).status_code == 200


async def test_dead_and_replay_name_an_unknown_sink_and_list_the_configured_ones(
    nursery, tmp_path, sink
):
    config_path, doc = write_config(tmp_path, sink.url, free_port())
    doc["extensions"]["events"]["sinks"].append(
        {"type": "http", "address": sink.url, "name": "backup"}
    )
    config_path.write_text(json.dumps(doc))
    unknown = "registry-trio: unknown sink 'nosuch'; configured sinks: audit, backup"
    unnamed = "registry-trio: name a sink with --sink; configured sinks: audit, backup"

    async def refusals() -> list[str]:
        out = []
        for verb in ("dead", "replay"):
            for args in (("--sink", "nosuch"), ()):
                code, stdout, err = await cli_text(verb, "-c", str(config_path), *args)
                assert code == 1 and stdout == "", (verb, args)
                (line,) = err.splitlines()
                out.append(line)
        return out

    # With no server (the queue would be read directly), then with one answering.
    assert await refusals() == [unknown, unnamed] * 2
    url = await nursery.start(functools.partial(serve, parse_config(doc), shutdown=trio.Event()))
    assert await refusals() == [unknown, unnamed] * 2
    # The admin API says the same, naming its own parameter.
    async with httpx.AsyncClient(base_url=url) as http:
        missing = await http.get("/_registry/events/dead", params={"sink": "nosuch"})
        assert missing.status_code == 404
        assert missing.json()["errors"][0]["message"] == unknown.removeprefix("registry-trio: ")
        choose = await http.post("/_registry/events/dead/replay", json={})
        assert choose.status_code == 400
        assert choose.json()["errors"][0]["message"] == (
            'name a sink with "sink"; configured sinks: audit, backup'
        )


async def test_a_page_size_in_other_digits_is_refused_by_name(tmp_path):
    config_path, _ = write_config(tmp_path, "http://127.0.0.1:9/events", free_port())
    # "²" is a digit to str.isdigit(), not to int(): it once ended in a traceback.
    code, _, err = await cli_text("dead", "-c", str(config_path), "--limit", "²")
    assert code == 2 and "--limit: must be a number from 1 to 1000" in err, err
