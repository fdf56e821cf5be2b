"""Operator commands behind ``registry-trio events …``: sink status, dead letters, replay,
the delivery history and one event's trace.

Each asks the running server's admin API first (only it knows what is in flight right now)
and, when no server answers on the configured address, works on the queue directory
directly (the SQLite file, or the JetStream stream): SQLite serialises writers and JetStream is
shared by design, so this is safe even if a server starts meanwhile.
"""

from __future__ import annotations

import getpass
import os
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio

from .config import Config, SinkConfig
from .events.history import BadParameter, check_event_id, page_json, parse_query, trace_json
from .events.queue import EventQueue, running_queue
from .events.status import dead_letter_page, sink_status

__all__ = ["OperatorError", "dead_letters", "history", "replay", "status", "trace"]

# Credentials for an admin API behind authentication: REGISTRY_TRIO_USER=user:password.
CREDENTIALS_ENV = "REGISTRY_TRIO_USER"


class OperatorError(Exception):
    pass


def _base_url(config: Config) -> str | None:
    if config.http.port == 0:
        return None
    host = config.http.address
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.http.port}"


def _admin(config: Config, method: str, path: str, **kwargs: Any) -> dict[str, Any] | None:
    """The admin API's JSON answer, or None when no server is listening."""
    base = _base_url(config)
    if base is None:
        return None
    auth = None
    if credentials := os.environ.get(CREDENTIALS_ENV):
        user, _, password = credentials.partition(":")
        auth = (user, password)
    try:
        response = httpx.request(method, base + path, auth=auth, timeout=10, **kwargs)
    except httpx.ConnectError:
        return None
    if response.status_code >= 400:
        try:
            message = response.json()["errors"][0]["message"]
        except (ValueError, KeyError, IndexError):
            message = response.text[:200]
        raise OperatorError(f"the server at {base} answered {response.status_code}: {message}")
    answer: dict[str, Any] = response.json()  # the admin API answers with a JSON object
    return answer


def _offline_queue(config: Config) -> AbstractAsyncContextManager[EventQueue]:
    events = config.extensions.events
    if events.queue.type == "sqlite":
        path = Path(events.queue.directory) / "events.db"
        if not path.exists():
            raise OperatorError(f"no event queue at {path} (is extensions.events.queue right?)")
    return running_queue(events)


def _sink(config: Config, name: str | None) -> SinkConfig:
    sinks = config.extensions.events.sinks
    if name is None and len(sinks) == 1:
        return sinks[0]
    for sink in sinks:
        if sink.name == name:
            return sink
    known = ", ".join(s.name for s in sinks) or "none configured"
    raise OperatorError(f"name a sink with --sink; sinks: {known}")


def status(config: Config) -> list[dict[str, Any]]:
    answer = _admin(config, "GET", "/_registry/events/sinks")
    if answer is not None:
        sinks: list[dict[str, Any]] = answer["sinks"]
        return sinks
    running = _offline_queue(config)

    async def offline() -> list[dict[str, Any]]:
        async with running as queue:
            return [await sink_status(queue, s, 0) for s in config.extensions.events.sinks]

    return trio.run(offline)


def dead_letters(config: Config, sink: str | None, limit: int, after: int) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit, "after": after}
    if sink is not None:
        params["sink"] = sink
    answer = _admin(config, "GET", "/_registry/events/dead", params=params)
    if answer is not None:
        return answer
    running, chosen = _offline_queue(config), _sink(config, sink)

    async def offline() -> dict[str, Any]:
        async with running as queue:
            return await dead_letter_page(queue, chosen, limit, after)

    return trio.run(offline)


def replay(config: Config, sink: str | None, ids: list[str] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"ids": ids} if ids else {}
    if sink is not None:
        body["sink"] = sink
    answer = _admin(config, "POST", "/_registry/events/dead/replay", json=body)
    if answer is not None:
        return answer
    running, chosen = _offline_queue(config), _sink(config, sink)

    async def offline() -> dict[str, Any]:
        async with running as queue:
            replayed = await queue.replay(chosen.name, ids, by=_offline_operator())
        return {"sink": chosen.name, "replayed": replayed}

    return trio.run(offline)


def _offline_operator() -> str:
    """Who replays without the server: the user running the command, as the system knows."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name, and no passwd entry for the uid
        user = f"uid {os.getuid()}"
    return f"{user} (registry-trio events replay, offline)"


# Outcomes --failed asks for: attempts that failed, retried or buried.
FAILED_OUTCOMES = "failed,dead"


def history(
    config: Config,
    sink: str | None,
    failed: bool,
    limit: int,
    before: int | None = None,
) -> dict[str, Any]:
    """Up to ``limit`` records, newest first, following the pages' cursors as needed (a page
    may come back short when its filters examined their share of the history)."""
    params: dict[str, str] = {}
    if sink is not None:
        params["sink"] = sink
    if failed:
        params["outcome"] = FAILED_OUTCOMES
    records: list[dict[str, Any]] = []
    cursor = before

    def query() -> dict[str, str]:
        page = {**params, "limit": str(min(limit - len(records), 1000))}
        return page if cursor is None else {**page, "before": str(cursor)}

    online = _admin(config, "GET", "/_registry/events/history", params=query())
    if online is not None:
        while True:
            records += online["records"]
            cursor = online["next"]
            if cursor is None or len(records) >= limit:
                return {"records": records, "next": cursor}
            online = _admin(config, "GET", "/_registry/events/history", params=query())
            if online is None:
                raise OperatorError("the server stopped answering while paging")
    running = _offline_queue(config)

    async def offline() -> dict[str, Any]:
        nonlocal cursor, records
        async with running as queue:
            while True:
                try:
                    parsed = parse_query({k: [v] for k, v in query().items()})
                except BadParameter as exc:
                    raise OperatorError(str(exc)) from None
                page = page_json(await queue.history(parsed))
                records += page["records"]
                cursor = page["next"]
                if cursor is None or len(records) >= limit:
                    return {"records": records, "next": cursor}

    return trio.run(offline)


def trace(config: Config, event_id: str) -> dict[str, Any]:
    try:
        check_event_id(event_id, "EVENT_ID")
    except BadParameter as exc:
        raise OperatorError(str(exc)) from None
    answer = _admin(config, "GET", f"/_registry/events/trace/{quote(event_id, safe='')}")
    if answer is not None:
        return answer
    running = _offline_queue(config)

    async def offline() -> dict[str, Any]:
        async with running as queue:
            found = await queue.trace(event_id)
        if found is None:
            raise OperatorError(
                f"the queue knows nothing of event {event_id!r}: it was never attempted (and "
                "is not among the newest queued events), or its history was pruned"
            )
        return trace_json(found)

    return trio.run(offline)
