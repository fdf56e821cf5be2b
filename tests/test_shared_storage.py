"""Two server processes on one storage root: upload sessions and repository changes are
guarded by locks both processes see (``flock``), not by the memory of one of them.

The servers are real ``registry-trio serve`` subprocesses (:mod:`tests.procs`), so one can be
``kill -9``ed while it holds a lock; ``registry-trio gc`` runs as the offline command. A request
holds an upload session for as long as its body is coming: a PATCH sent by hand
(:mod:`tests.raw_http`) that stops part-way keeps the session held, deterministically, for as
long as the test needs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import trio

from registry_trio.storage import FilesystemStorage, UploadBusy
from tests.api_helpers import OCI_MANIFEST, assert_oci_error, digest_of, random_blob
from tests.procs import ServerProcess, server_process, write_config
from tests.raw_http import RawConnection
from tests.tcp_proxy import tcp_proxy
from tests.test_gc_cli import gc_cli
from tests.test_tag_races import BARRIER_REPO, REPO, Images, put, race, replay, served_tags
from tests.test_upload_purge import make_old
from tests.waiting import eventually

MIB = 1 << 20
# Seconds each write of server A to NATS takes on its way in the JetStream race.
SLOW_LINK = 0.02
BLOB_REPO = "shared/blobs"


def server_config(directory: Path, root: Path, **overrides: object) -> Path:
    """A config in ``directory`` for a server on the shared storage ``root``."""
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(directory, storage={"rootDirectory": str(root)}, **overrides)


@contextlib.asynccontextmanager
async def two_servers(
    tmp_path: Path, a: dict[str, object] | None = None, b: dict[str, object] | None = None
) -> AsyncIterator[tuple[ServerProcess, ServerProcess]]:
    """Two servers on one storage root (``tmp_path / "registry_data"``), events off unless
    ``a`` or ``b`` (top-level config overrides) say otherwise."""
    root = tmp_path / "registry_data"
    async with (
        server_process(server_config(tmp_path / "a", root, **(a or {}))) as server_a,
        server_process(server_config(tmp_path / "b", root, **(b or {}))) as server_b,
    ):
        yield server_a, server_b


def session_path(url: str) -> str:
    """The path of a session's ``Location``, which any server on the root answers."""
    return httpx.URL(url).path


def session_file(root: Path, location: str) -> Path:
    return root / "uploads" / location.rsplit("/", 1)[1]


async def stalled_patch(url: str, location: str, body: bytes, sent: int) -> RawConnection:
    """A PATCH of ``body`` to ``url`` that has sent ``sent`` bytes of it and stops there."""
    connection = await RawConnection.open(url)
    headers = {"Content-Length": str(len(body)), "Content-Type": "application/octet-stream"}
    await connection.send_head("PATCH", session_path(location), headers)
    await connection.send(body[:sent])
    return connection


async def size_reaches(path: Path, size: int) -> None:
    """Until the server has written ``size`` bytes to the session (so it holds it)."""
    await eventually(lambda: trio.to_thread.run_sync(os.path.getsize, path), lambda n: n == size)


async def claimable(root: Path, location: str) -> bool:
    """Whether the session can be claimed now (no request of any process holds it)."""
    storage = FilesystemStorage(root, clean_tmp=False)
    upload_id = location.rsplit("/", 1)[1]
    try:
        claim = await trio.to_thread.run_sync(storage.claim_upload, BLOB_REPO, upload_id)
    except UploadBusy:
        return False
    claim.release()
    return True


async def test_one_session_takes_one_writer_across_servers(tmp_path):
    """A PATCH in one server holds the session: the other server refuses every write to it
    (409) and writes nothing; once the PATCH is done, the session finishes through the
    other server and the blob is byte-exact."""
    root = tmp_path / "registry_data"
    data = random_blob(3 * MIB)
    async with (
        two_servers(tmp_path) as (a, b),
        httpx.AsyncClient(base_url=b.url, timeout=30) as http_b,
    ):
        location = (await http_b.post(f"/v2/{BLOB_REPO}/blobs/uploads/")).headers["Location"]
        path = session_path(location)
        held = await stalled_patch(a.url, location, data[: 2 * MIB], MIB + 1000)
        await size_reaches(session_file(root, location), MIB + 1000)

        async with httpx.AsyncClient(base_url=a.url, timeout=30) as http_a:
            same_server = await http_a.patch(path, content=data[2 * MIB :])
        refused = [
            await http_b.patch(path, content=data[2 * MIB :]),
            await http_b.put(path, params={"digest": digest_of(data)}, content=data[2 * MIB :]),
            await http_b.delete(path),
            same_server,  # one server's own requests exclude each other just the same
        ]
        for response in refused:
            entry = assert_oci_error(response, 409, "BLOB_UPLOAD_INVALID")
            assert "another request" in str(entry["message"])
        assert session_file(root, location).stat().st_size == MIB + 1000

        await held.send(data[MIB + 1000 : 2 * MIB])
        response = await held.response()
        assert response.status_code == 202, response.text
        assert response.headers["Range"] == f"0-{2 * MIB - 1}"

        done = await http_b.put(path, params={"digest": digest_of(data)}, content=data[2 * MIB :])
        assert done.status_code == 201, done.text
        async with httpx.AsyncClient(base_url=a.url, timeout=30) as http_a:
            pulled = await http_a.get(f"/v2/{BLOB_REPO}/blobs/{digest_of(data)}")
        assert pulled.content == data
        assert not session_file(root, location).exists()


async def test_offline_gc_leaves_a_held_session_and_purges_it_once_released(tmp_path):
    """``registry-trio gc`` with an age the session is past (its file untouched for two
    hours) skips it while a server's request holds it, and purges it once released."""
    root = tmp_path / "registry_data"
    data = random_blob(2 * MIB)
    gc_config = tmp_path / "gc.json"
    purging = {"rootDirectory": str(root), "uploadPurging": {"age": "1h"}}
    gc_config.write_text(json.dumps({"storage": purging}))
    async with (
        server_process(server_config(tmp_path / "a", root)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        location = (await http.post(f"/v2/{BLOB_REPO}/blobs/uploads/")).headers["Location"]
        upload_id = location.rsplit("/", 1)[1]
        data_file = session_file(root, location)
        held = await stalled_patch(server.url, location, data, MIB + 1000)
        await size_reaches(data_file, MIB + 1000)
        make_old(data_file)

        assert (await gc_cli(gc_config, "--dry-run"))["purgedUploads"] == []
        assert (await gc_cli(gc_config))["purgedUploads"] == []
        assert data_file.exists()

        await held.send(data[MIB + 1000 :])
        assert (await held.response()).status_code == 202
        assert await claimable(root, location)
        make_old(data_file)
        assert (await gc_cli(gc_config))["purgedUploads"] == [upload_id]
        assert not data_file.exists()
        assert_oci_error(await http.get(location), 404, "BLOB_UPLOAD_UNKNOWN")


async def test_a_server_killed_mid_patch_leaves_the_session_free(tmp_path):
    """``kill -9`` of the server whose PATCH holds a session: the kernel drops the lock with
    the process, so the other server, which refused the session a moment before, resumes it
    from what the dead one wrote and finishes it byte-exact."""
    root = tmp_path / "registry_data"
    data = random_blob(3 * MIB)
    async with (
        two_servers(tmp_path) as (a, b),
        httpx.AsyncClient(base_url=b.url, timeout=30) as http_b,
    ):
        location = (await http_b.post(f"/v2/{BLOB_REPO}/blobs/uploads/")).headers["Location"]
        path = session_path(location)
        held = await stalled_patch(a.url, location, data[: 2 * MIB], MIB + 1000)
        await size_reaches(session_file(root, location), MIB + 1000)
        assert_oci_error(await http_b.patch(path, content=b"x"), 409, "BLOB_UPLOAD_INVALID")

        await a.kill()
        await held.stream.aclose()

        status = await http_b.get(path)
        assert status.status_code == 204, status.text
        offset = int(status.headers["Range"].split("-")[1]) + 1
        assert offset == MIB + 1000  # what the dead server wrote stays: a valid prefix
        headers = {"Content-Range": f"{offset}-{len(data) - 1}"}
        patched = await http_b.patch(path, content=data[offset:], headers=headers)
        assert patched.status_code == 202, patched.text
        done = await http_b.put(path, params={"digest": digest_of(data)})
        assert done.status_code == 201, done.text
        assert (await http_b.get(f"/v2/{BLOB_REPO}/blobs/{digest_of(data)}")).content == data


# -- repository changes ----------------------------------------------------------------------


def flocks(path: Path) -> list[tuple[bool, int]]:
    """(waiting, pid) of every flock held or waited for on ``path``, from ``/proc/locks``:
    ``1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF``, with ``->`` after the
    number for a process waiting for it."""
    inode = path.stat().st_ino
    entries = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()[1:]
        waiting = fields[0] == "->"
        kind, _, _, pid, file_id = fields[waiting : waiting + 5]
        if kind == "FLOCK" and int(file_id.rsplit(":", 1)[1]) == inode:
            entries.append((waiting, int(pid)))
    return entries


def stripe_file(root: Path, name: str) -> Path:
    layout = FilesystemStorage(root, clean_tmp=False).layout
    return layout.repository_lock(layout.repository_lock_stripe(name))


async def test_a_tag_move_waits_for_the_other_servers_change_to_be_committed(tmp_path, sink):
    """Server A (events on) moves a tag and its commit is held up (the test holds the
    outbox's write lock); server B moves the same tag meanwhile. B waits, in the kernel, on
    the repository's lock until A's event is durable, and only then writes: storage ends with
    B's move, after A's, as the order of their events says."""
    root = tmp_path / "registry_data"
    queue = tmp_path / "queue_data"
    sinks = [{"type": "http", "address": sink.url}]
    events = {"events": {"enable": True, "queue": {"directory": str(queue)}, "sinks": sinks}}
    async with (
        two_servers(tmp_path, a={"extensions": events}) as (a, b),
        httpx.AsyncClient(base_url=a.url, timeout=30) as http_a,
        httpx.AsyncClient(base_url=b.url, timeout=30) as http_b,
    ):
        images = Images()
        await images.push_blobs(http_a)
        first, second = images.make(), images.make()
        tag_file = root / "repositories" / REPO / "_manifests" / "tags" / "hot"
        outbox = sqlite3.connect(queue / "events.db", isolation_level=None)
        responses: dict[str, httpx.Response] = {}

        async def move(http: httpx.AsyncClient, body: bytes, who: str) -> None:
            responses[who] = await put(http, "hot", body)

        try:
            outbox.execute("BEGIN IMMEDIATE")  # A's commit must wait for this
            async with trio.open_nursery() as nursery:
                nursery.start_soon(move, http_a, first, "a")
                await eventually(
                    lambda: trio.to_thread.run_sync(_read_tag, tag_file),
                    lambda digest: digest == digest_of(first),
                )
                nursery.start_soon(move, http_b, second, "b")
                # B waits for the stripe's flock, which A holds across its commit.
                stripe = stripe_file(root, REPO)
                assert a.process is not None and b.process is not None
                await eventually(
                    lambda: trio.to_thread.run_sync(flocks, stripe),
                    lambda entries: (True, b.process.pid) in entries,
                )
                assert (False, a.process.pid) in flocks(stripe)
                assert _read_tag(tag_file) == digest_of(first)
                assert not responses
                outbox.execute("ROLLBACK")
        finally:
            outbox.close()
        assert responses["a"].status_code == 201, responses["a"].text
        assert responses["b"].status_code == 201, responses["b"].text
        head = await http_a.head(f"/v2/{REPO}/manifests/hot")
        assert head.headers["Docker-Content-Digest"] == digest_of(second)


def _read_tag(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


async def test_tag_races_through_two_servers_replay_to_the_served_state(tmp_path, sink):
    """Pushes of different manifests to one tag, racing through two servers that share the
    storage root and a JetStream queue, each publishing on its own connection (A's over a
    slow link, so its events come late unless the lock waits for them): replaying the
    ordered sink's stream gives exactly the tags the registry serves."""
    from tests.nats_server import nats_server

    sink_config = {"type": "http", "address": sink.url, "format": "distribution"}

    def events(name: str, nats_url: str) -> dict[str, object]:
        queue = {"type": "jetstream", "address": nats_url, "ackWait": "2s"}
        queue["directory"] = str(tmp_path / f"queue_{name}")
        return {"events": {"enable": True, "queue": queue, "sinks": [sink_config]}}

    async with (
        nats_server(tmp_path / "nats") as nats,
        tcp_proxy(nats.port, delay=SLOW_LINK) as slow,
        two_servers(
            tmp_path,
            a={"extensions": events("a", slow.url)},
            b={"extensions": events("b", nats.url)},
        ) as (a, b),
        _client(a.url) as http_a,
        _client(b.url) as http_b,
    ):
        images = Images()
        await images.push_blobs(http_a)
        for round_ in range(6):
            bodies = [images.make() for _ in range(8)]
            pushes = [
                functools.partial(put, (http_a, http_b)[i % 2], f"hot-{round_}", body)
                for i, body in enumerate(bodies)
            ]
            responses = await race(*pushes)
            assert all(r.status_code == 201 for r in responses), responses

        # The barrier: every race's events were durable before its 201, so once the ordered
        # sink has the barrier's event, it has had all of theirs.
        await images.push_blobs(http_b, BARRIER_REPO)
        response = await http_b.put(
            f"/v2/{BARRIER_REPO}/manifests/done",
            content=images.make(),
            headers={"Content-Type": OCI_MANIFEST},
        )
        assert response.status_code == 201, response.text
        received = await sink.wait_for(
            lambda evs: any(e["target"].get("tag") == "done" for e in evs), within=60
        )
        assert replay(received) == await served_tags(http_a)


def _client(url: str) -> httpx.AsyncClient:
    # Enough connections that every request of a race is in flight at once.
    return httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64))
