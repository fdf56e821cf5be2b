"""What every event queue offers, whatever stores it.

Two implementations share this contract: the embedded SQLite outbox
(:mod:`~registry_trio.events.queue.sqlite`, one instance) and a JetStream stream
(:mod:`~registry_trio.events.queue.jetstream`, several instances on one storage). The API
layer only appends; delivery only takes, acknowledges, reschedules and buries, through one
:class:`SinkQueue` per sink; operators read counts and dead letters and replay them. The
guarantees live behind these calls, so the same tests hold both implementations to them:

- :meth:`EventQueue.append` returns only once the events are durable; a failure raises
  :class:`QueueError` and nothing may be acknowledged to the client.
- Appends keep the order in which they were begun, even when their callers wait for them
  concurrently: :meth:`EventQueue.begin_append` fixes an append's place before it returns
  (the API begins a change's append while it holds the repository's lock, and waits for
  durability after releasing it).
- :meth:`SinkQueue.take` hands out each owed event until it is acknowledged or buried; an
  event taken and never acknowledged (a crash, a stop) is handed out again: at least once.
- In order (``concurrency: 1``), nothing is handed out past an event that waits for a retry.
- Every attempt's outcome reaches the queue with the acknowledgement, retry or burial it
  led to (an :class:`~.history.Attempt`), and is recorded in the delivery history with it
  (:mod:`.history`), not by a second write.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

import trio

from ...config import SinkConfig
from ..model import Event
from .history import Attempt, EventTrace, HistoryPage, HistoryQuery

__all__ = [
    "APPENDED",
    "ORDERED_RUN",
    "DeadLetter",
    "EventQueue",
    "OwedEvent",
    "PendingAppend",
    "QueueError",
    "QueueFull",
    "SinkCounts",
    "SinkQueue",
    "take_limit",
]

# In ordered mode a single-event format sends this many events one after another before
# acknowledging them together; a crash in between redelivers at most this many.
ORDERED_RUN = 64


def take_limit(sink: SinkConfig) -> int:
    """How many deliveries one take may hold: one batch, or one ordered run of single sends.

    Concurrent loops take one request's worth each, so they really run in parallel.
    """
    if sink.batches:
        return sink.batch.max_events
    return ORDERED_RUN if sink.ordered else 1


class QueueError(Exception):
    """The queue could not commit; nothing that depended on it may be acknowledged."""


class QueueFull(QueueError):
    """The queue could not commit for want of disk space: the operator must free some."""


@dataclass(frozen=True)
class OwedEvent:
    """One event owed to one sink; ``seq`` is its position in the queue (enqueue order)."""

    seq: int
    event: Event
    attempts: int
    created: float


@dataclass(frozen=True)
class DeadLetter:
    # A cursor for paging through dead letters (?after=), in the order they were buried.
    seq: int
    sink: str
    event: Event
    attempts: int
    last_error: str


@dataclass(frozen=True)
class SinkCounts:
    pending: int
    dead: int
    delivered: int
    failed_attempts: int
    oldest_pending: float | None
    last_error: str | None
    # Unix times: of the last failed attempt, and of the last delivery acknowledged (one
    # after the last error means delivery has recovered since).
    last_error_at: float | None
    last_delivered_at: float | None


class PendingAppend(Protocol):
    """An append whose place in the queue is fixed; it may not be durable yet."""

    async def wait(self) -> None:
        """Return once the events are durable; raise :class:`QueueError` if they cannot be."""
        ...


class _Appended:
    async def wait(self) -> None:
        return None


# An append with nothing to store (no sink wants its events): durable already.
APPENDED: PendingAppend = _Appended()


class SinkQueue(Protocol):
    """One sink's view of the queue, owned by that sink's delivery worker."""

    @property
    def in_flight(self) -> int:
        """Deliveries taken and not yet acknowledged, rescheduled, buried or released."""
        ...

    async def take(self, *, wait: bool = True) -> list[OwedEvent]:
        """Due deliveries in enqueue order, up to one take's worth; waits for some to be due.

        ``wait=False`` looks once. Returns an empty list when the worker is stopping.
        A batch sink's take waits up to the sink's ``batch.maxWait`` for the batch to fill.
        """
        ...

    def release(self, deliveries: Sequence[OwedEvent]) -> None:
        """Give back deliveries that were taken but never attempted (read ahead, a stop)."""
        ...

    async def ack(self, deliveries: Sequence[OwedEvent], attempts: Sequence[Attempt]) -> None:
        """They reached the sink (``attempts[i]`` is how ``deliveries[i]`` went): never hand
        them out again."""
        ...

    async def retry_later(
        self, deliveries: Sequence[OwedEvent], next_attempt: float, attempt: Attempt
    ) -> None:
        """A failed attempt (``attempt.error`` says why): due again at ``next_attempt`` (a
        Unix time)."""
        ...

    async def bury(self, deliveries: Sequence[OwedEvent], reason: str, attempt: Attempt) -> None:
        """The failed ``attempt`` was their last: move them to the dead-letter store, where
        they wait for a replay."""
        ...


class EventQueue(Protocol):
    # This registry instance's id, persisted across restarts (events' source.instanceID).
    instance_id: str

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the queue and serve it until :meth:`close`; started once it accepts appends."""
        ...

    def close(self) -> None:
        """Stop accepting appends; :meth:`run` returns once what was accepted is stored."""
        ...

    async def append(self, items: Sequence[tuple[Event, Sequence[str]]]) -> None:
        """Store events, each owed to the named sinks; return once durable."""
        ...

    def begin_append(self, items: Sequence[tuple[Event, Sequence[str]]]) -> PendingAppend:
        """:meth:`append` in two steps: the events take their place in the queue's order
        now (before any later append), and are durable once the result's ``wait`` returns.
        A queue already shut down raises :class:`QueueError` here."""
        ...

    def consumer(
        self, sink: SinkConfig, *, stopping: trio.Event
    ) -> AbstractAsyncContextManager[SinkQueue]:
        """The sink's queue for one run of its delivery worker (``async with``)."""
        ...

    def wake(self, sink: str) -> None:
        """Make a waiting :meth:`SinkQueue.take` of ``sink`` look again (used on stop)."""
        ...

    async def counts(self, sink: str) -> SinkCounts: ...

    async def dead(self, sink: str, limit: int = 100, after: int = 0) -> list[DeadLetter]:
        """Dead letters of ``sink`` in the order buried, after the cursor ``after``."""
        ...

    async def replay(
        self, sink: str, event_ids: Sequence[str] | None = None, by: str | None = None
    ) -> int:
        """Move dead letters (all, or those events) back to pending; how many moved.

        They keep their event id; their attempt count starts over. The history records each
        replay, and ``by`` (the operator) when given.
        """
        ...

    async def history(self, query: HistoryQuery) -> HistoryPage:
        """A page of the delivery history, newest first."""
        ...

    async def trace(self, event_id: str) -> EventTrace | None:
        """Everything known of one event's path; None when the queue knows nothing of it."""
        ...

    async def keep_history(self) -> None:
        """Hold the history to ``history.maxAge`` and ``maxRows`` until cancelled (run by the
        delivering process), without holding up delivery."""
        ...
