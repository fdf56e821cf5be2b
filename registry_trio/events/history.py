"""What operators see of the delivery history: one shape for the admin API and the CLI.

:func:`parse_query` turns query parameters into a :class:`HistoryQuery`, refusing what it
cannot read with :class:`BadParameter` (naming the parameter); :func:`page_json` and
:func:`trace_json` are the JSON the admin API answers and ``registry-trio events history
--json`` / ``trace --json`` print, online or offline alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from .queue import EventTrace, HistoryPage, HistoryQuery, HistoryRecord, Step
from .queue.history import PAGE_MAX, RECORDED_STEPS
from .status import iso_time

__all__ = [
    "HISTORY_PARAMETERS",
    "BadParameter",
    "check_event_id",
    "page_json",
    "parse_query",
    "record_json",
    "trace_json",
    "unknown_event",
]

# The query parameters of GET /_registry/events/history; any other is refused.
HISTORY_PARAMETERS = (
    "sink",
    "event",
    "repository",
    "digest",
    "outcome",
    "since",
    "until",
    "limit",
    "before",
)
# Longer values name nothing the queue holds: refused before any query.
MAX_TEXT = 1024
MAX_EVENT_ID = 256
# The largest id SQLite (and a JetStream sequence) can hold: a cursor past it is no cursor.
MAX_CURSOR = 2**63 - 1


class BadParameter(ValueError):
    """A query parameter that cannot be read; the message names it and says what would do."""

    def __init__(self, parameter: str, reason: str) -> None:
        super().__init__(f"{parameter}: {reason}")
        self.parameter = parameter


def _text(parameter: str, value: str, longest: int = MAX_TEXT) -> str:
    if not value or len(value) > longest:
        raise BadParameter(parameter, f"must be 1 to {longest} characters")
    if not value.isprintable():
        raise BadParameter(parameter, "must not hold control characters")
    return value


def check_event_id(value: str, parameter: str = "event") -> str:
    """An event id as given, or :class:`BadParameter`."""
    return _text(parameter, value, MAX_EVENT_ID)


def _whole_number(parameter: str, value: str, lowest: int, highest: int) -> int:
    if not value.isdigit() or len(value) > 19 or not lowest <= int(value) <= highest:
        raise BadParameter(parameter, f"must be a whole number from {lowest} to {highest}")
    return int(value)


def _time(parameter: str, value: str) -> float:
    try:
        if len(value) > 64:
            raise ValueError
        when = datetime.fromisoformat(value)
    except ValueError:
        raise BadParameter(
            parameter, "must be an ISO-8601 time, e.g. 2026-11-23T11:30:00Z"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # a time without a zone is UTC, as the records are
    return when.timestamp()


# Records show their time cut to the millisecond (as every time of the admin API), after
# rounding to the microsecond: a range given in shown times holds exactly the records shown
# within it, the ends included.
_MILLISECOND, _MICROSECOND = 1e-3, 1e-6


def _steps(value: str) -> frozenset[Step]:
    names = [name.strip() for name in value.split(",")]
    known = {str(step): step for step in RECORDED_STEPS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise BadParameter(
            "outcome", f"unknown outcome {unknown[0]!r}; use any of {', '.join(known)}"
        )
    return frozenset(known[name] for name in names)


def parse_query(args: Mapping[str, Sequence[str]]) -> HistoryQuery:
    """A :class:`HistoryQuery` from query parameters (each name to the values given)."""
    for name, values in args.items():
        if name not in HISTORY_PARAMETERS:
            raise BadParameter(name, f"unknown parameter; use {', '.join(HISTORY_PARAMETERS)}")
        if len(values) != 1:
            raise BadParameter(name, "give it once")
    one = {name: values[0] for name, values in args.items()}
    since = _time("since", one["since"]) - _MICROSECOND / 2 if "since" in one else None
    if "until" in one:
        until: float | None = _time("until", one["until"]) + _MILLISECOND - _MICROSECOND / 2
    else:
        until = None
    if since is not None and until is not None and since > until:
        raise BadParameter("since", "is after until")
    return HistoryQuery(
        sink=_text("sink", one["sink"]) if "sink" in one else None,
        event_id=check_event_id(one["event"]) if "event" in one else None,
        repository=_text("repository", one["repository"]) if "repository" in one else None,
        digest=_text("digest", one["digest"]) if "digest" in one else None,
        steps=_steps(one["outcome"]) if "outcome" in one else None,
        since=since,
        until=until,
        before=_whole_number("before", one["before"], 1, MAX_CURSOR) if "before" in one else None,
        limit=_whole_number("limit", one["limit"], 1, PAGE_MAX) if "limit" in one else 100,
    )


def unknown_event(event_id: str) -> str:
    """What to say of an event id the queue has no trace of."""
    return (
        f"the queue knows nothing of event {event_id!r}: it was never attempted (and is not "
        "among the newest queued events), or its history was pruned"
    )


def record_json(record: HistoryRecord) -> dict[str, Any]:
    event = record.event
    return {
        "id": record.id,
        "time": iso_time(record.time),
        "sink": record.sink,
        "event": record.event_id,
        "seq": record.seq,
        "outcome": str(record.step),
        "attempt": record.attempt,
        "status": record.status,
        "error": record.error,
        "latencyMs": None if record.latency is None else round(record.latency * 1000, 3),
        "batch": record.batch,
        "retryAt": iso_time(record.retry_at),
        "by": record.by,
        "action": None if event is None else str(event.action),
        "repository": None if event is None else event.target.repository,
        "digest": None if event is None else event.target.digest,
    }


def page_json(page: HistoryPage) -> dict[str, Any]:
    return {"records": [record_json(r) for r in page.records], "next": page.next}


# A sink's state from its last record, when the queue cannot say what it still owes.
_STATE_AFTER = {
    Step.DELIVERED: "delivered",
    Step.FAILED: "retrying",
    Step.DEAD: "dead",
    Step.REPLAYED: "pending",
}


def _sinks(trace: EventTrace) -> list[dict[str, Any]]:
    last: dict[str, HistoryRecord] = {}
    attempts: dict[str, int] = {}
    for record in trace.records:
        last[record.sink] = record
        if record.step is not Step.REPLAYED:
            attempts[record.sink] = attempts.get(record.sink, 0) + 1
    owed = trace.owed
    summary = []
    for sink in sorted(set(last) | set(owed or ())):
        state = _STATE_AFTER[last[sink].step] if sink in last else "pending"
        if owed is not None:
            # The queue's own word: "pending" is retrying once an attempt failed.
            if sink not in owed:
                state = "delivered"
            elif owed[sink] == "dead":
                state = "dead"
            elif sink in last and last[sink].step is Step.FAILED:
                state = "retrying"
            else:
                state = "pending"
        summary.append({"sink": sink, "state": state, "attempts": attempts.get(sink, 0)})
    return summary


def trace_json(trace: EventTrace) -> dict[str, Any]:
    """The whole path of one event: what it is, each sink's state, every step in order."""
    event = trace.event
    # In time order: a commit goes before the records after it (records are in time order
    # already; a JetStream replay commits the event again, at a new position, after its
    # record). A commit of unknown time goes first.
    timed: list[tuple[float, int, dict[str, Any]]] = [
        (
            -math.inf if commit.time is None else commit.time,
            0,
            {"outcome": str(Step.COMMITTED), "time": iso_time(commit.time), "seq": commit.seq},
        )
        for commit in trace.commits
    ]
    timed += [(record.time, 1, record_json(record)) for record in trace.records]
    steps = [step for _, _, step in sorted(timed, key=lambda item: item[:2])]
    return {
        "event": trace.event_id,
        "action": None if event is None else str(event.action),
        "repository": None if event is None else event.target.repository,
        "digest": None if event is None else event.target.digest,
        "eventTime": None if event is None else iso_time(event.time.timestamp()),
        "payload": None if event is None else event.to_json(),
        "sinks": _sinks(trace),
        "steps": steps,
        "truncated": trace.truncated,
    }
