"""GC killed mid-run (``kill -9``) loses no deletion event.

``registry-trio gc`` runs as a subprocess on a lot of garbage and is killed several times part
way, then runs to completion; a server then delivers the queue to a real HTTP sink, which must
have a delete event for every manifest and every blob link that went.

To kill *mid-run* rather than at a lucky moment, the test takes the SQLite queue's write lock
once a run has visibly started deleting: the collector commits each batch's events before it
deletes the batch, so it stalls at its next commit, still running with garbage left, and is
killed there (after its last commit a run would complete, which the test would notice).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import trio

from bench.registry_client import make_image
from registry_trio.oci import OCI_MANIFEST, parse_digest, parse_manifest
from registry_trio.storage import FilesystemStorage
from tests.conftest import counts_until, events_config, start_registry
from tests.procs import write_config
from tests.waiting import eventually

REPOSITORIES = 12
IMAGES_PER_REPOSITORY = 30
KILLS = 4
SINK = {"type": "http", "name": "s", "retry": {"initialBackoff": "10ms", "maxBackoff": "100ms"}}


def make_garbage(root: Path) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """Untagged images straight into the store; (repository, digest) of manifests and of
    blob links (config and layers) that a GC run must delete."""
    storage = FilesystemStorage(root)
    manifests, blobs = set(), set()
    for r in range(REPOSITORIES):
        repository = f"crash/repo{r:02d}"
        for _ in range(IMAGES_PER_REPOSITORY):
            image = make_image((64, 64))
            for blob in (image.config, *image.layers):
                storage.put_blob(repository, blob.data, parse_digest(blob.digest))
                blobs.add((repository, blob.digest))
            manifest = parse_manifest(image.manifest, OCI_MANIFEST)
            storage.put_manifest(
                repository, image.manifest, manifest, parse_digest(image.digest), None
            )
            manifests.add((repository, image.digest))
    return manifests, blobs


def links_left(root: Path) -> int:
    """Revision and blob links under the garbage repositories."""
    repositories = root / "repositories" / "crash"
    return sum(1 for _ in repositories.glob("*/_manifests/revisions/*/*")) + sum(
        1 for _ in repositories.glob("*/_layers/*/*")
    )


def hold_write_lock(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    return conn


async def test_gc_killed_mid_run_loses_no_deletion_event(nursery, tmp_path, sink):
    root = tmp_path / "registry_data"
    manifests, blobs = await trio.to_thread.run_sync(make_garbage, root)
    kept = make_image((64,))
    storage = FilesystemStorage(root)
    storage.put_blob("crash/repo00", kept.layers[0].data, parse_digest(kept.layers[0].digest))
    storage.put_blob("crash/repo00", kept.config.data, parse_digest(kept.config.digest))
    body = kept.manifest
    storage.put_manifest(
        "crash/repo00", body, parse_manifest(body, OCI_MANIFEST), parse_digest(kept.digest), "v1"
    )
    total = await trio.to_thread.run_sync(links_left, root)
    queue_dir = tmp_path / "queue_data"
    config = write_config(
        tmp_path,
        storage={"rootDirectory": str(root), "gcDelay": "0s"},
        extensions={
            "events": {
                "enable": True,
                "queue": {"directory": str(queue_dir)},
                "sinks": [{**SINK, "address": sink.url}],
            }
        },
    )
    command = [sys.executable, "-m", "registry_trio", "gc", "-c", str(config)]

    # The first half of the kills land in the manifest phase (which removes a revision and a
    # self-link per manifest), the others in the blob phase: each waits for deletions below
    # its goal. (links left when killed, whether the run was still going) per kill.
    blob_phase = total - 2 * len(manifests)
    kills: list[tuple[int, bool]] = []
    left = total
    for attempt in range(KILLS):
        goal = left if attempt < KILLS // 2 else min(left, blob_phase)
        with (tmp_path / f"gc-{attempt}.log").open("wb") as output:
            process = await trio.lowlevel.open_process(
                command, stdout=output, stderr=subprocess.STDOUT
            )
        try:

            async def progress(process: trio.Process = process) -> tuple[int, int | None]:
                return await trio.to_thread.run_sync(links_left, root), process.returncode

            await eventually(progress, lambda p, goal=goal: p[0] < goal or p[1] is not None, 60)
            lock = await trio.to_thread.run_sync(hold_write_lock, queue_dir / "events.db")
            try:
                running = process.returncode is None
                process.kill()
                await process.wait()
            finally:
                await trio.to_thread.run_sync(lock.close)  # rolls the empty transaction back
        finally:
            with trio.CancelScope(shield=True):
                process.kill()
                await process.wait()
        left = await trio.to_thread.run_sync(links_left, root)
        kills.append((left, running))

    final = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
    assert final.returncode == 0, final.stderr.decode()
    # What stays: the tagged image's revision and its three links (manifest, config, layer).
    assert await trio.to_thread.run_sync(links_left, root) == 4
    assert kept.layers[0].digest.split(":")[1] in {p.name for p in root.glob("blobs/*/*/*")}

    # A server delivers what the runs queued.
    server_config = events_config(tmp_path, {**SINK, "address": sink.url})
    await start_registry(nursery, server_config)
    # The runs are over: everything they queued is there, pending until delivered.
    await counts_until(server_config, "s", lambda c: c.pending == 0, 60)

    def deleted(events: list[dict], kind: str) -> set[tuple[str, str]]:
        return {
            (e["data"]["name"], e["data"]["digest"])
            for e in events
            if e["type"] == f"zotregistry.{kind}.deleted"
        }

    events = sink.events()
    assert deleted(events, "image") == manifests
    # A run killed between a manifest's revision and its self-link leaves that link for the
    # next run, which reports it as a blob link it deleted: an event more, never one less.
    assert blobs <= deleted(events, "blob") <= blobs | manifests
    # A deletion reported by two runs (killed after the commit, before the unlink) is one
    # event delivered twice: the same id, never two ids for one deletion.
    ids: defaultdict[tuple[str, str, str], set[str]] = defaultdict(set)
    for e in events:
        ids[(e["type"], e["data"]["name"], e["data"]["digest"])].add(e["id"])
    assert all(len(v) == 1 for v in ids.values())
    # Every kill landed mid-run, with work left, each run got further, the last ones in the
    # blob phase.
    assert all(running for _, running in kills), kills
    lefts = [left for left, _ in kills]
    assert total > lefts[0] and lefts == sorted(lefts, reverse=True), kills
    assert blob_phase > lefts[-1] > 4, kills
