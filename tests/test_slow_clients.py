"""Slow and idle clients cannot hold the server's memory or its connections.

Against a real server, with connections driven by hand: idle keep-alive connections are
closed after the keep-alive timeout on every route, HTTP/1.0 and ``Connection: close`` ones
at once; a request body that stalls or trickles is answered 408 and its connection closed
after ``http.bodyIdleTimeout`` / under ``http.bodyMinRate``, while a slow body that keeps
coming is not cut; 200 uploads stalled after 1 MiB (and 50 manifests) keep the server under
150 MB, measured on a subprocess server from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from registry_trio.server import KEEP_ALIVE_TIMEOUT
from tests.api_helpers import (
    OCI_MANIFEST,
    assert_oci_error,
    digest_of,
    push_image,
)
from tests.conftest import make_config, start_registry
from tests.procs import ServerProcess, server_process, write_config
from tests.raw_http import RawConnection

MIB = 1 << 20
# How long a refused or finished connection may take to be seen closed, well under the
# keep-alive timeout so that "at once" is told apart from "when idle".
AT_ONCE = 2.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


@contextlib.asynccontextmanager
async def subprocess_registry(tmp_path: Path, **http: object) -> AsyncIterator[ServerProcess]:
    config = write_config(tmp_path, http={"address": "127.0.0.1", "port": 0, **http})
    async with server_process(config) as server:
        yield server


async def routes_of(url: str) -> list[tuple[str, str]]:
    """(method, path) for every kind of route: Quart's, 404s, and the raw blob, upload and
    manifest routes, on content that exists."""
    async with httpx.AsyncClient(base_url=url) as http:
        manifest = json.loads(await push_image(http, "repo", "v1"))
        layer = manifest["layers"][0]["digest"]
        session = (await http.post("/v2/repo/blobs/uploads/")).headers["Location"]
    return [
        ("GET", "/v2/"),
        ("GET", "/metrics"),
        ("GET", "/v2/_catalog"),
        ("GET", "/v2/repo/tags/list"),
        ("GET", f"/v2/repo/referrers/{layer}"),
        ("GET", "/_registry/events/sinks"),
        ("GET", "/no/such/endpoint"),
        ("GET", f"/v2/repo/blobs/{layer}"),
        ("HEAD", f"/v2/repo/blobs/{layer}"),
        ("GET", "/v2/repo/manifests/v1"),
        ("GET", session),
        ("POST", "/v2/repo/blobs/uploads/"),
    ]


async def served_then_closed(
    url: str, routes: list[tuple[str, str]], version: str, headers: dict[str, str]
) -> dict[str, float]:
    """Send one request per route, each on its own connection, read the response, and time
    how long each connection then stays open (all at once)."""
    closed_after: dict[str, float] = {}

    async def one(method: str, path: str) -> None:
        connection = await RawConnection.open(url)
        async with connection.stream:
            await connection.send_head(method, path, headers, version)
            response = await connection.response(method)
            assert response.status_code < 500, (path, response.text)
            closed_after[f"{method} {path}"] = await connection.wait_closed()

    async with trio.open_nursery() as nursery:
        for method, path in routes:
            nursery.start_soon(one, method, path)
    return closed_after


async def test_idle_keep_alive_connections_are_closed_on_every_route(tmp_path):
    async with subprocess_registry(tmp_path) as server:
        pid = server.process.pid
        routes = await routes_of(server.url)
        baseline = open_fds(pid)
        with trio.fail_after(KEEP_ALIVE_TIMEOUT + 10):
            closed_after = await served_then_closed(server.url, routes, "HTTP/1.1", {})
        # Closed by the keep-alive timeout, not earlier (the connection was reusable).
        assert min(closed_after.values()) >= KEEP_ALIVE_TIMEOUT - 0.5, closed_after
        await server.wait_until(lambda: open_fds(pid) <= baseline, 5)


@pytest.mark.parametrize(
    ("version", "headers"),
    [("HTTP/1.0", {}), ("HTTP/1.1", {"Connection": "close"})],
    ids=["http-1.0", "connection-close"],
)
async def test_connections_that_ask_to_close_are_closed_at_once_on_every_route(
    tmp_path, version, headers
):
    async with subprocess_registry(tmp_path) as server:
        routes = await routes_of(server.url)
        with trio.fail_after(KEEP_ALIVE_TIMEOUT + 10):
            closed_after = await served_then_closed(server.url, routes, version, headers)
        assert max(closed_after.values()) < AT_ONCE, closed_after


def padded_manifest(manifest: bytes, size: int) -> bytes:
    """``manifest`` padded with an annotation to exactly ``size`` bytes."""
    doc = json.loads(manifest)
    doc["annotations"] = {"pad": ""}
    pad = size - len(json.dumps(doc).encode())
    doc["annotations"]["pad"] = "p" * pad
    body = json.dumps(doc).encode()
    assert len(body) == size
    return body


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


async def test_stalled_uploads_hold_no_memory_and_are_dropped_after_the_idle_timeout(tmp_path):
    """200 PATCHes that send ~1 MiB of 2 MiB and stop, 50 manifest PUTs likewise, and 50
    chunked bodies to a Quart route (``/metrics``): the server writes what came to disk, or
    drops it, and stays under 150 MB; those that resume finish whole; the rest get 408 (or,
    already answered, are closed) after ``bodyIdleTimeout``, their bytes undone."""
    patches, manifests, quarts, resuming, size, sent = 200, 50, 50, 10, 2 * MIB, MIB - 4096
    idle = 15
    async with subprocess_registry(tmp_path, bodyIdleTimeout=f"{idle}s") as server:
        pid, root = server.process.pid, tmp_path / "registry_data"
        async with httpx.AsyncClient(base_url=server.url) as http:
            sessions = [
                (await http.post(f"/v2/stall/{i % 5}/blobs/uploads/")).headers["Location"]
                for i in range(patches)
            ]
            manifest = padded_manifest(await push_image(http, "stall/m", "base"), size)
        baseline_fds = open_fds(pid)
        uploads: list[RawConnection] = []
        puts: dict[str, RawConnection] = {}
        gets: list[RawConnection] = []
        # Connections opened 50 at a time (the listen backlog is 100), each sending as soon
        # as it is open: all 250 bodies come in at about the same time.
        connecting = trio.CapacityLimiter(50)
        length = {"Content-Length": str(size)}

        async def stall(method: str, path: str, body: bytes) -> None:
            async with connecting:
                connection = await RawConnection.open(server.url)
            if method == "PUT":
                puts[path] = connection
                headers = {**length, "Content-Type": OCI_MANIFEST}
            elif method == "PATCH":
                uploads.append(connection)
                headers = length
            else:
                gets.append(connection)
                headers = {"Transfer-Encoding": "chunked"}
            await connection.send_head(method, path, headers)
            await connection.send(body)

        async with trio.open_nursery() as nursery:
            for session in sessions:
                nursery.start_soon(stall, "PATCH", session, bytes(sent))
            for i in range(manifests):
                nursery.start_soon(stall, "PUT", f"/v2/stall/m/manifests/t{i}", manifest[:sent])
            chunk = b"10000\r\n" + bytes(1 << 16) + b"\r\n"
            for _ in range(quarts):
                nursery.start_soon(stall, "GET", "/metrics", chunk * 16)

        # What came is written out (upload sessions, staged manifests), not held in memory;
        # a file's last few KiB may still sit in its write buffer.
        def written_out() -> bool:
            files = [*(root / "uploads").iterdir(), *(root / "tmp").iterdir()]
            done = [f for f in files if f.stat().st_size > sent - io.DEFAULT_BUFFER_SIZE]
            return len(done) == patches + manifests

        with contextlib.suppress(trio.TooSlowError):
            await server.wait_until(written_out, 20)
        rss = rss_mb(pid)
        assert rss < 150, f"{rss:.0f} MB with {patches + manifests + quarts} stalled bodies"
        assert written_out()

        # Those that go on before the idle timeout are not cut.
        async with trio.open_nursery() as nursery:
            for connection in uploads[:resuming]:
                nursery.start_soon(finish, connection, bytes(size - sent), 202)
            for path in list(puts)[:resuming]:
                nursery.start_soon(finish, puts.pop(path), manifest[sent:], 201)
        async with httpx.AsyncClient(base_url=server.url) as http:
            tags = (await http.get("/v2/stall/m/tags/list")).json()["tags"]
            assert len(tags) == 1 + resuming  # with "base"
            assert (await http.get(f"/v2/stall/m/manifests/{tags[-1]}")).content == manifest

        # The others are given up: 408, connection closed, their bytes undone.
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for connection in uploads[resuming:] + list(puts.values()):
                nursery.start_soon(expect_timeout, connection, f"nothing of it arrived for {idle}s")
            for connection in gets:
                nursery.start_soon(answered_then_closed, connection)
        assert trio.current_time() - started < idle + 10
        await server.wait_until(lambda: open_fds(pid) <= baseline_fds, 10)
        assert dir_bytes(root / "uploads") == resuming * size  # the dropped PATCHes undone
        assert dir_bytes(root / "tmp") == 0
        rss = rss_mb(pid)
        assert rss < 150, f"{rss:.0f} MB once the stalled bodies were dropped"


async def finish(connection: RawConnection, rest: bytes, status: int) -> None:
    async with connection.stream:
        await connection.send(rest)
        response = await connection.response()
        assert response.status_code == status, response.text
        if status == 202:
            assert response.headers["Range"] == f"0-{2 * MIB - 1}"


async def answered_then_closed(connection: RawConnection) -> None:
    async with connection.stream:
        assert (await connection.response()).status_code == 200
        await connection.wait_closed()


async def expect_timeout(connection: RawConnection, says: str) -> None:
    async with connection.stream:
        response = await connection.response()
        entry = assert_oci_error(response, 408, "BLOB_UPLOAD_INVALID")
        assert says in str(entry["message"]), entry
        assert response.headers["Connection"] == "close"
        assert await connection.wait_closed() < AT_ONCE


async def test_a_trickling_body_is_given_up_and_a_slow_steady_one_is_not(nursery, tmp_path):
    """With ``bodyIdleTimeout`` 1s and ``bodyMinRate`` 2000 B/s: a chunked body sending a byte
    every 0.3 s never idles 1 s, yet is given up for its rate; a body sending 16 KiB every
    0.5 s (32 KB/s, paused longer than the server buffers, for several idle timeouts in all)
    is stored whole; one that stops gets the idle message."""
    config = make_config(tmp_path, http={"bodyIdleTimeout": "1s", "bodyMinRate": 2000})
    registry = await start_registry(nursery, config)
    async with httpx.AsyncClient(base_url=registry.url) as http:
        trickle, steady, stopped = [
            (await http.post("/v2/slow/blobs/uploads/")).headers["Location"] for _ in range(3)
        ]

        async def trickling() -> None:
            connection = await RawConnection.open(registry.url)
            await connection.send_head("PATCH", trickle, {"Transfer-Encoding": "chunked"})

            async def drip() -> None:
                # Until the server hangs up, or the test closes the connection.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while True:
                        await connection.send(b"1\r\nx\r\n")
                        await trio.sleep(0.3)  # ok-sleep: the client's pace, not a wait

            async with trio.open_nursery() as client:
                client.start_soon(drip)
                await expect_timeout(connection, "slower than 2000 bytes/s")
                client.cancel_scope.cancel()

        async def steadily() -> None:
            block, blocks = 16 * 1024, 8
            connection = await RawConnection.open(registry.url)
            async with connection.stream:
                length = {"Content-Length": str(block * blocks)}
                await connection.send_head("PATCH", steady, length)
                for _ in range(blocks):
                    await connection.send(bytes(block))
                    await trio.sleep(0.5)  # ok-sleep: the client's pace, not a wait
                response = await connection.response()
                assert response.status_code == 202, response.text
                assert response.headers["Range"] == f"0-{block * blocks - 1}"

        async def stopping() -> None:
            connection = await RawConnection.open(registry.url)
            await connection.send_head("PATCH", stopped, {"Content-Length": "1000"})
            await connection.send(bytes(10))
            await expect_timeout(connection, "nothing of it arrived for 1s")

        with trio.fail_after(20):
            async with trio.open_nursery() as clients:
                clients.start_soon(trickling)
                clients.start_soon(steadily)
                clients.start_soon(stopping)
        for session, held in ((trickle, 0), (steady, 8 * 16 * 1024), (stopped, 0)):
            status = await http.get(session)
            assert status.headers["Range"] == f"0-{max(held - 1, 0)}", session


async def test_a_stalled_body_is_given_up_on_every_route(nursery, tmp_path):
    """A body that stops is dropped whoever serves the request: a Quart route that ignores
    the body (answered, then closed), one that reads it (408), a request refused before its
    body was read (answered, then closed), a manifest and a monolithic upload (408)."""
    queue = {"directory": str(tmp_path / "queue_data")}
    config = make_config(
        tmp_path,
        http={"bodyIdleTimeout": "1s"},
        extensions={"events": {"enable": True, "queue": queue}},  # for the replay route
    )
    registry = await start_registry(nursery, config)
    cases = [
        ("GET", "/metrics", 200),
        ("POST", "/_registry/events/dead/replay", 408),
        ("PUT", "/v2/repo/blobs/uploads/any?digest=sha256:short", 400),
        ("PUT", "/v2/repo/manifests/v1", 408),
        ("POST", f"/v2/repo/blobs/uploads/?digest={digest_of(b'layer')}", 408),
    ]

    async def one(method: str, path: str, status: int) -> None:
        connection = await RawConnection.open(registry.url)
        async with connection.stream:
            await connection.send_head(method, path, {"Content-Length": "1000"})
            await connection.send(b"{" * 10)
            response = await connection.response()
            if status == 408:
                entry = assert_oci_error(response, 408, "BLOB_UPLOAD_INVALID")
                assert "nothing of it arrived for 1s" in str(entry["message"])
            else:
                assert response.status_code == status, response.text
            assert await connection.wait_closed() < 1 + AT_ONCE

    with trio.fail_after(20):
        async with trio.open_nursery() as clients:
            for method, path, status in cases:
                clients.start_soon(one, method, path, status)
    assert not list((registry.root / "tmp").iterdir())
