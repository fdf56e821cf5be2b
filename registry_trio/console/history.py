"""The delivery history, where the queue keeps one: a sink's recent attempts, an event's path.

Both read what the admin API's history endpoints serve. Until the queue records history,
each answers None and the pages say "history not available".
"""

from __future__ import annotations

from typing import Any

from ..api.context import Registry

__all__ = ["event_path", "recent_attempts"]


async def recent_attempts(registry: Registry, sink: str) -> list[dict[str, Any]] | None:
    """The sink's latest delivery attempts, newest first; None without history."""
    return None


async def event_path(registry: Registry, event_id: str) -> dict[str, Any] | None:
    """The whole path of one event across sinks; None without history."""
    return None
