"""The delivery history: what every queue records of an event's path, and how it is asked.

Each delivery attempt is recorded with the acknowledgement, retry or burial it led to, by the
same call (:class:`Attempt` travels with :meth:`SinkQueue.ack`, ``retry_later`` and ``bury``),
so a queue writes it together with the outcome: in the SQLite outbox, in the very transaction.
Replays are recorded by :meth:`EventQueue.replay`. The queue also knows when an event was
committed, which a trace (:class:`EventTrace`) shows first.

Records live in the shared queue, never in a process's memory: any worker (or the offline
CLI) reads what the delivering one wrote. They are kept for ``history.maxAge`` and at most
``history.maxRows`` of them, the oldest going first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..model import Event

__all__ = [
    "PAGE_MAX",
    "RECORDED_STEPS",
    "SCAN_MAX",
    "TRACE_MAX",
    "Attempt",
    "Commit",
    "EventTrace",
    "HistoryPage",
    "HistoryQuery",
    "HistoryRecord",
    "Step",
]

# The most records one page holds.
PAGE_MAX = 1000
# The most records one page examines: filters no index serves (outcome, repository, digest)
# stop there and hand out a cursor, so a page costs a bounded amount whatever is asked.
SCAN_MAX = 10_000
# The most records one trace holds (the newest; an event retried for days has many).
TRACE_MAX = 1000


class Step(enum.StrEnum):
    """What a record says happened to an event at a sink."""

    #: The event was committed to the queue (a trace's first step; no sink).
    COMMITTED = "committed"
    #: An attempt reached the sink.
    DELIVERED = "delivered"
    #: An attempt failed; the event is due again at ``retry_at``.
    FAILED = "failed"
    #: An attempt failed for good (rejected, or the retry budget is spent): a dead letter.
    DEAD = "dead"
    #: An operator moved the dead letter back to pending.
    REPLAYED = "replayed"


# The steps a history record can hold (a commit is known from the event itself).
RECORDED_STEPS = (Step.DELIVERED, Step.FAILED, Step.DEAD, Step.REPLAYED)


@dataclass(frozen=True)
class Attempt:
    """One send as the history records it, handed to the queue with its outcome."""

    # Unix time the send began, and seconds until the sink answered or the send failed.
    started: float
    latency: float
    # Events in the message (request, NATS message) that carried this one.
    batch: int
    # The sink's answer ("HTTP 202", "JetStream ack"); None when none came.
    status: str | None = None
    # Why it failed, in words; None when delivered.
    error: str | None = None


@dataclass(frozen=True)
class HistoryRecord:
    # The record's place in the history: the paging cursor, newest highest.
    id: int
    # Unix time the queue recorded it (the attempt began ``latency`` before, about).
    time: float
    sink: str
    event_id: str
    # The event's position in the queue.
    seq: int
    step: Step
    # Attempts: its number (1 = the first since the event was queued or replayed), the
    # sink's answer, the error in words, seconds, events in the message, when retried.
    attempt: int | None = None
    status: str | None = None
    error: str | None = None
    latency: float | None = None
    batch: int | None = None
    retry_at: float | None = None
    # Replays: who asked.
    by: str | None = None
    # The event, while the queue still holds it.
    event: Event | None = None


@dataclass(frozen=True)
class HistoryQuery:
    """A page of the history, newest first; None leaves a filter out."""

    sink: str | None = None
    event_id: str | None = None
    repository: str | None = None
    digest: str | None = None
    steps: frozenset[Step] | None = None
    # Unix times, both inclusive.
    since: float | None = None
    until: float | None = None
    # The cursor: only records older than this id (a page's ``next``).
    before: int | None = None
    limit: int = 100


@dataclass(frozen=True)
class HistoryPage:
    records: list[HistoryRecord]
    # The ``before`` of the next page; None when no older record can match. A page may hold
    # fewer than ``limit`` records and still have a next one (see SCAN_MAX).
    next: int | None


@dataclass(frozen=True)
class Commit:
    """An event's commit to the queue (an event id that GC reports again has two)."""

    seq: int
    # Unix time of the commit; None when the queue did not record it (older queue files).
    time: float | None


@dataclass(frozen=True)
class EventTrace:
    """Everything the queue knows of one event's path, oldest first."""

    event_id: str
    # The event itself, while the queue still holds it.
    event: Event | None
    commits: list[Commit]
    records: list[HistoryRecord]
    # Whether older records were left out (more than TRACE_MAX).
    truncated: bool = False
    # The sinks that still owe it ("pending" or "dead"), where the queue can tell (the
    # SQLite outbox); None where it cannot, and the records must say.
    owed: dict[str, str] | None = None
