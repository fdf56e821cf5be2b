"""Maintenance the registry does on its own: garbage collection, once or periodically.

:func:`run_gc` runs :func:`registry_trio.storage.gc.collect` on a worker thread, then records
what was deleted as events. No request caused these deletions, so the events carry neither
``actor`` nor ``request`` (the spec: internally triggered operations emit events without
them). Manifests are recorded as ``manifest.deleted`` (repository, digest, media type), blobs
as ``blob.deleted`` once per repository that linked them; a blob linked nowhere (already
unlinked through the API, or the body of a deleted manifest) gets no event of its own.

Events are recorded after the deletions are on disk: a crash in between loses the events of
that run but never reports a deletion that did not happen (the next run finds nothing left
to report). Recording is durable once :meth:`EventRecorder.record` returns.
"""

from __future__ import annotations

import functools
import logging

import trio

from .config import Config
from .events.filters import SinkFilter
from .events.model import Action, Event, Source, Target
from .events.queue import running_queue
from .events.recorder import EventRecorder, NullRecorder, QueueRecorder
from .storage import FilesystemStorage
from .storage.gc import GCReport, collect

__all__ = ["collect_once", "gc_events", "gc_periodically", "run_gc"]

log = logging.getLogger("registry_trio.maintenance")


def gc_events(report: GCReport, source: Source) -> list[Event]:
    """The events of a (real) run: manifests first, then blobs, as they were deleted."""
    events = [
        Event(
            Action.MANIFEST_DELETED,
            Target(repository=m.repository, digest=str(m.digest), media_type=m.media_type),
            source,
            actor=None,
            request=None,
        )
        for m in report.manifests
    ]
    events.extend(
        Event(
            Action.BLOB_DELETED,
            Target(repository=repository, digest=str(b.digest), size=b.size),
            source,
            actor=None,
            request=None,
        )
        for b in report.blobs
        for repository in b.repositories
    )
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

    Returns once the deletions are on disk and their events are durable. Raises what the
    collector or the recorder raised (e.g. :class:`registry_trio.events.queue.QueueError`).
    """
    report = await trio.to_thread.run_sync(lambda: collect(storage, delay=delay, dry_run=dry_run))
    if not dry_run:
        events = gc_events(report, source)
        if events:
            await recorder.record(events)
    _log_report(report)
    return report


def _log_report(report: GCReport) -> None:
    verb = "would delete" if report.dry_run else "deleted"
    log.info(
        "gc: %s %d manifests and %d blobs (%d bytes)",
        verb,
        len(report.manifests),
        len(report.blobs),
        report.bytes_freed,
    )
    if report.skipped_repositories:
        log.info(
            "gc: left for the next run (changed during this one): %s",
            ", ".join(report.skipped_repositories),
        )


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

    The first run is at once (a registry restarted more often than ``interval`` still
    collects); ``delay`` keeps it away from anything recent. A failed run is logged and the
    loop goes on. Works with ``nursery.start_soon`` and ``nursery.start`` alike.
    """
    task_status.started()
    while True:
        try:
            await run_gc(storage, recorder, source, delay=delay)
        except Exception:
            log.exception("gc: run failed; next run in %.0fs", interval)
        await trio.sleep(interval)


async def collect_once(config: Config, *, dry_run: bool = False) -> GCReport:
    """``registry-trio gc``: one run on the config's storage, beside a server or not.

    Its events go through a queue connection of its own: on the SQLite queue SQLite serialises
    the two writers and the server's idle delivery workers pick the events up; on JetStream
    they are one more publisher.
    """
    storage = await trio.to_thread.run_sync(
        functools.partial(FilesystemStorage, config.storage.root_directory, clean_tmp=False)
    )
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
