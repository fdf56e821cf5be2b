"""The delivery history on the console's pages: a sink's recent attempts, an event's path.

Both read the shared queue as the admin API's history endpoints do, in the same JSON
(:mod:`registry_trio.events.history`); with the history off (``extensions.events.history.
enable: false``) each answers None and the pages say "history not available".
"""

from __future__ import annotations

from typing import Any

from ..api.context import Registry
from ..events.history import BadParameter, check_event_id, page_json, trace_json
from ..events.queue import HistoryQuery

__all__ = ["RECENT", "event_path", "history_on", "recent_attempts"]

# The attempts a sink's page shows (the newest).
RECENT = 50


def history_on(registry: Registry) -> bool:
    return registry.queue is not None and registry.config.extensions.events.history.enable


async def recent_attempts(registry: Registry, sink: str) -> list[dict[str, Any]] | None:
    """The sink's latest delivery attempts, newest first; None without history."""
    if registry.queue is None or not history_on(registry):
        return None
    page = await registry.queue.history(HistoryQuery(sink=sink, limit=RECENT))
    records: list[dict[str, Any]] = page_json(page)["records"]
    return records


async def event_path(registry: Registry, event_id: str) -> dict[str, Any] | None:
    """The whole path of one event across sinks; None without history, or when the history
    knows nothing of it (an id no event has, or one pruned)."""
    if registry.queue is None or not history_on(registry):
        return None
    try:
        check_event_id(event_id, "id")
    except BadParameter:
        return None
    found = await registry.queue.trace(event_id)
    return None if found is None else trace_json(found)
