"""The one call the API makes: hand over events and return only once they are durable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .model import Action, Event


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


class NullRecorder:
    """Used when the events extension is off: nothing is wanted, nothing is stored."""

    def wants(self, action: Action) -> bool:
        return False

    async def record(self, events: Sequence[Event]) -> None:
        return None
