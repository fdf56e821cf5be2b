"""Maintenance the registry does on its own: garbage collection and upload purging.

:func:`run_gc` runs :func:`registry_trio.storage.gc.collect` on a worker thread and records
what it deletes as events. No request caused these deletions, so the events carry neither
``actor`` nor ``request`` (the spec: internally triggered operations emit events without
them). Manifests are recorded as ``manifest.deleted`` (repository, digest, media type), blobs
as ``blob.deleted`` once per repository that linked them; a blob linked nowhere (already
unlinked through the API, or the body of a deleted manifest) gets no event of its own.

Each batch's events are durable (:meth:`EventRecorder.record` returned) before the collector
deletes the batch, so no deletion goes unreported, whenever the process dies. A crash between
the commit and the deletion reports content that is still there; the next run deletes it and
reports it again under the same event id (:func:`gc_event_id`), so a consumer takes the
repeat for the duplicate it is, as after any other crash.

:func:`purge_uploads` removes upload sessions nobody wrote to for a while. They were never
content anyone could pull, so their removal is no event.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import trio

from .config import Config
from .events.filters import SinkFilter
from .events.model import Action, Event, Source, Target
from .events.queue import running_queue
from .events.recorder import EventRecorder, NullRecorder, QueueRecorder
from .storage import FilesystemStorage
from .storage.gc import DeletedBlob, DeletedManifest, GCReport, collect

__all__ = [
    "collect_once",
    "gc_event_id",
    "gc_events",
    "gc_periodically",
    "purge_once",
    "purge_periodically",
    "purge_uploads",
    "run_gc",
]

log = logging.getLogger("registry_trio.maintenance")

# Fixed, so that every process names a given deletion alike.
_GC_EVENT_IDS = uuid.UUID("5be0b1a8-3f55-4c6e-9a8e-2f1c1e6d7a40")


def gc_event_id(action: Action, repository: str, digest: str, linked_at: float) -> str:
    """The id of the event for one deletion, the same in every run that attempts it.

    The link's mtime tells this deletion from a later one of the same digest in the same
    repository: a push in between rewrites the link.
    """
    return str(uuid.uuid5(_GC_EVENT_IDS, f"{action} {repository} {digest} {linked_at!r}"))


def gc_events(deletions: Sequence[DeletedManifest | DeletedBlob], source: Source) -> list[Event]:
    """The events of deletions, in order: one per manifest, one per repository of a blob."""
    events = []
    for deletion in deletions:
        digest = str(deletion.digest)
        if isinstance(deletion, DeletedManifest):
            action, repository = Action.MANIFEST_DELETED, deletion.repository
            target = Target(repository=repository, digest=digest, media_type=deletion.media_type)
            event_id = gc_event_id(action, repository, digest, deletion.linked_at)
            events.append(Event(action, target, source, id=event_id))
            continue
        for repository, linked_at in zip(deletion.repositories, deletion.linked_at, strict=True):
            target = Target(repository=repository, digest=digest, size=deletion.size)
            event_id = gc_event_id(Action.BLOB_DELETED, repository, digest, linked_at)
            events.append(Event(Action.BLOB_DELETED, target, source, id=event_id))
    return events


async def run_gc(
    storage: FilesystemStorage,
    recorder: EventRecorder,
    source: Source,
    *,
    delay: float,
    dry_run: bool = False,
) -> GCReport:
    """Collect garbage older than ``delay`` seconds; record its events unless ``dry_run``.

    Returns once the deletions are on disk. Raises what the collector or the recorder raised
    (e.g. :class:`registry_trio.events.queue.QueueError`); then the batch whose events could
    not be recorded, and all after it, stay for the next run. A cancel stops the run between
    two batches.
    """

    def record(batch: Sequence[DeletedManifest | DeletedBlob]) -> None:
        # On the collector's thread: the commit (or the cancel) happens on the event loop.
        trio.from_thread.check_cancelled()
        events = [e for e in gc_events(batch, source) if recorder.wants(e.action)]
        if events:
            trio.from_thread.run(recorder.record, events)

    report = await trio.to_thread.run_sync(
        functools.partial(collect, storage, delay=delay, dry_run=dry_run, before_delete=record)
    )
    _log_report(report)
    return report


def _log_report(report: GCReport) -> None:
    verb = "would delete" if report.dry_run else "deleted"
    log.info(
        "gc: %s %d manifests and %d blobs (%d bytes); kept %d manifests and %d blobs younger "
        "than the delay",
        verb,
        len(report.manifests),
        len(report.blobs),
        report.bytes_freed,
        report.held_back_manifests,
        report.held_back_blobs,
    )
    if report.skipped_repositories:
        log.info(
            "gc: left for the next run (changed during this one): %s",
            ", ".join(report.skipped_repositories),
        )


async def purge_uploads(
    storage: FilesystemStorage, *, age: float, dry_run: bool = False
) -> list[str]:
    """Remove the upload sessions nothing was written to for ``age`` seconds; their ids.

    A session a request holds stays, whichever process serves the request: the purge claims
    each session as requests do (see :meth:`FilesystemStorage.purge_uploads`), one at a time,
    for as long as it takes to remove it. A request arriving for it meanwhile is refused as
    for any busy session (409), then finds it gone (404). ``dry_run`` lists the sessions a
    run would remove now, the held ones left out likewise: it claims each for an instant to
    tell, so a request for it arriving in that instant is refused as during a real purge.
    """
    cutoff = time.time() - age
    idle = await trio.to_thread.run_sync(storage.idle_uploads, cutoff)
    purge = functools.partial(storage.purge_uploads, idle, cutoff, dry_run=dry_run)
    purged = await trio.to_thread.run_sync(purge)
    if not dry_run:
        log.info("uploads: purged %d session(s) idle for %.0fs or more", len(purged), age)
    return purged


async def _every(
    interval: float,
    what: str,
    run: Callable[[], Awaitable[object]],
    task_status: trio.TaskStatus[None],
) -> None:
    """``run()`` now and then every ``interval`` seconds, until cancelled.

    The first run is at once (a registry restarted more often than ``interval`` still gets
    its maintenance). A failed run is logged and the loop goes on.
    """
    task_status.started()
    while True:
        try:
            await run()
        except Exception:
            log.exception("%s: run failed; next run in %.0fs", what, interval)
        await trio.sleep(interval)


async def gc_periodically(
    storage: FilesystemStorage,
    recorder: EventRecorder,
    source: Source,
    *,
    interval: float,
    delay: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run :func:`run_gc` now and then every ``interval`` seconds, until cancelled.

    ``delay`` keeps every run away from anything recent. Works with ``nursery.start_soon``
    and ``nursery.start`` alike.
    """
    run = functools.partial(run_gc, storage, recorder, source, delay=delay)
    await _every(interval, "gc", run, task_status)


async def purge_periodically(
    storage: FilesystemStorage,
    *,
    interval: float,
    age: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run :func:`purge_uploads` now and then every ``interval`` seconds, until cancelled."""
    run = functools.partial(purge_uploads, storage, age=age)
    await _every(interval, "uploads", run, task_status)


async def _open_storage(config: Config) -> FilesystemStorage:
    return await trio.to_thread.run_sync(
        functools.partial(FilesystemStorage, config.storage.root_directory, clean_tmp=False)
    )


async def collect_once(config: Config, *, dry_run: bool = False) -> GCReport:
    """``registry-trio gc``: one run on the config's storage, beside a server or not.

    Its events go through a queue connection of its own: on the SQLite queue SQLite serialises
    the two writers and the server's idle delivery workers pick the events up; on JetStream
    they are one more publisher. It holds no repository lock (the API's manifest and tag
    changes hold theirs, :class:`registry_trio.api.locks.RepositoryLocks`): each batch is
    re-checked just before it is announced and deleted, and the delay keeps the run away
    from anything recent (see :mod:`registry_trio.storage.gc`).
    """
    storage = await _open_storage(config)
    events = config.extensions.events
    source = Source(f"{config.http.address}:{config.http.port}", "gc")
    if not events.enable:
        return await run_gc(
            storage, NullRecorder(), source, delay=config.storage.gc_delay, dry_run=dry_run
        )
    async with running_queue(events) as queue:
        recorder = QueueRecorder(queue, [SinkFilter.for_sink(s) for s in events.sinks])
        source = Source(source.addr, queue.instance_id)
        return await run_gc(
            storage, recorder, source, delay=config.storage.gc_delay, dry_run=dry_run
        )


async def purge_once(config: Config, *, dry_run: bool = False) -> list[str] | None:
    """``registry-trio gc``'s upload purge; None when ``storage.uploadPurging`` is off.

    Beside running servers it holds what their purgers hold: each idle session's claim, one
    at a time, while it removes it; a session one of their requests holds is left alone (see
    :func:`purge_uploads`).
    """
    purging = config.storage.upload_purging
    if not purging.enable:
        return None
    storage = await _open_storage(config)
    return await purge_uploads(storage, age=purging.age, dry_run=dry_run)
