"""Upload purging: sessions nobody wrote to for ``storage.uploadPurging.age`` go, on disk and
in memory; sessions still being written, and young ones, stay."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from registry_trio.config import Config
from registry_trio.maintenance import purge_uploads
from registry_trio.oci import parse_digest
from registry_trio.storage import FilesystemStorage
from registry_trio.storage.errors import DigestMismatch
from registry_trio.storage.filesystem import HASHER_LIMIT
from tests.api_helpers import assert_oci_error, digest_of, random_blob
from tests.conftest import make_config, start_registry
from tests.test_gc_cli import gc_cli
from tests.test_observability import scrape, value
from tests.waiting import eventually

AGE = 2.0  # seconds: long beside a request, short enough to wait out in a test
REPO = "purge/app"


def purging(tmp_path: Path, **options: object) -> Config:
    return make_config(
        tmp_path,
        storage={
            "rootDirectory": str(tmp_path / "registry_data"),
            "uploadPurging": {"age": f"{AGE}s", "interval": "50ms", **options},
        },
    )


def make_old(path: Path, seconds: float = 7200) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def session_ids(root: Path) -> set[str]:
    return set(os.listdir(root / "uploads"))


class PurgeRuns:
    """Counts the periodic purge's runs from its log lines."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger="registry_trio.maintenance")
        self._caplog = caplog

    def count(self) -> int:
        return sum("uploads: purged" in r.getMessage() for r in self._caplog.records)

    async def wait(self, runs: int = 2) -> None:
        """Until ``runs`` more runs have finished."""
        target = self.count() + runs

        async def count() -> int:
            return self.count()

        await eventually(count, lambda n: n >= target)


@pytest.fixture
async def registry_http(nursery, tmp_path) -> AsyncIterator[tuple[Path, httpx.AsyncClient]]:
    registry = await start_registry(nursery, purging(tmp_path))
    async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
        yield registry.root, http


async def open_session(http: httpx.AsyncClient, first: bytes) -> str:
    location = (await http.post(f"/v2/{REPO}/blobs/uploads/")).headers["Location"]
    (await http.patch(location, content=first)).raise_for_status()
    return location


async def test_idle_sessions_are_purged_and_slow_or_young_ones_stay(registry_http, caplog):
    root, http = registry_http
    runs = PurgeRuns(caplog)
    data = random_blob(4000)
    abandoned = await open_session(http, data[:1000])
    slow = await open_session(http, data[:1000])
    opened = trio.current_time()
    assert value(await scrape(http), "registry_upload_sessions_open") == 2

    # The slow client keeps sending a little, for longer than the age, while the other
    # session sits idle until it is purged.
    sent = 1000
    while session_ids(root) != {slow.rsplit("/", 1)[1]} or trio.current_time() - opened < 2 * AGE:
        assert trio.current_time() - opened < 20, f"not purged: {session_ids(root)}"
        (await http.patch(slow, content=data[sent : sent + 10])).raise_for_status()
        sent += 10
        await trio.sleep(AGE / 20)  # ok-sleep: the pace of a slow client, not a wait

    assert value(await scrape(http), "registry_upload_sessions_open") == 1
    # A purged session is unknown, whatever is asked of it.
    assert_oci_error(await http.get(abandoned), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_oci_error(await http.patch(abandoned, content=b"more"), 404, "BLOB_UPLOAD_UNKNOWN")
    finish = {"digest": digest_of(data[:1000])}
    put = await http.put(abandoned, params=finish, content=b"")
    assert_oci_error(put, 404, "BLOB_UPLOAD_UNKNOWN")
    assert session_ids(root) == {slow.rsplit("/", 1)[1]}  # nothing recreated

    # A session opened now is young and stays; the slow one completes whole.
    young = await open_session(http, data[:10])
    await runs.wait()
    assert value(await scrape(http), "registry_upload_sessions_open") == 2
    done = await http.put(slow, params={"digest": digest_of(data)}, content=data[sent:])
    assert done.status_code == 201, done.text
    assert (await http.get(f"/v2/{REPO}/blobs/{digest_of(data)}")).content == data
    assert (await http.get(young)).headers["Range"] == "0-9"


async def test_a_session_a_request_is_writing_is_not_purged(registry_http, caplog):
    """The request stalls after its first MiB for longer than the age: by its file the
    session is idle, but a request is in it, so it stays."""
    root, http = registry_http
    runs = PurgeRuns(caplog)
    data = random_blob(3 << 20)
    location = (await http.post(f"/v2/{REPO}/blobs/uploads/")).headers["Location"]
    session = root / "uploads" / location.rsplit("/", 1)[1]
    resume = trio.Event()

    async def stalling_body() -> AsyncIterator[bytes]:
        yield data[: 1 << 20]
        await resume.wait()
        yield data[1 << 20 :]

    async def patch(task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        response = await http.patch(location, content=stalling_body())
        assert response.status_code == 202, response.text

    async with trio.open_nursery() as nursery:
        await nursery.start(patch)
        await eventually(
            lambda: trio.to_thread.run_sync(os.path.getsize, session), lambda n: n >= 1 << 20
        )
        written = session.stat().st_mtime
        await eventually(lambda: trio.to_thread.run_sync(time.time), lambda t: t > written + AGE)
        await runs.wait()  # runs that found it idle by its file
        assert session.exists()
        resume.set()
    done = await http.put(location, params={"digest": digest_of(data)})
    assert done.status_code == 201, done.text
    assert (await http.get(f"/v2/{REPO}/blobs/{digest_of(data)}")).content == data


async def test_purge_drops_the_sessions_in_memory_state_and_spares_busy_ones(tmp_path):
    storage = FilesystemStorage(tmp_path / "registry_data")
    ids = [storage.create_upload(REPO) for _ in range(3)]
    for upload_id in ids:
        writer = storage.open_upload(REPO, upload_id)
        writer.write(b"x" * 100)
        writer.close()
        make_old(storage.root / "uploads" / upload_id)
    assert len(storage._hashers) == 3

    with storage.claim_upload(REPO, ids[2]):  # a request is writing it
        assert await purge_uploads(storage, age=3600, dry_run=True) == sorted(ids[:2])
        purged = await purge_uploads(storage, age=3600)

    assert purged == sorted(ids[:2])
    assert session_ids(storage.root) == {ids[2]}
    assert len(storage._hashers) == 1
    assert storage._hashers.take(ids[2]) is not None
    # The purge's own claims are gone with it: the session it spared can be claimed.
    storage.claim_upload(REPO, ids[2]).release()


def test_hash_states_of_sessions_are_bounded(tmp_path):
    """Abandoned sessions cannot grow the server's memory: past the limit the oldest state
    goes, and that session's digest is computed from its file when it finishes."""
    storage = FilesystemStorage(tmp_path / "registry_data")
    data = b"y" * 100
    ids = []
    for _ in range(HASHER_LIMIT + 50):
        upload_id = storage.create_upload(REPO)
        writer = storage.open_upload(REPO, upload_id)
        writer.write(data)
        writer.close()
        ids.append(upload_id)
    assert len(storage._hashers) == HASHER_LIMIT
    assert storage._hashers.take(ids[0]) is None
    assert storage.finish_upload(REPO, ids[0], parse_digest(digest_of(data))) == len(data)
    with pytest.raises(DigestMismatch):
        storage.finish_upload(REPO, ids[1], parse_digest(digest_of(b"other")))


async def test_gc_command_purges_idle_sessions_unless_purging_is_off(tmp_path):
    root = tmp_path / "registry_data"
    storage = FilesystemStorage(root)
    old, young = storage.create_upload(REPO), storage.create_upload(REPO)
    make_old(root / "uploads" / old)
    # Old entries that are no session are none of the registry's doing: a file not named
    # by a session id, and a directory that is (the registry only ever makes files there).
    strangers = {"notes.txt", "f" * 48}
    (root / "uploads" / "notes.txt").write_text("an operator's")
    (root / "uploads" / ("f" * 48)).mkdir()
    (root / "uploads" / ("f" * 48) / "kept").write_text("someone else's")
    for name in strangers:
        make_old(root / "uploads" / name)
    config = tmp_path / "gc.json"

    def write(**purging: object) -> None:
        doc = {"storage": {"rootDirectory": str(root), "uploadPurging": {"age": "1h", **purging}}}
        config.write_text(json.dumps(doc))

    write(enable=False)
    assert (await gc_cli(config))["purgedUploads"] is None
    write()
    dry = await gc_cli(config, "--dry-run")
    assert dry["purgedUploads"] == [old]
    assert session_ids(root) == {old, young, *strangers}
    done = await gc_cli(config)
    assert done["purgedUploads"] == dry["purgedUploads"]
    assert session_ids(root) == {young, *strangers}
