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
import ssl
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio

from .config import Config, SinkConfig
from .events.history import (
    BadParameter,
    check_event_id,
    page_json,
    parse_query,
    trace_json,
    unknown_event,
)
from .events.queue import EventQueue, running_queue
from .events.status import SinkNotChosen, choose_sink, dead_letter_page, sink_status

__all__ = ["OperatorError", "dead_letters", "event_trace", "history", "replay", "status"]

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
    scheme = "http" if config.http.tls is None else "https"
    return f"{scheme}://{host}:{config.http.port}"


def _server_trust(config: Config) -> ssl.SSLContext | bool:
    """What the admin API's certificate is checked against: under TLS, the server's own
    certificate file, as the one trust anchor (so whatever name it was issued for, only the
    server of this config is believed: nothing else on the port gets the credentials)."""
    if config.http.tls is None:
        return True  # unused: plain HTTP
    context = ssl.create_default_context(cafile=config.http.tls.cert)
    context.check_hostname = False  # the address is the config's, not the certificate's name
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a leaf as a trust anchor
    return context


def _nobody_listening(exc: BaseException) -> bool:
    """Whether a failed connection was refused: no server on the port (httpx wraps the
    OSError in two layers of its own)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


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
        response = httpx.request(
            method, base + path, auth=auth, timeout=10, verify=_server_trust(config), **kwargs
        )
    except httpx.TransportError as exc:
        if _nobody_listening(exc):
            return None
        hint = ""
        if config.http.tls is not None and config.http.tls.cacert is not None:
            hint = (
                " (it wants a client certificate, http.tls.cacert, which these commands do "
                "not present: stop the server to work on the queue directly, or call the "
                "admin API with one, e.g. curl --cert)"
            )
        raise OperatorError(
            f"cannot talk to the server at {base}: {type(exc).__name__}: {exc}{hint}"
        ) from None
    if response.status_code >= 400:
        try:
            message = response.json()["errors"][0]["message"]
        except (ValueError, KeyError, IndexError):
            message = response.text[:200]
        if response.status_code == 401 and auth is None:
            message += (
                f"; log in as an administrator (adminPolicy) with "
                f"{CREDENTIALS_ENV}=user:password in the environment"
            )
        elif response.status_code == 401:
            message += f"; the user and password in {CREDENTIALS_ENV} were refused"
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
    try:
        return choose_sink(config.extensions.events.sinks, name)
    except SinkNotChosen as exc:
        raise OperatorError(str(exc)) from None


def status(config: Config) -> tuple[list[dict[str, Any]], str]:
    """Every sink's status, and a line saying who delivers (or that no server answered)."""
    answer = _admin(config, "GET", "/_registry/events/sinks")
    if answer is not None:
        sinks: list[dict[str, Any]] = answer["sinks"]
        deliverer = answer.get("deliverer")
        if deliverer is None:
            return sinks, "delivered by: no process right now (a new leader is taking over)"
        worker = "" if deliverer["worker"] is None else f"worker {deliverer['worker']}, "
        return sinks, f"delivered by: {worker}pid {deliverer['pid']}"
    running = _offline_queue(config)

    async def offline() -> list[dict[str, Any]]:
        async with running as queue:
            return [await sink_status(queue, s, 0) for s in config.extensions.events.sinks]

    return trio.run(offline), "no server answered: read from the queue directory"


def dead_letters(config: Config, sink: str | None, limit: int, after: int) -> dict[str, Any]:
    # Chosen from the config first: the server runs with the same sinks, and the message
    # is then the same whether it answers or not.
    chosen = _sink(config, sink)
    params: dict[str, Any] = {"sink": chosen.name, "limit": limit, "after": after}
    answer = _admin(config, "GET", "/_registry/events/dead", params=params)
    if answer is not None:
        return answer
    running = _offline_queue(config)

    async def offline() -> dict[str, Any]:
        async with running as queue:
            return await dead_letter_page(queue, chosen, limit, after)

    return trio.run(offline)


def replay(config: Config, sink: str | None, ids: list[str] | None) -> dict[str, Any]:
    chosen = _sink(config, sink)  # as for dead_letters
    body: dict[str, Any] = {"sink": chosen.name}
    if ids:
        body["ids"] = ids
    answer = _admin(config, "POST", "/_registry/events/dead/replay", json=body)
    if answer is not None:
        return answer
    running = _offline_queue(config)

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
    collected: dict[str, Any] = {"records": [], "next": before}

    def query() -> dict[str, str]:
        wanted = {**params, "limit": str(min(limit - len(collected["records"]), 1000))}
        cursor = collected["next"]
        return wanted if cursor is None else {**wanted, "before": str(cursor)}

    def enough(page: dict[str, Any]) -> bool:
        """Take a page in; whether the listing is complete."""
        collected["records"] += page["records"]
        collected["next"] = page["next"]
        return page["next"] is None or len(collected["records"]) >= limit

    online = _admin(config, "GET", "/_registry/events/history", params=query())
    if online is not None:
        while not enough(online):
            online = _admin(config, "GET", "/_registry/events/history", params=query())
            if online is None:
                raise OperatorError("the server stopped answering while paging")
        return collected
    running = _offline_queue(config)

    async def offline() -> dict[str, Any]:
        async with running as queue:
            while True:
                try:
                    parsed = parse_query({k: [v] for k, v in query().items()})
                except BadParameter as exc:
                    raise OperatorError(str(exc)) from None
                if enough(page_json(await queue.history(parsed))):
                    return collected

    return trio.run(offline)


def event_trace(config: Config, event_id: str) -> dict[str, Any]:
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
            raise OperatorError(unknown_event(event_id))
        return trace_json(found)

    return trio.run(offline)
