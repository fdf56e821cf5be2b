"""The durable event queue: one contract (:mod:`.base`), two stores.

- ``type: sqlite`` (the default): :class:`Outbox`, an SQLite file under
  ``queue.directory``. Right for one registry instance: it commits locally, with nothing
  else to run.
- ``type: jetstream``: :class:`~registry_trio.events.queue.jetstream.JetStreamQueue`, a NATS
  JetStream stream shared by several instances serving one storage; any live instance
  delivers what another one accepted.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

import trio

from ...config import EventsConfig
from .base import (
    APPENDED,
    DeadLetter,
    EventQueue,
    OwedEvent,
    PendingAppend,
    QueueError,
    QueueFull,
    SinkCounts,
    SinkQueue,
)
from .history import (
    Attempt,
    EventTrace,
    HistoryPage,
    HistoryQuery,
    HistoryRecord,
    Step,
)
from .sqlite import Outbox, OutboxReader

__all__ = [
    "APPENDED",
    "Attempt",
    "DeadLetter",
    "EventQueue",
    "EventTrace",
    "HistoryPage",
    "HistoryQuery",
    "HistoryRecord",
    "Outbox",
    "OutboxReader",
    "OwedEvent",
    "PendingAppend",
    "QueueError",
    "QueueFull",
    "SinkCounts",
    "SinkQueue",
    "Step",
    "open_queue",
    "running_queue",
]


def open_queue(
    events: EventsConfig,
    on_commit: Callable[[int, float], None] | None = None,
    announce: Callable[[Sequence[str]], None] | None = None,
) -> EventQueue:
    """The queue ``events.queue`` configures (not yet running: start its ``run``).

    ``announce`` tells the delivering process of each commit when it is another process
    (:mod:`.wakeup`); a JetStream consumer needs no such word, it waits on the stream.
    """
    if events.queue.type == "jetstream":
        from .jetstream import JetStreamQueue

        return JetStreamQueue(events.queue, events.sinks, on_commit, events.history)
    return Outbox(
        events.queue.directory, on_commit=on_commit, announce=announce, history=events.history
    )


@contextlib.asynccontextmanager
async def running_queue(events: EventsConfig) -> AsyncIterator[EventQueue]:
    """The configured queue, running for the length of the block (commands beside a server)."""
    queue = open_queue(events)
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.run)
        try:
            yield queue
        finally:
            queue.close()
