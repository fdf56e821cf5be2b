"""The one call the API makes: hand over events and return only once they are durable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from .model import Action, Event
from .queue.base import APPENDED, PendingAppend

if TYPE_CHECKING:
    from .filters import SinkFilter
    from .queue import EventQueue


class EventRecorder(Protocol):
    def wants(self, action: Action) -> bool:
        """Whether any sink could receive ``action`` (pull events are opt-in, and costly)."""
        ...

    async def record(self, events: Sequence[Event]) -> None:
        """Return once ``events`` are committed durably; raise if they cannot be.

        The API awaits this before it sends the 2xx, which is the whole of the guarantee
        "durable before acknowledged".
        """
        ...

    def begin_record(self, events: Sequence[Event]) -> PendingAppend:
        """:meth:`record` in two steps: the events' place in the queue is fixed on return,
        their durability awaited with the result's ``wait``."""
        ...


class NullRecorder:
    """Used when the events extension is off: nothing is wanted, nothing is stored."""

    def wants(self, action: Action) -> bool:
        return False

    async def record(self, events: Sequence[Event]) -> None:
        return None

    def begin_record(self, events: Sequence[Event]) -> PendingAppend:
        return APPENDED


class QueueRecorder:
    """Routes each event to the sinks whose filter matches, through the durable queue."""

    def __init__(self, queue: EventQueue, filters: Sequence[SinkFilter]) -> None:
        self._queue = queue
        self._filters = tuple(filters)

    def wants(self, action: Action) -> bool:
        return any(f.wants(action) for f in self._filters)

    async def record(self, events: Sequence[Event]) -> None:
        await self.begin_record(events).wait()

    def begin_record(self, events: Sequence[Event]) -> PendingAppend:
        return self._queue.begin_append(
            [(e, [f.sink for f in self._filters if f.matches(e)]) for e in events]
        )
