"""A full disk: 507 with an OCI body, one log line, nothing half-written, serving once freed.

The storage root (or the event queue) lives on a real 4 MiB tmpfs that the test fills with a
file of its own; the kernel's ENOSPC is what the registry sees. The test runs as root, as
the development machines and CI do, to mount it.
"""

from __future__ import annotations

import errno
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.api_helpers import (
    OCI_MANIFEST,
    assert_oci_error,
    config_blob,
    digest_of,
    image_manifest,
    push_blob,
    push_manifest,
    random_blob,
)
from tests.conftest import counts_until, events_config, make_config, start_registry

REPO = "full/app"
SESSION_BYTES = 100


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted at the end whatever happened."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        check=True,
        capture_output=True,
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(disk: Path, leave: int = 0) -> None:
    """Take the disk's free space with a file of its own, leaving about ``leave`` bytes."""
    filler = disk / f"filler-{len(list(disk.glob('filler-*')))}"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(64 * 1024))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        f.truncate(max(f.tell() - leave, 0))


def free(disk: Path) -> None:
    for filler in disk.glob("filler-*"):
        filler.unlink()


def full_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The log lines about a full disk; none of the log looks like a crash."""
    for record in caplog.records:
        assert record.exc_info is None, record.getMessage()
        assert "unhandled error" not in record.getMessage()
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def assert_storage_full(response: httpx.Response) -> None:
    entry = assert_oci_error(response, 507, "UNAVAILABLE")
    assert "storage is full" in str(entry["message"])


async def test_full_storage_answers_507_keeps_nothing_and_recovers(nursery, small_disk, caplog):
    root = small_disk / "registry_data"
    registry = await start_registry(
        nursery, make_config(small_disk, storage={"rootDirectory": str(root)})
    )
    config, layer = config_blob(), random_blob(1000)
    streamed = random_blob(2 << 20)  # more than one read: written as it streams in
    # The last chunk needs pages of its own (the session's first page has room left).
    chunk, last_chunk = random_blob(600 * 1024), random_blob(64 * 1024)
    manifest = image_manifest(config, [layer])
    async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
        session = (await http.post(f"/v2/{REPO}/blobs/uploads/")).headers["Location"]
        first_chunk = random_blob(SESSION_BYTES)
        assert (await http.patch(session, content=first_chunk)).status_code == 202

        async def session_range() -> str:
            response = await http.get(session)
            assert response.status_code == 204
            return response.headers["Range"]

        async def refused(method: str, url: str, content: bytes, **params: str) -> None:
            response = await http.request(method, url, content=content, params=params)
            assert_storage_full(response)
            assert list((root / "tmp").iterdir()) == []  # nothing half-written left behind
            assert await session_range() == f"0-{SESSION_BYTES - 1}"

        # Room for the first part of a streamed body only: it fails half-way.
        await trio.to_thread.run_sync(fill, small_disk, 1280 * 1024)
        await refused("POST", f"/v2/{REPO}/blobs/uploads/", streamed, digest=digest_of(streamed))
        # Room for part of a chunk: what was written of it is rolled back, whether the chunk
        # came in one read or streamed in several.
        await trio.to_thread.run_sync(fill, small_disk, 100 * 1024)
        await refused("PATCH", session, chunk)
        free(small_disk)
        await trio.to_thread.run_sync(fill, small_disk, 1280 * 1024)
        await refused("PATCH", session, streamed)
        await trio.to_thread.run_sync(fill, small_disk)
        await refused("POST", f"/v2/{REPO}/blobs/uploads/", layer, digest=digest_of(layer))
        final = digest_of(first_chunk + last_chunk)
        await refused("PUT", session, last_chunk, digest=final)
        for blob in (streamed, layer):
            assert (await http.head(f"/v2/{REPO}/blobs/{digest_of(blob)}")).status_code == 404

        # A manifest: its blobs were pushed before the disk filled up.
        free(small_disk)
        await push_blob(http, REPO, config)
        await push_blob(http, REPO, layer)
        await trio.to_thread.run_sync(fill, small_disk)
        response = await http.put(
            f"/v2/{REPO}/manifests/v1", content=manifest, headers={"Content-Type": OCI_MANIFEST}
        )
        assert_storage_full(response)
        assert list((root / "tmp").iterdir()) == []
        assert (await http.get(f"/v2/{REPO}/manifests/v1")).status_code == 404

        errors = full_errors(caplog)
        assert len(errors) == 6, errors  # one line per refused request
        for line in errors:
            assert line.startswith("storage full: No space left on device"), line
            assert f"filesystem of {root}" in line and "bytes free" in line, line

        # Space is back: every refused push goes through, the session where it was.
        free(small_disk)
        await push_blob(http, REPO, streamed)
        assert (await http.patch(session, content=last_chunk)).status_code == 202
        done = await http.put(session, params={"digest": final})
        assert done.status_code == 201, done.text
        await push_manifest(http, REPO, "v1", manifest, OCI_MANIFEST)
        assert (await http.get(f"/v2/{REPO}/blobs/{final}")).content == first_chunk + last_chunk
        assert (await http.get(f"/v2/{REPO}/manifests/v1")).content == manifest


async def test_full_event_queue_fails_the_push_with_507_until_space_is_back(
    nursery, tmp_path, small_disk, sink, caplog
):
    queue = small_disk / "queue_data"
    config = events_config(
        tmp_path,
        {"type": "http", "address": sink.url, "name": "hook"},
        queue={"directory": str(queue)},
    )
    registry = await start_registry(nursery, config)
    async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
        await push_blob(http, REPO, random_blob())
        # Delivered and acknowledged before the disk fills: the acknowledgement is a commit.
        await counts_until(config, "hook", lambda c: c.delivered == 1)

        await trio.to_thread.run_sync(fill, small_disk)
        blob = random_blob()
        response = await http.post(
            f"/v2/{REPO}/blobs/uploads/", params={"digest": digest_of(blob)}, content=blob
        )
        entry = assert_oci_error(response, 507, "UNAVAILABLE")
        assert "event queue is out of disk space" in str(entry["message"])
        (line,) = full_errors(caplog)
        assert line.startswith(f"event queue full: cannot commit to {queue / 'events.db'}"), line

        free(small_disk)
        await push_blob(http, REPO, blob)  # pushed again: stored already, now acknowledged
        events = await sink.wait_for(
            lambda evs: any(e["data"]["digest"] == digest_of(blob) for e in evs)
        )
        assert [e["data"]["digest"] for e in events].count(digest_of(blob)) == 1
