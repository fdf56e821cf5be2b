"""Several worker processes behind one supervisor: real processes, killed with ``kill -9``.

Every test runs ``registry-trio serve`` with ``http.workers: 2`` as a subprocess, a real HTTP
sink, and real clients on fresh connections (so that both workers take some).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from bench.registry_client import RegistryClient, make_image
from tests.procs import ServerProcess, server_process, write_config
from tests.raw_http import RawConnection
from tests.sink import HTTPSinkServer
from tests.test_instance_lock import assert_refused, registry_trio

UPDATED = "zotregistry.image.updated"


def workers_config(tmp_path: Path, sink: HTTPSinkServer, workers: int = 2) -> Path:
    events = {
        "enable": True,
        "queue": {"directory": str((tmp_path / "queue_data").resolve())},
        "shutdownTimeout": "5s",
        "sinks": [
            {
                "type": "http",
                "address": sink.url,
                "timeout": "2s",
                "retry": {"initialBackoff": "10ms", "maxBackoff": "100ms"},
            }
        ],
    }
    return write_config(tmp_path, http={"workers": workers}, extensions={"events": events})


async def push(url: str, repository: str, tag: str, seed: bytes) -> httpx.Response:
    """One image on a connection of its own: the kernel picks the worker that accepts it."""
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        try:
            return await RegistryClient(url, client=http).push_image(
                repository, tag, make_image((256,), seed=seed)
            )
        except httpx.HTTPStatusError as exc:
            return exc.response


async def admin_status(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        response = await http.get("/_registry/events/sinks")
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer


def updated(sink: HTTPSinkServer) -> list[dict[str, Any]]:
    return [e for e in sink.events() if e["type"] == UPDATED]


def request_ids(sink: HTTPSinkServer) -> set[str]:
    return {e["data"]["request"]["id"] for e in updated(sink)}


def served_by(server: ServerProcess) -> set[str]:
    """The workers that wrote an access line."""
    return set(re.findall(r"\[(worker \d)\] registry_trio\.access", server.current_output))


async def leader_pid(server: ServerProcess, other_than: int | None = None) -> int:
    """The delivering worker's pid, as the admin API tells it (once it is not ``other_than``)."""
    with trio.fail_after(10):
        while True:
            deliverer = (await admin_status(server.url))["deliverer"]
            if deliverer is not None and deliverer["pid"] != other_than:
                assert deliverer["pid"] in server.children()
                return int(deliverer["pid"])
            await trio.sleep(0.05)  # ok-sleep: polling the admin API under a deadline


async def test_two_workers_serve_pushes_and_pulls_and_metrics_count_both(nursery, tmp_path):
    sink = HTTPSinkServer()
    await sink.start(nursery)
    async with server_process(workers_config(tmp_path, sink)) as server:
        assert len(server.children()) == 2
        images = {f"v{i}": make_image((256,), seed=f"img{i}".encode()) for i in range(12)}
        tally = 0
        for tag, image in images.items():
            # A fresh connection per image, so the kernel spreads them over both workers.
            async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
                client = RegistryClient(server.url, client=http)
                response = await client.push_image("multi/app", tag, image)
                assert response.status_code == 201
                tally += 5  # 2 blob HEADs, 2 blob uploads (one POST each), 1 manifest PUT
        for tag, image in images.items():
            async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
                pulled = await http.get(f"/v2/multi/app/manifests/{tag}")
                assert pulled.status_code == 200
                assert pulled.content == image.manifest
                assert pulled.headers["Docker-Content-Digest"] == image.digest
                for blob in (image.config, *image.layers):
                    got = await http.get(f"/v2/multi/app/blobs/{blob.digest}")
                    assert got.status_code == 200 and got.content == blob.data
                tally += 3
        assert served_by(server) == {"worker 1", "worker 2"}, server.current_output
        # Periodic maintenance runs in the leader only (its first run is at start-up).
        maintainers = re.findall(
            r"\[(worker \d)\] registry_trio\.maintenance uploads: purged", server.current_output
        )
        assert len(set(maintainers)) == 1, server.current_output

        async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
            scrape = (await http.get("/metrics")).text
        counted = sum(
            float(value)
            for route, value in re.findall(
                r'^registry_http_requests_total\{[^}]*route="([^"]*)"[^}]*\} (\S+)$',
                scrape,
                re.MULTILINE,
            )
            if route != "/metrics"
        )
        assert counted == tally, scrape
        # The operator's status says which worker delivers, as the admin API does.
        leader = await leader_pid(server)
        # The command finds the server by the config's address: the port it got, not 0.
        config = json.loads(server.config.read_text())
        config["http"]["port"] = int(server.url.rsplit(":", 1)[1])
        (tmp_path / "cli.json").write_text(json.dumps(config))
        status = await registry_trio("events", "status", "-c", str(tmp_path / "cli.json"))
        assert status.returncode == 0, status.stderr
        assert re.search(
            rf"^delivered by: worker [12], pid {leader}$", status.stdout.decode(), re.MULTILINE
        ), status.stdout
        await sink.wait_for(lambda events: len(updated(sink)) == len(images))


async def test_an_event_committed_by_either_worker_is_delivered_at_once(nursery, tmp_path):
    """The worker that commits wakes the one that delivers: no wait for its idle poll (2 s)."""
    sink = HTTPSinkServer()
    await sink.start(nursery)
    async with server_process(workers_config(tmp_path, sink)) as server:
        for i in range(16):
            response = await push(server.url, "wake/app", f"v{i}", f"wake{i}".encode())
            assert response.status_code == 201
            acknowledged = trio.current_time()
            wanted = response.headers["X-Request-Id"]
            await sink.wait_for(lambda events, wanted=wanted: wanted in request_ids(sink))
            lag = trio.current_time() - acknowledged
            assert lag < 1.0, f"event {i} arrived {lag:.2f}s after its 2xx"
        assert served_by(server) == {"worker 1", "worker 2"}


@pytest.mark.parametrize("victim", ["the delivering worker", "the other worker"])
async def test_kill_9_of_a_worker_under_push_load_loses_no_acknowledged_event(
    nursery, tmp_path, victim
):
    sink = HTTPSinkServer()
    await sink.start(nursery)
    async with server_process(workers_config(tmp_path, sink)) as server:
        leader = await leader_pid(server)
        (other,) = set(server.children()) - {leader}
        target = leader if victim == "the delivering worker" else other
        # Per repository, the request ids of acknowledged pushes, in the order acknowledged.
        acknowledged: dict[str, list[str]] = defaultdict(list)
        killed = trio.Event()
        after_kill: list[str] = []

        async def pusher(n: int) -> None:
            repository = f"load/r{n}"
            for i in range(40):
                try:
                    response = await push(server.url, repository, f"t{i}", f"{n}-{i}".encode())
                except httpx.TransportError:
                    continue  # the connection died with its worker: not acknowledged
                assert response.status_code < 500, server.current_output
                if response.status_code == 201:
                    acknowledged[repository].append(response.headers["X-Request-Id"])
                    if killed.is_set():
                        after_kill.append(response.headers["X-Request-Id"])

        async with trio.open_nursery() as load:
            for n in range(4):
                load.start_soon(pusher, n)
            await sink.wait_for(lambda events: len(updated(sink)) >= 10)
            os.kill(target, signal.SIGKILL)
            killed_at = trio.current_time()
            killed.set()
            if victim == "the delivering worker":
                # Another worker leads within the documented bound (the lock's 0.1 s poll;
                # the rest is this admin request served under push load).
                await leader_pid(server, other_than=target)
                takeover = trio.current_time() - killed_at
                assert takeover < 2.0, f"no worker took over delivery for {takeover:.2f}s"

        assert after_kill, "no push was acknowledged after the kill"
        everything = {rid for ids in acknowledged.values() for rid in ids}
        await sink.wait_for(lambda events: everything <= request_ids(sink), within=30)

        # Per repository, first receipts come in the order the pushes were acknowledged (the
        # sink is ordered; a redelivery after the kill may repeat an event, never reorder).
        first_seen: dict[str, list[str]] = defaultdict(list)
        seen: set[str] = set()
        for event in updated(sink):
            rid = event["data"]["request"]["id"]
            if rid not in seen:
                seen.add(rid)
                first_seen[event["data"]["name"]].append(rid)
        for repository, ids in acknowledged.items():
            assert [r for r in first_seen[repository] if r in set(ids)] == ids, repository

        # The supervisor started the worker again, and one worker delivers.
        await server.wait_for_output(re.compile(rb"was killed by SIGKILL; starting it again"))
        await server.wait_until(lambda: target not in server.children(), 20)
        await server.wait_for_output(re.compile(rb"\[worker \d\] registry_trio worker \d serving"))
        now_leading = await leader_pid(server, other_than=target)
        if victim == "the other worker":
            assert now_leading == leader


async def connection_on_each_worker(server: ServerProcess) -> dict[str, RawConnection]:
    """A kept-alive connection accepted by each worker (the access log tells which)."""
    found: dict[str, RawConnection] = {}
    with trio.fail_after(20):
        while len(found) < 2:
            connection = await RawConnection.open(server.url)
            local_port = connection.stream.socket.getsockname()[1]
            await connection.send_head("GET", "/v2/", {})
            assert (await connection.response()).status_code == 200
            pattern = rf"\[(worker \d)\] registry_trio\.access \S+ 127\.0\.0\.1:{local_port} "
            match = await server.wait_for_output(re.compile(pattern.encode()))
            worker = match[1].decode()
            if worker in found:
                await connection.stream.aclose()
            else:
                found[worker] = connection
    return found


async def test_one_upload_session_takes_one_writer_whichever_worker_serves_it(nursery, tmp_path):
    sink = HTTPSinkServer()
    await sink.start(nursery)
    async with server_process(workers_config(tmp_path, sink)) as server:
        first, second = (await connection_on_each_worker(server)).values()
        async with httpx.AsyncClient(base_url=server.url) as http:
            session = await http.post("/v2/shared/app/blobs/uploads/")
        location = session.headers["Location"]
        part_one, part_two = b"1" * 50_000, b"2" * 30_000

        # Worker A holds the session: its PATCH has sent half its body and waits.
        await first.send_head(
            "PATCH", location, {"Content-Length": str(len(part_one)), "Content-Range": "0-49999"}
        )
        await first.send(part_one[:25_000])
        await server.wait_until(
            lambda: any(
                p.stat().st_size > 0 for p in (tmp_path / "registry_data" / "uploads").iterdir()
            )
        )
        # Worker B may not write into it meanwhile, nor finish or cancel it.
        for method, headers in (
            ("PATCH", {"Content-Length": "3", "Content-Range": "25000-25002"}),
            ("DELETE", {"Content-Length": "0"}),
        ):
            await second.send_head(method, location, headers)
            if method == "PATCH":
                await second.send(b"xyz")
            refused = await second.response()
            assert refused.status_code == 409, (method, refused.text)
            assert refused.json()["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"

        await first.send(part_one[25_000:])
        assert (await first.response()).status_code == 202
        # The session goes on through the other worker, and the blob is what was sent.
        blob = part_one + part_two
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        await second.send_head(
            "PUT",
            f"{location}{'&' if '?' in location else '?'}digest={digest}",
            {"Content-Length": str(len(part_two)), "Content-Range": "50000-79999"},
        )
        await second.send(part_two)
        assert (await second.response()).status_code == 201
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.get(f"/v2/shared/app/blobs/{digest}")).content == blob


async def test_sigterm_drains_every_worker_and_a_second_instance_is_refused(nursery, tmp_path):
    sink = HTTPSinkServer()
    await sink.start(nursery)
    config = workers_config(tmp_path, sink)
    async with server_process(config) as server:
        workers = server.children()
        assert len(workers) == 2
        # The same queue directory: refused, whether one process or several.
        await assert_refused(config, (tmp_path / "queue_data").resolve())
        (tmp_path / "other").mkdir()
        one_process = write_config(
            tmp_path / "other",
            http={"workers": 1},
            extensions={
                "events": {
                    "enable": True,
                    "queue": {"directory": str((tmp_path / "queue_data").resolve())},
                }
            },
        )
        await assert_refused(one_process, (tmp_path / "queue_data").resolve())

        # A request under way when SIGTERM arrives completes: its body's second half is sent
        # only once both workers have begun to shut down.
        first_half_sent, release = trio.Event(), trio.Event()

        async def body():  # type: ignore[no-untyped-def]
            yield b"a" * 65536
            first_half_sent.set()
            await release.wait()
            yield b"b" * 65536

        answers: list[httpx.Response] = []
        exit_codes: list[int] = []
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
            session = await http.post("/v2/drain/app/blobs/uploads/")
            assert session.status_code == 202

            async def patch() -> None:
                answers.append(await http.patch(session.headers["Location"], content=body()))

            async def terminate() -> None:
                exit_codes.append(await server.terminate())

            async with trio.open_nursery() as requests:
                requests.start_soon(patch)
                await first_half_sent.wait()
                requests.start_soon(terminate)
                for n in (1, 2):
                    await server.wait_for_output(f"[worker {n}] registry_trio SIGTERM".encode())
                release.set()
        (answer,) = answers
        assert answer.status_code == 202, answer.text
        assert answer.headers["Range"] == "0-131071"
        assert exit_codes == [0]
        for pid in workers:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)  # the worker is gone
        assert "Traceback" not in server.current_output
