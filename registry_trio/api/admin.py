"""The operator's API under ``/_registry/``: sink status, dead letters, replay, history.

Every route requires :attr:`Access.ADMIN`: ``adminPolicy`` users when authentication is
configured, otherwise only clients on the loopback interface.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from quart import Response, jsonify, request

from ..config import SinkConfig
from ..events.history import (
    BadParameter,
    check_event_id,
    page_json,
    parse_query,
    trace_json,
    unknown_event,
)
from ..events.queue import EventQueue
from ..events.status import (
    DEAD_PAGE_MAX,
    SinkNotChosen,
    choose_sink,
    dead_letter_page,
    sink_status,
)
from .context import CLIENT_ADDR_KEY, Registry, current_registry, identity
from .errors import RegistryError

__all__ = ["dead", "event_trace", "history", "replay", "replayer", "sinks"]


def _event_queue(registry: Registry) -> EventQueue:
    if registry.queue is None:
        raise RegistryError("UNSUPPORTED", 404, "the events extension is not enabled")
    return registry.queue


def _sink(registry: Registry, name: str | None) -> SinkConfig:
    try:
        return choose_sink(registry.config.extensions.events.sinks, name, '"sink"')
    except SinkNotChosen as exc:
        raise RegistryError("UNSUPPORTED", 404 if exc.unknown else 400, str(exc)) from None


async def sinks() -> Response:
    """Every sink's figures from the shared queue, and which process delivers.

    Sends in flight are known only to the delivering process: another worker answers null.
    """
    registry = current_registry()
    queue = _event_queue(registry)
    delivery = registry.delivery
    in_flight = {} if delivery is None else {w.name: w.in_flight for w in delivery.workers}
    statuses = [
        await sink_status(queue, sink, in_flight.get(sink.name))
        for sink in registry.config.extensions.events.sinks
    ]
    deliverer = registry.deliverer()
    return jsonify(
        {"sinks": statuses, "deliverer": None if deliverer is None else deliverer.to_json()}
    )


def _int_arg(name: str, default: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()):  # "²" is a digit int() refuses
        raise RegistryError("UNSUPPORTED", 400, f"{name} must be a non-negative integer")
    return int(raw)


async def dead() -> Response:
    registry = current_registry()
    queue = _event_queue(registry)
    sink = _sink(registry, request.args.get("sink"))
    limit = _int_arg("limit", 100)
    if not 1 <= limit <= DEAD_PAGE_MAX:
        raise RegistryError("UNSUPPORTED", 400, f"limit must be between 1 and {DEAD_PAGE_MAX}")
    return jsonify(await dead_letter_page(queue, sink, limit, _int_arg("after", 0)))


async def replay() -> Response:
    registry = current_registry()
    queue = _event_queue(registry)
    body = await request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise RegistryError(
            "UNSUPPORTED", 400, 'expected a JSON object: {"sink": ..., "ids": [...]}'
        )
    sink = _sink(registry, body.get("sink"))
    ids = body.get("ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        raise RegistryError("UNSUPPORTED", 400, "ids must be a list of event ids")
    replayed = await queue.replay(str(sink.name), ids, by=replayer(request.scope))
    return jsonify({"sink": sink.name, "replayed": replayed})


def replayer(scope: Mapping[str, Any]) -> str:
    """Who replays, as the delivery history records it: the admin user, or, without
    authentication, the loopback client's address."""
    return identity(scope).name or f"anonymous at {scope.get(CLIENT_ADDR_KEY)}"


def _bad(exc: BadParameter) -> RegistryError:
    return RegistryError("UNSUPPORTED", 400, str(exc), {"parameter": exc.parameter})


async def history() -> Response:
    """A page of the delivery history, newest first (filters and cursor: see the README)."""
    queue = _event_queue(current_registry())
    try:
        query = parse_query(request.args.to_dict(flat=False))
    except BadParameter as exc:
        raise _bad(exc) from None
    return jsonify(page_json(await queue.history(query)))


async def event_trace(event: str) -> Response:
    """The whole path of one event: its payload, its commit, every step at every sink."""
    queue = _event_queue(current_registry())
    try:
        event_id = check_event_id(event)
    except BadParameter as exc:
        raise _bad(exc) from None
    found = await queue.trace(event_id)
    if found is None:
        raise RegistryError("UNSUPPORTED", 404, unknown_event(event_id))
    return jsonify(trace_json(found))
