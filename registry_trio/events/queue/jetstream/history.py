"""The delivery history on JetStream: a stream of records, pruned by the stream's own limits.

Layout, for ``queue.stream: S``::

    stream S_HISTORY   subjects S.history.<sink>.<event>   file storage, limits retention:
                       max_age = history.maxAge, max_msgs = history.maxRows, discard old

One message per step (attempt, dead letter, replay) of one event at one sink, its body the
record as JSON with the event itself (the event's own message leaves the queue stream once
delivered, and a trace shows the payload). ``<sink>`` and ``<event>`` are hashes of the names
(:func:`~.operations.sink_token`, :func:`event_token`), so a subject filter finds one sink's
or one event's records on the server; the record holds the names themselves. A record's id
is its sequence in ``S_HISTORY``, its time the stream's timestamp, which never goes back.

JetStream deletes what is past the limits by itself, so nothing here prunes, and nothing
delivery does waits for it.

Reading newest first: JetStream hands out "the next message matching a subject at or after a
sequence", never "the previous one". A page walks back in windows, reading each forward
(``next_by_subj``), within a budget of calls; a time range becomes a sequence range by a
binary search on the stream's timestamps.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import nats.js.errors
from nats.js import JetStreamContext, api

from ...model import Event
from ..history import (
    TRACE_MAX,
    Attempt,
    Commit,
    EventTrace,
    HistoryPage,
    HistoryQuery,
    HistoryRecord,
    Step,
)

__all__ = [
    "HistoryStream",
    "attempt_record",
    "event_token",
    "replay_record",
]

# Round trips one page or trace may make to the server (each reads one record, or finds
# none in a window): a page costs a bounded amount, as SCAN_MAX bounds one in SQLite.
CALLS_MAX = 2000
# A page walks back this many sequences at first, doubling while windows come back empty.
WINDOW = 256
WINDOW_MAX = 65_536
# The server's default duplicate window, or maxAge when shorter (it may not be longer).
DUPLICATE_WINDOW = 120.0


def event_token(event_id: str) -> str:
    """A subject token for an event id (ids may hold any character)."""
    return hashlib.sha256(event_id.encode()).hexdigest()[:16]


def _body(
    sink: str,
    event: Event,
    seq: int,
    step: Step,
    *,
    attempt: int | None = None,
    outcome: Attempt | None = None,
    retry_at: float | None = None,
    by: str | None = None,
    committed: float | None = None,
) -> bytes:
    return json.dumps(
        {
            "sink": sink,
            "event": event.id,
            "seq": seq,
            "step": str(step),
            "attempt": attempt,
            "status": None if outcome is None else outcome.status,
            "error": None if outcome is None else outcome.error,
            "latency": None if outcome is None else outcome.latency,
            "batch": None if outcome is None else outcome.batch,
            "retryAt": retry_at,
            "by": by,
            "committed": committed,
            "payload": event.to_json(),
        }
    ).encode()


def attempt_record(
    sink: str,
    event: Event,
    seq: int,
    number: int,
    step: Step,
    outcome: Attempt,
    retry_at: float | None,
    committed: float | None,
) -> tuple[Event, bytes]:
    """One attempt's record (published with its subject by :class:`HistoryStream`)."""
    body = _body(
        sink,
        event,
        seq,
        step,
        attempt=number,
        outcome=outcome,
        retry_at=retry_at,
        committed=committed,
    )
    return event, body


def replay_record(sink: str, event: Event, seq: int, by: str | None) -> tuple[Event, bytes]:
    """A replay's record (``seq``: where the dead letter was in the queue stream); the
    position it goes back in at shows in the attempts that follow."""
    return event, _body(sink, event, seq, Step.REPLAYED, by=by)


@dataclass(frozen=True)
class _Read:
    """A record read back, with what the stream says of it."""

    seq: int
    time: float
    doc: dict[str, Any]


def _record(read: _Read) -> HistoryRecord | None:
    """The record a message holds; None for one that is not a record of ours (the subjects
    are open to any NATS client allowed to publish on them)."""
    try:
        return _parse(read)
    except (KeyError, TypeError, ValueError):
        return None


def _parse(read: _Read) -> HistoryRecord:
    doc = read.doc
    payload = doc.get("payload")
    return HistoryRecord(
        id=read.seq,
        time=read.time,
        sink=doc["sink"],
        event_id=doc["event"],
        seq=doc["seq"],
        step=Step(doc["step"]),
        attempt=doc.get("attempt"),
        status=doc.get("status"),
        error=doc.get("error"),
        latency=doc.get("latency"),
        batch=doc.get("batch"),
        retry_at=doc.get("retryAt"),
        by=doc.get("by"),
        event=None if payload is None else Event.from_json(payload),
    )


def _matches(record: HistoryRecord, query: HistoryQuery) -> bool:
    target = None if record.event is None else record.event.target
    return (
        (query.event_id is None or record.event_id == query.event_id)
        and (query.sink is None or record.sink == query.sink)
        and (query.steps is None or record.step in query.steps)
        and (
            query.repository is None
            or (target is not None and target.repository == query.repository)
        )
        and (query.digest is None or (target is not None and target.digest == query.digest))
    )


class HistoryStream:
    """The history stream of one queue; every method runs on the queue's asyncio thread."""

    def __init__(self, js: JetStreamContext, stream: str, sink_token: Callable[[str], str]) -> None:
        self._js = js
        self.name = f"{stream}_HISTORY"
        self._prefix = f"{stream}.history"
        self._sink_token = sink_token

    def config(self, max_age: float, max_rows: int, replicas: int) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.name,
            subjects=[f"{self._prefix}.*.*"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=replicas,
            max_age=max_age,
            max_msgs=max_rows,
            discard=api.DiscardPolicy.OLD,
            # Records carry no message id; JetStream only asks that the window fit the age.
            duplicate_window=min(max_age, DUPLICATE_WINDOW),
        )

    def subject(self, sink: str, event_id: str) -> str:
        return f"{self._prefix}.{self._sink_token(sink)}.{event_token(event_id)}"

    async def publish(self, sink: str, records: Sequence[tuple[Event, bytes]]) -> None:
        """Publish records, pipelined; raise the first failure."""
        results = await asyncio.gather(
            *(self._js.publish(self.subject(sink, event.id), body) for event, body in records),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # -- reading -------------------------------------------------------------------------------

    async def _next(self, seq: int, subject: str) -> _Read | None:
        try:
            raw = await self._js.get_msg(self.name, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return None
        # A stored message always has its sequence and time (nats-py types them optional).
        when = raw.time.timestamp() if raw.time is not None else 0.0
        try:
            doc = json.loads(raw.data or b"{}")
        except ValueError:
            doc = {}
        return _Read(cast(int, raw.seq), when, doc if isinstance(doc, dict) else {})

    async def _bounds(self) -> tuple[int, int] | None:
        try:
            state = (await self._js.stream_info(self.name)).state
        except nats.js.errors.NotFoundError:
            return None
        if not state.messages:
            return None
        return state.first_seq, state.last_seq

    async def _first_at(self, when: float, low: int, high: int) -> int:
        """The first sequence in [low, high + 1] whose time is at or after ``when``."""
        everything = f"{self._prefix}.>"
        while low <= high:
            middle = (low + high) // 2
            found = await self._next(middle, everything)
            if found is None or found.seq > high or found.time >= when:
                high = middle - 1
            else:
                low = found.seq + 1
        return low

    def _filter(self, query: HistoryQuery) -> str:
        sink = "*" if query.sink is None else self._sink_token(query.sink)
        event = "*" if query.event_id is None else event_token(query.event_id)
        return f"{self._prefix}.{sink}.{event}"

    async def _forward(self, subject: str, low: int, high: int) -> AsyncIterator[_Read]:
        seq = low
        while seq <= high:
            found = await self._next(seq, subject)
            if found is None or found.seq > high:
                return
            yield found
            seq = found.seq + 1

    async def _walk(
        self, query: HistoryQuery
    ) -> tuple[list[tuple[_Read, HistoryRecord]], int | None]:
        """Matching records newest first, up to ``query.limit``, and the next cursor."""
        bounds = await self._bounds()
        if bounds is None:
            return [], None
        low, high = bounds
        if query.before is not None:
            high = min(high, query.before - 1)
        if query.since is not None:
            low = await self._first_at(query.since, low, high)
        if query.until is not None:
            high = await self._first_at(query.until + 1e-6, low, high) - 1
        subject = self._filter(query)
        found: list[tuple[_Read, HistoryRecord]] = []
        calls, window, top = 0, WINDOW, high
        while top >= low and calls < CALLS_MAX:
            # A window is read forward, so it is read whole: never wider than the calls left
            # (a window of n sequences takes at most n + 1 calls).
            bottom = max(low, top - min(window, CALLS_MAX - calls) + 1)
            reads = []
            async for read in self._forward(subject, bottom, top):
                reads.append(read)
                calls += 1
            calls += 1  # the call that found the window's end
            for read in reversed(reads):
                record = _record(read)
                if record is not None and _matches(record, query):
                    found.append((read, record))
            top = bottom - 1
            if len(found) > query.limit:
                return found[: query.limit], found[query.limit - 1][0].seq
            if len(reads) < WINDOW // 8:
                # Sparse (one event's records, a quiet sink): look further back per call.
                window = min(window * 2, WINDOW_MAX)
        # Out of budget with older records left: the next page goes on below this one.
        return found, top + 1 if top >= low else None

    async def page(self, query: HistoryQuery) -> HistoryPage:
        found, cursor = await self._walk(query)
        return HistoryPage([record for _, record in found], cursor)

    async def trace(self, event_id: str) -> EventTrace | None:
        newest, cursor = await self._walk(HistoryQuery(event_id=event_id, limit=TRACE_MAX))
        if not newest:
            return None
        found = newest[::-1]
        records = [record for _, record in found]
        event = next((r.event for r in reversed(records) if r.event is not None), None)
        # Each position the event took in the queue stream (a replay publishes it again).
        commits: dict[int, float | None] = {}
        for read, record in found:
            committed = read.doc.get("committed")
            if not isinstance(committed, int | float) or isinstance(committed, bool):
                committed = None
            commits.setdefault(record.seq, committed)
        return EventTrace(
            event_id,
            event,
            [Commit(seq, when) for seq, when in commits.items()],
            records,
            truncated=cursor is not None,
        )
