"""A sink's state and delivery rate, from the figures the shared queue keeps.

The queue knows, per sink, the events pending and the time of the oldest, the times of the
last failed attempt and of the last acknowledged delivery, and how many events were
delivered since it was created. From these:

- **delivering**: nothing owed has failed: no event is pending, or every pending event is
  younger than the last failed attempt (so none of them failed);
- **failing**: an event pending now was already there at the last failure, and nothing was
  delivered since;
- **retrying**: the same, but a delivery was acknowledged since the last failure: a receiver
  that fails now and then, or one back from an outage and working through the backlog.

The rate per minute compares the delivered count with what this process read before
(:class:`DeliveryRates`): every worker process can answer the console, and what one saw
needs no other.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["DeliveryRates", "SinkState", "sink_state"]

# Samples further apart than this are enough: a console refreshing fast adds none between.
SAMPLE_EVERY = 1.0
# The rate is over the readings of the last minute; older ones are dropped.
RATE_WINDOW = 60.0


class SinkState(enum.StrEnum):
    DELIVERING = "delivering"
    RETRYING = "retrying"
    FAILING = "failing"


@dataclass(frozen=True)
class _Sample:
    at: float
    delivered: int


class DeliveryRates:
    """Per sink, the delivered count as this process read it over the last minute.

    Bounded whatever the callers do: at most one sample per :data:`SAMPLE_EVERY` per sink,
    none older than :data:`RATE_WINDOW`, for the configured sinks only.
    """

    def __init__(self) -> None:
        self._samples: dict[str, deque[_Sample]] = {}

    def observe(self, sink: str, delivered: int, now: float) -> float | None:
        """Record a reading; the rate per minute over the last minute of readings (None
        until they span a second)."""
        samples = self._samples.setdefault(sink, deque())
        if samples and delivered < samples[-1].delivered:
            samples.clear()  # the queue was recreated: its counts started over
        while samples and samples[0].at < now - RATE_WINDOW:
            samples.popleft()
        if not samples or now - samples[-1].at >= SAMPLE_EVERY:
            samples.append(_Sample(now, delivered))
        first = samples[0]
        elapsed = now - first.at
        if elapsed < SAMPLE_EVERY:
            return None
        return (delivered - first.delivered) / elapsed * 60


def sink_state(status: dict[str, Any], now: float) -> SinkState:
    """The state of a sink from its status (:func:`~registry_trio.events.status.sink_status`)."""
    failed_at, age = status["lastErrorAt"], status["oldestPendingAge"]
    if not status["pending"] or failed_at is None or age is None:
        return SinkState.DELIVERING
    if now - age > datetime.fromisoformat(failed_at).timestamp():
        return SinkState.DELIVERING  # every pending event came after the last failure
    return SinkState.RETRYING if status["recovered"] else SinkState.FAILING
