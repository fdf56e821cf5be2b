"""Garbage collection against a real registry: what goes, what stays, and its events.

Each test pushes through the HTTP API of a running registry, then runs the collector on the
same storage root (a second FilesystemStorage, as `registry-trio gc` would) and checks the
files under ``blobs/`` and ``repositories/`` against the set computed from what was pushed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from bench.registry_client import Blob, Image, RegistryClient, make_image
from registry_trio.events import NullRecorder, Source
from registry_trio.events.filters import SinkFilter
from registry_trio.events.model import Action, Event
from registry_trio.events.queue import Outbox
from registry_trio.events.recorder import QueueRecorder
from registry_trio.maintenance import gc_periodically, run_gc
from registry_trio.oci import OCI_INDEX, OCI_MANIFEST
from registry_trio.storage import FilesystemStorage
from registry_trio.storage.gc import GCReport
from tests.conftest import RunningRegistry, events_config, start_registry
from tests.waiting import eventually

SOURCE = Source("gc-test", "test-instance")
SIG_TYPE = "application/vnd.example.signature.v1"


# -- what was pushed ---------------------------------------------------------------------


@dataclass(frozen=True)
class Index:
    children: tuple[Image, ...]

    @property
    def manifest(self) -> bytes:
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": child.digest,
                    "size": len(child.manifest),
                    "platform": {"architecture": f"arch{i}", "os": "linux"},
                }
                for i, child in enumerate(self.children)
            ],
        }
        return json.dumps(doc, sort_keys=True).encode()

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()


def content(*items: Image | Index) -> set[str]:
    """Every blob file the items occupy: manifest bodies, configs, layers."""
    out: set[str] = set()
    for item in items:
        out.add(item.digest)
        if isinstance(item, Image):
            out.add(item.config.digest)
            out.update(layer.digest for layer in item.layers)
    return out


def with_layers(*layers: Blob) -> Image:
    """An image with exactly ``layers`` (shared ones included) and its own config."""
    doc = {"rootfs": [b.digest for b in layers], "salt": os.urandom(8).hex()}
    config = Blob(json.dumps(doc).encode(), "application/vnd.oci.image.config.v1+json")
    return Image(config, layers)


def signature(subject: Image) -> Image:
    """An artifact whose subject is ``subject``; every signature shares the empty config."""
    return Image(
        Blob(b"{}", "application/vnd.oci.empty.v1+json"),
        (Blob(os.urandom(64), SIG_TYPE),),
        subject={
            "mediaType": OCI_MANIFEST,
            "digest": subject.digest,
            "size": len(subject.manifest),
        },
        artifact_type=SIG_TYPE,
    )


async def push_index(http: httpx.AsyncClient, repo: str, ref: str, index: Index) -> None:
    response = await http.put(
        f"/v2/{repo}/manifests/{ref}",
        content=index.manifest,
        headers={"Content-Type": OCI_INDEX},
    )
    response.raise_for_status()


async def untag(http: httpx.AsyncClient, repo: str, tag: str) -> None:
    (await http.delete(f"/v2/{repo}/manifests/{tag}")).raise_for_status()


# -- what is on disk ---------------------------------------------------------------------


def blob_files(root: Path) -> set[str]:
    return {
        f"{path.parent.parent.name}:{path.name}"
        for path in (root / "blobs").glob("*/*/*")
        if path.is_file()
    }


def revisions(root: Path, repo: str) -> set[str]:
    base = root / "repositories" / repo / "_manifests" / "revisions"
    return {f"{p.parent.name}:{p.name}" for p in base.glob("*/*")}


def layer_links(root: Path, repo: str) -> set[str]:
    base = root / "repositories" / repo / "_layers"
    return {f"{p.parent.name}:{p.name}" for p in base.glob("*/*")}


def all_files(root: Path) -> dict[str, tuple[int, float]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime)
        for p in root.rglob("*")
        if p.is_file()
    }


def age(root: Path, seconds: float) -> None:
    """Make every stored file look ``seconds`` old (as if pushed that long ago)."""
    then = time.time() - seconds
    for top in ("blobs", "repositories"):
        for path in (root / top).rglob("*"):
            if path.is_file():
                os.utime(path, (then, then))


def manifest_rows(report: GCReport) -> set[tuple[str, str, str]]:
    return {(m.repository, str(m.digest), m.media_type) for m in report.manifests}


def blob_rows(report: GCReport) -> set[str]:
    return {str(b.digest) for b in report.blobs}


async def gc(registry: RunningRegistry, *, delay: float = 0, dry_run: bool = False) -> GCReport:
    storage = FilesystemStorage(registry.root, clean_tmp=False)
    return await run_gc(storage, NullRecorder(), SOURCE, delay=delay, dry_run=dry_run)


async def gc_both(registry: RunningRegistry, *, delay: float) -> GCReport:
    """A dry run, then a real one; they must agree (the dry run relies on the plan alone,
    while the real run re-checks each deletion on disk, so both are held to the rules)."""
    dry = await gc(registry, delay=delay, dry_run=True)
    real = await gc(registry, delay=delay)
    assert manifest_rows(real) == manifest_rows(dry)
    assert sorted(real.blobs, key=str) == sorted(dry.blobs, key=str)
    held_back = (real.held_back_manifests, real.held_back_blobs)
    assert held_back == (dry.held_back_manifests, dry.held_back_blobs)
    return real


# -- tests -------------------------------------------------------------------------------


async def test_gc_removes_exactly_the_unreferenced_content(registry, client, http):
    root = registry.root
    shared, only_b, only_e = (Blob(os.urandom(3000)) for _ in range(3))
    a = with_layers(shared, Blob(os.urandom(2000)))
    b = with_layers(shared, only_b, only_e)
    e = with_layers(only_e)  # another repository needs only_e
    loose = with_layers(Blob(os.urandom(500)))  # pushed by digest: never tagged
    stray = Blob(os.urandom(700))  # uploaded, never referenced
    await client.push_image("team/app", "v1", a)
    await client.push_image("team/app", "v2", b)
    await client.push_image("base", "latest", e)
    await client.push_image("team/app", loose.digest, loose)
    await client.push_blob("team/app", stray)
    # An upload in progress holding the bytes of a blob about to be collected.
    started = await http.post("/v2/team/app/blobs/uploads/")
    location = started.headers["Location"]
    (await http.patch(location, content=only_b.data[:1000])).raise_for_status()
    await untag(http, "team/app", "v2")
    before = blob_files(root)

    report = await gc(registry)

    kept = content(a, e)
    gone = content(b, loose) - kept | {stray.digest}
    # Spelled out once, so the set arithmetic above cannot hide a mistake.
    assert gone == {
        b.digest,
        b.config.digest,
        only_b.digest,
        loose.digest,
        loose.config.digest,
        loose.layers[0].digest,
        stray.digest,
    }
    assert blob_files(root) == before - gone
    assert kept <= blob_files(root)
    assert manifest_rows(report) == {
        ("team/app", b.digest, OCI_MANIFEST),
        ("team/app", loose.digest, OCI_MANIFEST),
    }
    assert blob_rows(report) == gone
    assert revisions(root, "team/app") == {a.digest}
    assert revisions(root, "base") == {e.digest}
    # The repository's links to deleted blobs went with them; links to kept blobs stay.
    assert layer_links(root, "team/app") & gone == set()
    assert only_e.digest in layer_links(root, "team/app")
    # Blob events name the repositories that linked the blob; a manifest's own body was
    # unlinked with the manifest, so it has none.
    by_digest = {str(x.digest): x for x in report.blobs}
    assert by_digest[only_b.digest].repositories == ("team/app",)
    assert by_digest[b.digest].repositories == ()
    assert by_digest[only_b.digest].size == len(only_b.data)

    # What stays is whole, what went is gone, and nothing else broke.
    await client.pull_image("team/app", "v1")
    await client.pull_image("base", "latest")
    assert (await http.get(f"/v2/team/app/manifests/{b.digest}")).status_code == 404
    assert (await http.head(f"/v2/team/app/blobs/{stray.digest}")).status_code == 404
    # A second run finds nothing left.
    again = await gc(registry)
    assert again.manifests == [] and again.blobs == []
    # The upload session was not touched: it completes, and re-creates the collected blob.
    (await http.patch(location, content=only_b.data[1000:])).raise_for_status()
    done = await http.put(location, params={"digest": only_b.digest})
    assert done.status_code == 201
    got = await http.get(f"/v2/team/app/blobs/{only_b.digest}")
    assert got.content == only_b.data


async def test_gc_keeps_referrers_and_index_children_of_tagged_manifests(registry, client, http):
    root = registry.root
    repo = "art"
    subject = make_image()
    sig = signature(subject)
    sig_of_sig = signature(sig)  # a referrer of a referrer
    untagged = make_image()
    sig_of_untagged = signature(untagged)
    children = (make_image(), make_image())
    index = Index(children)
    lone_child = make_image()
    untagged_index = Index((lone_child,))

    await client.push_image(repo, "v1", subject)
    for image in (sig, sig_of_sig, untagged, sig_of_untagged, *children, lone_child):
        await client.push_image(repo, image.digest, image)
    await push_index(http, repo, "multi", index)
    await push_index(http, repo, untagged_index.digest, untagged_index)
    before = blob_files(root)

    report = await gc(registry)

    kept = content(subject, sig, sig_of_sig, index, *children)
    gone = content(untagged, sig_of_untagged, untagged_index, lone_child) - kept
    assert manifest_rows(report) == {
        (repo, untagged.digest, OCI_MANIFEST),
        (repo, sig_of_untagged.digest, OCI_MANIFEST),
        (repo, untagged_index.digest, OCI_INDEX),
        (repo, lone_child.digest, OCI_MANIFEST),
    }
    assert revisions(root, repo) == {
        subject.digest,
        sig.digest,
        sig_of_sig.digest,
        index.digest,
        *(c.digest for c in children),
    }
    # The empty config all signatures share stays: kept signatures still use it.
    assert sig.config.digest in kept and sig.config.digest not in gone
    assert blob_files(root) == before - gone
    assert blob_rows(report) == gone
    # Referrers listings follow: the kept chain is listed, the collected one is not.
    listed = (await http.get(f"/v2/{repo}/referrers/{subject.digest}")).json()["manifests"]
    assert [d["digest"] for d in listed] == [sig.digest]
    listed = (await http.get(f"/v2/{repo}/referrers/{sig.digest}")).json()["manifests"]
    assert [d["digest"] for d in listed] == [sig_of_sig.digest]
    listed = (await http.get(f"/v2/{repo}/referrers/{untagged.digest}")).json()["manifests"]
    assert listed == []
    for child in children:
        await client.pull_image(repo, child.digest)

    # Once the subject loses its tag, its whole referrer chain goes with it.
    await untag(http, repo, "v1")
    second = await gc(registry)
    assert {str(m.digest) for m in second.manifests} == {
        subject.digest,
        sig.digest,
        sig_of_sig.digest,
    }
    assert revisions(root, repo) == {index.digest, *(c.digest for c in children)}
    assert blob_files(root) == before - gone - content(subject, sig, sig_of_sig)


async def test_gc_beside_a_live_server_leaves_its_staged_files_alone(registry, client, http):
    image = make_image()
    await client.push_image("app", "v1", image)
    await untag(http, "app", "v1")
    staged = registry.root / "tmp" / "0123456789abcdef"  # a write the server has under way
    staged.write_bytes(b"half a manifest")

    report = await gc(registry)

    assert {str(m.digest) for m in report.manifests} == {image.digest}
    assert staged.read_bytes() == b"half a manifest"
    # The server's own start-up is what clears crash leftovers there.
    FilesystemStorage(registry.root)
    assert not staged.exists()


async def test_gc_spares_everything_younger_than_the_delay(registry, client, http):
    root = registry.root
    old = make_image()
    await client.push_image("app", "old", old)
    await untag(http, "app", "old")
    unlinked = Blob(os.urandom(300))  # uploaded, then unlinked through the API
    await client.push_blob("app", unlinked)
    (await http.delete(f"/v2/app/blobs/{unlinked.digest}")).raise_for_status()
    snapshot = all_files(root)

    fresh = await gc_both(registry, delay=3600)
    assert fresh.manifests == [] and fresh.blobs == []
    assert all_files(root) == snapshot
    # The report counts what the delay kept: the untagged manifest with its blobs, and the
    # unlinked blob.
    assert fresh.held_back_manifests == 1
    assert fresh.held_back_blobs == len(content(old)) + 1

    # More garbage, and two children pushed by digest; then all of it is two hours old.
    pending = make_image()
    await client.push_image("app", "pending", pending)
    await untag(http, "app", "pending")
    children = (make_image(), make_image())
    for child in children:
        await client.push_image("app", child.digest, child)
    age(root, 7200)
    # Pushes in progress now: a blob re-uploaded (its file is old, its link is new), and an
    # untagged index pushed over the old children (not tagged yet).
    reused = old.layers[0]
    uploaded = await http.post(
        "/v2/app/blobs/uploads/", params={"digest": reused.digest}, content=reused.data
    )
    assert uploaded.status_code == 201
    index = Index(children)
    await push_index(http, "app", index.digest, index)

    report = await gc_both(registry, delay=3600)

    assert manifest_rows(report) == {
        ("app", old.digest, OCI_MANIFEST),
        ("app", pending.digest, OCI_MANIFEST),
    }
    assert blob_rows(report) == content(old, pending) - {reused.digest} | {unlinked.digest}
    unlinked_row = next(b for b in report.blobs if str(b.digest) == unlinked.digest)
    assert unlinked_row.repositories == ()  # linked nowhere: no blob.deleted event
    assert reused.digest in blob_files(root)
    assert content(index, *children) <= blob_files(root)
    assert revisions(root, "app") == {index.digest, *(c.digest for c in children)}
    # Held back: the young index, the old children only it keeps, their blobs, and the
    # re-uploaded blob (old file, young link).
    assert report.held_back_manifests == 3
    assert report.held_back_blobs == len(content(index, *children)) + 1
    # The push in progress can finish: its blob is still there and still linked.
    manifest = with_layers(reused)
    await client.push_image("app", "resumed", manifest)
    await client.pull_image("app", "resumed")


async def test_dry_run_deletes_nothing_and_reports_what_a_real_run_deletes(registry, client, http):
    shared = Blob(os.urandom(2048))
    keep = with_layers(shared)
    drop = with_layers(shared, Blob(os.urandom(1024)))
    sig = signature(drop)
    await client.push_image("r", "keep", keep)
    await client.push_image("r", "drop", drop)
    await client.push_image("r", sig.digest, sig)
    stray = Blob(os.urandom(100))
    await client.push_blob("r", stray)
    await untag(http, "r", "drop")
    snapshot = all_files(registry.root)
    before = blob_files(registry.root)

    dry = await gc(registry, dry_run=True)
    assert all_files(registry.root) == snapshot
    assert dry.dry_run
    assert manifest_rows(dry) == {("r", drop.digest, OCI_MANIFEST), ("r", sig.digest, OCI_MANIFEST)}
    assert blob_rows(dry) == content(drop, sig) - content(keep) | {stray.digest}

    real = await gc(registry)
    assert not real.dry_run
    assert manifest_rows(real) == manifest_rows(dry)
    assert sorted(real.blobs, key=str) == sorted(dry.blobs, key=str)
    assert blob_files(registry.root) == before - blob_rows(dry)


async def test_gc_events_reach_the_sink_without_actor_or_request(nursery, tmp_path, sink):
    retry = {"initialBackoff": "10ms", "maxBackoff": "50ms"}
    config = events_config(
        tmp_path, {"type": "http", "address": sink.url, "timeout": "2s", "retry": retry}
    )
    registry = await start_registry(nursery, config)
    image = make_image((1024, 2048))
    async with httpx.AsyncClient(base_url=registry.url) as http:
        await RegistryClient(registry.url, client=http).push_image("team/app", "v1", image)
        await untag(http, "team/app", "v1")
    await sink.wait_for(lambda evs: any(e["type"].endswith("image.deleted") for e in evs))

    # As `registry-trio gc` on a live registry: its own writer on the registry's queue.
    events = config.extensions.events
    outbox = Outbox(Path(events.queue.directory))
    await nursery.start(outbox.run)
    recorder = QueueRecorder(outbox, [SinkFilter.for_sink(s) for s in events.sinks])
    report = await run_gc(
        FilesystemStorage(registry.root, clean_tmp=False),
        recorder,
        Source("gc", outbox.instance_id),
        delay=0,
    )
    outbox.close()
    assert {str(m.digest) for m in report.manifests} == {image.digest}
    layer_and_config = {image.config.digest, *(x.digest for x in image.layers)}
    assert blob_rows(report) == {image.digest} | layer_and_config

    def gc_events(evs: list[dict]) -> list[dict]:
        return [e for e in evs if e["source"] == "//gc"]

    received = await sink.wait_for(lambda evs: len(gc_events(evs)) == 4)
    ours = gc_events(received)
    assert [e["type"] for e in ours] == ["zotregistry.image.deleted"] + [
        "zotregistry.blob.deleted"
    ] * 3
    deleted_manifest = ours[0]["data"]
    assert deleted_manifest["name"] == "team/app"
    assert deleted_manifest["digest"] == image.digest
    assert deleted_manifest["mediaType"] == OCI_MANIFEST
    assert {e["data"]["digest"] for e in ours[1:]} == layer_and_config
    assert all(e["data"]["name"] == "team/app" for e in ours)
    for event in ours:
        assert "actor" not in event["data"]
        assert "request" not in event["data"]
    # The same sink does get `request` when a request caused the event: the absence above
    # is the collector's doing, not the format's.
    api_events = [e for e in received if e["source"] != "//gc"]
    assert api_events and all("request" in e["data"] for e in api_events)


async def test_gc_deletes_in_an_order_a_crash_cannot_corrupt(registry, client, http, monkeypatch):
    """Every unlink, in order: a crash after any prefix of this list must leave no manifest
    pointing at a deleted manifest or blob, and no link to a deleted blob."""
    root = registry.root
    children = (make_image(), make_image())
    index = Index(children)
    sig = signature(children[0])
    for child in children:
        await client.push_image("app", child.digest, child)
    await push_index(http, "app", "multi", index)
    await client.push_image("app", sig.digest, sig)
    await untag(http, "app", "multi")

    unlinked: list[str] = []
    real_unlink = os.unlink

    def recording_unlink(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]
        if Path(path).is_relative_to(root):
            unlinked.append(str(Path(path).relative_to(root)))

    monkeypatch.setattr(os, "unlink", recording_unlink)
    report = await gc(registry)
    monkeypatch.undo()

    def position(kind: str, digest: str) -> int:
        hexdigest = digest.split(":")[1]
        for i, path in enumerate(unlinked):
            if kind in path.split("/") and hexdigest in path:
                return i
        raise AssertionError(f"{kind} of {digest} was not deleted: {unlinked}")

    manifests = {index.digest, *(c.digest for c in children), sig.digest}
    assert {str(m.digest) for m in report.manifests} == manifests
    blobs = content(index, sig, *children)
    assert blob_rows(report) == blobs
    kinds = [path.split("/")[0] if path.startswith("blobs/") else path for path in unlinked]
    last_manifest_step = max(i for i, k in enumerate(kinds) if k != "blobs")
    first_blob_file = min(i for i, k in enumerate(kinds) if k == "blobs")
    # Manifests (revisions, referrer entries, self-links) and blob links before any file.
    assert last_manifest_step < first_blob_file
    # The index before its children, the referrer's entry before its revision.
    for child in children:
        assert position("revisions", index.digest) < position("revisions", child.digest)
    assert position("_referrers", sig.digest) < position("revisions", sig.digest)
    assert blob_files(root).isdisjoint(blobs)


@dataclass
class FailingOnce:
    """A recorder that refuses its first call and keeps the events of the others, noting at
    each call whether the manifests it is told about are still on disk."""

    root: Path
    calls: int = 0
    events: list[Event] = field(default_factory=list)
    still_on_disk: list[bool] = field(default_factory=list)

    def wants(self, action: Action) -> bool:
        return True

    async def record(self, events: Sequence[Event]) -> None:
        self.calls += 1
        self.still_on_disk.extend(
            e.target.digest in revisions(self.root, e.target.repository)
            for e in events
            if e.action is Action.MANIFEST_DELETED
        )
        if self.calls == 1:
            raise RuntimeError("queue unavailable")
        self.events.extend(events)


async def test_periodic_gc_records_before_it_deletes_and_survives_a_failed_run(
    registry, client, http, caplog
):
    first, second = make_image(), make_image()
    await client.push_image("app", "first", first)
    await client.push_image("app", "second", second)
    await untag(http, "app", "first")
    recorder = FailingOnce(registry.root)
    storage = FilesystemStorage(registry.root, clean_tmp=False)

    async def recorded() -> list[Event]:
        return recorder.events

    def deleted(image: Image) -> Callable[[list[Event]], bool]:
        return lambda evs: any(
            e.action is Action.MANIFEST_DELETED and e.target.digest == image.digest for e in evs
        )

    with caplog.at_level(logging.INFO, logger="registry_trio.maintenance"):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: gc_periodically(
                    storage, recorder, SOURCE, interval=0.01, delay=0, task_status=task_status
                )
            )
            # The first run cannot record, so it deletes nothing; the loop survives it and
            # a later run deletes and records.
            await eventually(recorded, deleted(first))
            assert first.digest not in revisions(registry.root, "app")
            await untag(http, "app", "second")
            got = await eventually(recorded, deleted(second))
            nursery.cancel_scope.cancel()
    # Every event was recorded while its manifest was still there, the refused one included.
    assert recorder.calls >= 3 and recorder.still_on_disk == [True] * len(recorder.still_on_disk)
    assert all(e.actor is None and e.request is None for e in got)
    assert any("gc: run failed" in r.getMessage() for r in caplog.records)
    assert any("gc: deleted 1 manifests" in r.getMessage() for r in caplog.records)


@dataclass
class DiesAfterFirstCommit:
    """Keeps every event it is given; its first call then raises, as a process killed right
    after the commit, before the deletions."""

    calls: int = 0
    events: list[Event] = field(default_factory=list)

    def wants(self, action: Action) -> bool:
        return True

    async def record(self, events: Sequence[Event]) -> None:
        self.calls += 1
        self.events.extend(events)
        if self.calls == 1:
            raise RuntimeError("killed after the commit")


async def test_a_deletion_reported_twice_keeps_its_event_id(registry, client, http):
    image = make_image()
    await client.push_image("app", "v1", image)
    await untag(http, "app", "v1")
    recorder = DiesAfterFirstCommit()
    storage = FilesystemStorage(registry.root, clean_tmp=False)

    with pytest.raises(RuntimeError, match="killed after the commit"):
        await run_gc(storage, recorder, SOURCE, delay=0)
    assert image.digest in revisions(registry.root, "app")  # announced, not deleted
    await run_gc(storage, recorder, SOURCE, delay=0)
    assert image.digest not in revisions(registry.root, "app")
    announced, repeated = [e for e in recorder.events if e.action is Action.MANIFEST_DELETED]
    assert announced.target.digest == repeated.target.digest == image.digest
    assert announced.id == repeated.id
    blob_ids = {e.target.digest: e.id for e in recorder.events if e.action is Action.BLOB_DELETED}
    assert blob_ids.keys() == {image.config.digest, *(layer.digest for layer in image.layers)}

    # The same content pushed and collected again is another deletion, under other ids.
    await client.push_image("app", "v1", image)
    await untag(http, "app", "v1")
    again = DiesAfterFirstCommit(calls=1)
    await run_gc(storage, again, SOURCE, delay=0)
    (manifest_again,) = [e for e in again.events if e.action is Action.MANIFEST_DELETED]
    assert manifest_again.id != announced.id
    blob_ids_again = {
        e.target.digest: e.id for e in again.events if e.action is Action.BLOB_DELETED
    }
    assert blob_ids_again.keys() == blob_ids.keys()
    assert set(blob_ids_again.values()).isdisjoint(blob_ids.values())
