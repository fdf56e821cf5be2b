"""Restarts and crashes around uploads: sessions resume, and no crash leaves a bad blob.

The storage contract (SPEC guarantee 6): content is written to a temp file, verified, fsync'd
and renamed, so whatever kills the server, a blob that exists under ``blobs/`` is complete and
has the digest it is named by, and a blob whose upload was cut off does not exist.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import trio

from bench.registry_client import Blob, RegistryClient, make_image
from tests.conftest import make_config, start_registry
from tests.procs import server_process, write_config

MiB = 1 << 20


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_files(root: Path) -> dict[str, Path]:
    """Every file under ``blobs/``, keyed by the digest its path names."""
    return {
        f"{path.parent.parent.name}:{path.name}": path
        for path in (root / "blobs").rglob("*")
        if path.is_file()
    }


def assert_blobs_intact(root: Path) -> dict[str, Path]:
    """Every stored blob hashes to the digest it is stored under; the blobs."""
    blobs = blob_files(root)
    for digest, path in blobs.items():
        algorithm, encoded = digest.split(":")
        hasher = hashlib.new(algorithm)
        with open(path, "rb") as f:
            while block := f.read(MiB):
                hasher.update(block)
        assert hasher.hexdigest() == encoded, f"{path} ({path.stat().st_size} bytes) is corrupt"
    return blobs


def upload_data_files(root: Path) -> list[Path]:
    return sorted((root / "uploads").iterdir())


# -- an orderly restart in the middle of a chunked upload --------------------------------------


async def test_chunked_upload_resumes_after_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    data = os.urandom(3 * MiB + 12345)
    split = 2 * MiB + 7
    digest = _digest(data)

    async with trio.open_nursery() as nursery:
        registry = await start_registry(nursery, config)
        async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
            started = await http.post("/v2/resume/me/blobs/uploads/")
            assert started.status_code == 202
            # The restarted registry listens on another port: the session is its path.
            location = httpx.URL(started.headers["Location"]).raw_path.decode()
            first = await http.patch(
                location,
                content=data[:split],
                headers={
                    "Content-Range": f"0-{split - 1}",
                    "Content-Type": "application/octet-stream",
                },
            )
            assert first.status_code == 202, first.text
            assert first.headers["Range"] == f"0-{split - 1}"
        old_url = registry.url
        registry.shutdown.set()
    # The nursery only exits once serve() has returned: the first server is gone.
    async with httpx.AsyncClient(timeout=5) as probe:
        try:
            await probe.get(f"{old_url}/v2/")
        except httpx.ConnectError:
            pass
        else:
            raise AssertionError("the first server still answers after shutdown")

    async with trio.open_nursery() as nursery:
        registry = await start_registry(nursery, config)
        async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
            status = await http.get(location)
            assert status.status_code == 204, status.text
            assert status.headers["Range"] == f"0-{split - 1}"
            assert status.headers["Docker-Upload-UUID"] == location.rsplit("/", 1)[1]

            # The persisted offset is enforced: starting over from 0 is refused...
            rewind = await http.patch(
                location,
                content=data[split:],
                headers={"Content-Range": f"0-{len(data) - split - 1}"},
            )
            assert rewind.status_code == 416
            assert rewind.headers["Range"] == f"0-{split - 1}"
            # ...and continuing from where the first server stopped is accepted.
            rest = await http.patch(
                location,
                content=data[split:],
                headers={
                    "Content-Range": f"{split}-{len(data) - 1}",
                    "Content-Type": "application/octet-stream",
                },
            )
            assert rest.status_code == 202, rest.text
            assert rest.headers["Range"] == f"0-{len(data) - 1}"
            done = await http.put(location, params={"digest": digest})
            assert done.status_code == 201, done.text
            assert done.headers["Docker-Content-Digest"] == digest

            blob = await http.get(f"/v2/resume/me/blobs/{digest}")
            assert blob.status_code == 200
            assert blob.content == data
        registry.shutdown.set()
    assert set(assert_blobs_intact(registry.root)) == {digest}
    assert upload_data_files(registry.root) == []


# -- kill -9 ---------------------------------------------------------------------------------


async def test_kill_9_mid_upload_leaves_no_partial_blob(tmp_path: Path) -> None:
    block = os.urandom(MiB)
    total_blocks, blocks_before_gate = 64, 16
    digest = _digest(block * total_blocks)
    root = tmp_path / "registry_data"
    gate = trio.Event()  # the client holds back the last 48 MiB until the server is dead
    outcome: dict[str, object] = {}

    async def body() -> AsyncIterator[bytes]:
        for i in range(total_blocks):
            if i == blocks_before_gate:
                await gate.wait()
            for offset in range(0, MiB, 64 * 1024):
                yield block[offset : offset + 64 * 1024]

    async def upload(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            try:
                outcome["response"] = await http.post(
                    "/v2/crash/big/blobs/uploads/",
                    params={"digest": digest},
                    content=body(),
                    headers={"Content-Type": "application/octet-stream"},
                )
            except httpx.TransportError as exc:
                outcome["error"] = exc

    def staged_files() -> list[Path]:
        # A monolithic POST streams into one staging file under tmp/ (no session).
        return sorted((root / "tmp").iterdir())

    def partial_size() -> int:
        return max((p.stat().st_size for p in staged_files()), default=0)

    async with server_process(write_config(tmp_path)) as server:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload, server.url)
                # Kill while the server is writing the body: 8 of the 16 MiB sent are on disk.
                await server.wait_until(lambda: partial_size() >= 8 * MiB)
                await server.kill()
                gate.set()
        assert server.process is not None and server.process.returncode == -9
        assert "error" in outcome, f"the upload did not fail: {outcome}"
        [partial] = staged_files()
        assert 8 * MiB <= partial.stat().st_size < total_blocks * MiB
        assert digest not in blob_files(root)

        await server.start()
        # The cut-off staging file was never visible, and the new process cleared it away.
        assert staged_files() == []
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            head = await http.head(f"/v2/crash/big/blobs/{digest}")
            assert head.status_code == 404
            assert digest not in blob_files(root)
            # The registry still works after the crash: push the whole blob now.
            again = await http.post(
                "/v2/crash/big/blobs/uploads/",
                params={"digest": digest},
                content=block * total_blocks,
                headers={"Content-Type": "application/octet-stream"},
            )
            assert again.status_code == 201, again.text
    blobs = assert_blobs_intact(root)
    assert blobs[digest].stat().st_size == total_blocks * MiB
    assert not list((root / "tmp").iterdir())


async def test_kill_9_mid_chunk_keeps_a_resumable_session_and_no_blob(tmp_path: Path) -> None:
    block = os.urandom(MiB)
    total_blocks, blocks_before_gate = 64, 16
    data = block * total_blocks
    digest = _digest(data)
    root = tmp_path / "registry_data"
    gate = trio.Event()  # the client holds back the last 48 MiB until the server is dead
    outcome: dict[str, object] = {}

    async def body() -> AsyncIterator[bytes]:
        for i in range(total_blocks):
            if i == blocks_before_gate:
                await gate.wait()
            for offset in range(0, MiB, 64 * 1024):
                yield block[offset : offset + 64 * 1024]

    async def stream_chunk(http: httpx.AsyncClient, location: str) -> None:
        # A streamed PATCH without Content-Range, as docker sends a layer.
        try:
            outcome["response"] = await http.patch(location, content=body())
        except httpx.TransportError as exc:
            outcome["error"] = exc

    async with server_process(write_config(tmp_path)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            started = await http.post("/v2/crash/chunked/blobs/uploads/")
            assert started.status_code == 202
            # The restarted registry listens on another port: the session is its path.
            location = httpx.URL(started.headers["Location"]).raw_path.decode()
            session_data = root / "uploads" / location.rsplit("/", 1)[1]
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stream_chunk, http, location)
                    await server.wait_until(
                        lambda: session_data.exists() and session_data.stat().st_size >= 8 * MiB
                    )
                    await server.kill()
                    gate.set()
        assert server.process is not None and server.process.returncode == -9
        assert "error" in outcome, f"the PATCH did not fail: {outcome}"
        partial = session_data.stat().st_size
        assert 8 * MiB <= partial < len(data)
        assert digest not in blob_files(root)

        await server.start()
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            head = await http.head(f"/v2/crash/chunked/blobs/{digest}")
            assert head.status_code == 404
            # The session survived with exactly the bytes that reached the disk...
            status = await http.get(location)
            assert status.status_code == 204
            assert status.headers["Range"] == f"0-{partial - 1}"
            # ...and they are a true prefix: resuming from there yields the right blob.
            rest = await http.patch(
                location,
                content=data[partial:],
                headers={"Content-Range": f"{partial}-{len(data) - 1}"},
            )
            assert rest.status_code == 202, rest.text
            done = await http.put(location, params={"digest": digest})
            assert done.status_code == 201, done.text
            blob = await http.get(f"/v2/crash/chunked/blobs/{digest}")
            assert blob.status_code == 200 and blob.content == data
    blobs = assert_blobs_intact(root)
    assert blobs[digest].stat().st_size == len(data)
    assert upload_data_files(root) == []


async def test_kill_9_after_completed_push_keeps_blob_and_image(tmp_path: Path) -> None:
    image = make_image((8 * MiB, 1024))
    root = tmp_path / "registry_data"
    extra = Blob(os.urandom(3 * MiB))

    async with server_process(write_config(tmp_path)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            pushed = await http.post(
                "/v2/crash/done/blobs/uploads/",
                params={"digest": extra.digest},
                content=extra.data,
                headers={"Content-Type": "application/octet-stream"},
            )
            assert pushed.status_code == 201, pushed.text
            tagged = await RegistryClient(server.url, client=http).push_image(
                "crash/done", "v1", image
            )
            assert tagged.status_code == 201
        # The client has its 201s: kill -9 at once, no graceful shutdown of any kind.
        await server.kill()
        assert server.process is not None and server.process.returncode == -9

        await server.start()
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            blob = await http.get(f"/v2/crash/done/blobs/{extra.digest}")
            assert blob.status_code == 200
            assert blob.content == extra.data
            client = RegistryClient(server.url, client=http)
            assert await client.pull_image("crash/done", "v1") == image.manifest
    blobs = assert_blobs_intact(root)
    for stored in (extra, image.config, *image.layers):
        assert stored.digest in blobs
    assert upload_data_files(root) == []
