"""The console's views. Their routes are in ``registry_trio/api/routes.py``, with
:attr:`Access.CONSOLE`: by the time a view runs, the caller is an administrator (or, without
authentication, a loopback client addressing localhost).

Every parameter is a query parameter: repository and sink names hold slashes, and a path
template would make ``a/manifests/b`` ambiguous. Pages show at most a page of anything
(:data:`PAGE` rows, a cursor for the next), however large the registry or the queue.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode, urlsplit

from quart import Response, current_app, redirect, request
from werkzeug.exceptions import NotFound

from .. import oci
from ..api.admin import replayer
from ..api.context import Registry, current_registry, header, identity
from ..api.errors import RegistryError
from ..config import SinkConfig
from ..events.queue import DeadLetter, EventQueue, Outbox
from ..events.status import DEAD_PAGE_MAX, dead_letter_page, sink_status
from ..storage import FilesystemStorage, ManifestUnknown
from . import csrf, history
from .health import DeliveryRates, sink_state
from .render import page, static_file

__all__ = [
    "event",
    "manifest",
    "overview",
    "replay",
    "repositories",
    "repository",
    "sink",
    "sinks_fragment",
    "static",
]

log = logging.getLogger("registry_trio.console")

ROOT = "/_registry/ui/"
# Rows per page of repositories, tags and dead letters.
PAGE = 100
# A manifest body is shown whole up to this size, and cut there past it.
MANIFEST_SHOWN = 256 * 1024
# Longer than any event id the registry makes (a UUID, or a 64-hex-digit hash).
EVENT_ID_MAX = 200
RATES_EXTENSION = "registry_trio.console.rates"


# -- parameters -------------------------------------------------------------------------


def _arg(name: str) -> str:
    value = request.args.get(name)
    if not value:
        raise RegistryError("UNSUPPORTED", 400, f"the query parameter {name!r} is required")
    return value


def _int_arg(name: str) -> int:
    raw = request.args.get(name, "0")
    # ASCII digits only: "²" is a digit to str.isdigit, and int() refuses it.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise RegistryError("UNSUPPORTED", 400, f"{name} must be a non-negative integer")
    return int(raw)


def _event_queue(registry: Registry) -> EventQueue:
    if registry.queue is None:
        raise RegistryError("UNSUPPORTED", 404, "the events extension is not enabled")
    return registry.queue


def _sink_config(registry: Registry, name: str | None) -> SinkConfig:
    for sink in registry.config.extensions.events.sinks:
        if sink.name == name:
            return sink
    raise RegistryError("UNSUPPORTED", 404, f"no sink is named {str(name)[:200]!r}")


def _url(path: str, **query: object) -> str:
    return f"{ROOT}{path}?{urlencode(query)}"


# -- the CSRF token of the forms --------------------------------------------------------


def _login() -> str:
    """What a form's token is bound to: the request's credentials, and who they proved
    (a client certificate proves a name without any ``Authorization``)."""
    scope = cast(Any, request.scope)
    who = identity(scope)
    return f"{header(scope, b'authorization')}\n{who.method}:{who.name or ''}"


def _with_form(template: str, **context: Any) -> Response:
    """A page with a form: it carries a token for this login and the cookie's nonce."""
    nonce = csrf.nonce_of(request.cookies.get(csrf.COOKIE))
    fresh = nonce is None
    if nonce is None:
        nonce = csrf.new_nonce()
    response = page(template, csrf_token=csrf.form_token(nonce, _login()), **context)
    if fresh:
        response.set_cookie(
            csrf.COOKIE,
            nonce,
            path=ROOT,
            httponly=True,
            samesite="Strict",
            secure=request.scheme == "https",
        )
    return response


async def _checked_form() -> dict[str, list[str]]:
    """The posted form, once its token is known good; a 403 before anything else if not."""
    form = await request.form
    if not csrf.is_valid(request.cookies.get(csrf.COOKIE), _login(), form.get(csrf.FIELD)):
        raise RegistryError(
            "DENIED",
            403,
            "this form's security token is missing or does not match your login: "
            "reload the console page and submit the form again",
        )
    return {key: form.getlist(key) for key in form}


# -- events -----------------------------------------------------------------------------


def _rates() -> DeliveryRates:
    rates = current_app.extensions.setdefault(RATES_EXTENSION, DeliveryRates())
    return cast(DeliveryRates, rates)


def _in_flight(registry: Registry) -> dict[str, int]:
    delivery = registry.delivery
    return {} if delivery is None else {w.name: w.in_flight for w in delivery.workers}


async def _sink_row(registry: Registry, queue: EventQueue, sink: SinkConfig) -> dict[str, Any]:
    status = await sink_status(queue, sink, _in_flight(registry).get(sink.name))
    now = time.time()
    per_minute = _rates().observe(sink.name, status["delivered"], now)
    return {**status, "state": str(sink_state(status, now)), "perMinute": per_minute}


def _queue_file_size(path: Path) -> int:
    """The outbox on disk: the database and its write-ahead log."""
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(f"{path}{suffix}").st_size
    return total


async def _overview(registry: Registry) -> dict[str, Any]:
    queue = registry.queue
    if queue is None:
        return {"events": False, "sinks": [], "queue": None, "now": time.time()}
    rows = [await _sink_row(registry, queue, s) for s in registry.config.extensions.events.sinks]
    deliverer = registry.deliverer()
    summary = {
        "type": registry.config.extensions.events.queue.type,
        "pending": sum(r["pending"] for r in rows),
        "dead": sum(r["dead"] for r in rows),
        "bytes": await registry.io(_queue_file_size, queue.path)
        if isinstance(queue, Outbox)
        else None,
        "deliverer": None if deliverer is None else deliverer.to_json(),
    }
    return {"events": True, "sinks": rows, "queue": summary, "now": time.time()}


async def overview() -> Response:
    return page("overview.html", **await _overview(current_registry()))


async def sinks_fragment() -> Response:
    """The overview's live part, which the page fetches again every few seconds."""
    return page("_sinks.html", **await _overview(current_registry()))


async def sink() -> Response:
    registry = current_registry()
    queue = _event_queue(registry)
    config = _sink_config(registry, _arg("name"))
    letters = await dead_letter_page(queue, config, PAGE, _int_arg("after"))
    return _with_form(
        "sink.html",
        sink=await _sink_row(registry, queue, config),
        letters=letters["deadLetters"],
        next=letters["next"],
        attempts=await history.recent_attempts(registry, str(config.name)),
        replayed=_int_arg("replayed") if "replayed" in request.args else None,
    )


def _chosen_ids(form: dict[str, list[str]]) -> list[str] | None:
    """The event ids a replay form names; None for all of the sink's dead letters."""
    if form.get("all"):
        return None
    ids = form.get("one") or form.get("ids") or []
    if not ids:
        raise RegistryError(
            "UNSUPPORTED", 400, "choose the dead letters to replay, or replay them all"
        )
    if len(ids) > DEAD_PAGE_MAX or any(len(i) > EVENT_ID_MAX for i in ids):
        raise RegistryError(
            "UNSUPPORTED", 400, f"at most {DEAD_PAGE_MAX} event ids at once, each a real id"
        )
    return ids


async def replay() -> Response:
    registry = current_registry()
    form = await _checked_form()
    queue = _event_queue(registry)
    config = _sink_config(registry, next(iter(form.get("sink", ())), None))
    ids = _chosen_ids(form)
    replayed = await queue.replay(str(config.name), ids, by=replayer(request.scope))
    log.info(
        "console: %s replayed %d dead letter(s) of sink %s",
        identity(request.scope).name or "a loopback client",
        replayed,
        config.name,
    )
    # Post, redirect, get: reloading the result does not replay again.
    target = _url("sink", name=config.name, replayed=replayed)
    return cast(Response, redirect(target, 303))


async def _dead_letter(queue: EventQueue, sink: str, seq: int, event_id: str) -> DeadLetter | None:
    """The dead letter at ``seq`` of ``sink`` if it is still there and is ``event_id``."""
    if seq < 1:
        return None
    letters = await queue.dead(sink, 1, seq - 1)
    if letters and letters[0].seq == seq and letters[0].event.id == event_id:
        return letters[0]
    return None


async def event() -> Response:
    registry = current_registry()
    queue = _event_queue(registry)
    event_id = _arg("id")
    if len(event_id) > EVENT_ID_MAX:
        raise RegistryError("UNSUPPORTED", 400, f"an event id is at most {EVENT_ID_MAX} long")
    sink_name = request.args.get("sink")
    letter = None
    if sink_name:
        config = _sink_config(registry, sink_name)
        letter = await _dead_letter(queue, str(config.name), _int_arg("seq"), event_id)
    path = await history.event_path(registry, event_id)
    payload = (path or {}).get("payload") or (letter.event.to_json() if letter else None)
    if payload is None:
        raise RegistryError(
            "UNSUPPORTED",
            404,
            f"event {event_id!r} is neither in the delivery history (where the queue keeps "
            "one) nor among the dead letters named: open it from its sink's dead letters",
        )
    return _with_form(
        "event.html",
        event_id=event_id,
        payload=json.dumps(payload, indent=2, sort_keys=True),
        trace=path,
        history_on=history.history_on(registry),
        letter=letter,
        sink_name=sink_name,
    )


# -- repositories -----------------------------------------------------------------------


def _page_after(items: Sequence[str], last: str | None) -> tuple[list[str], str | None]:
    """One page of a sorted list after ``last``, and the cursor of the next (None: the end)."""
    rest = [item for item in items if last is None or item > last]
    shown = rest[:PAGE]
    return shown, shown[-1] if len(rest) > PAGE else None


async def repositories() -> Response:
    registry = current_registry()
    names = await registry.io(registry.storage.list_repositories)
    shown, next_last = _page_after(names, request.args.get("last"))
    return page("repositories.html", names=shown, next_last=next_last, total=len(names))


def _tag_digests(storage: FilesystemStorage, name: str, tags: list[str]) -> list[tuple[str, str]]:
    out = []
    for tag in tags:
        with contextlib.suppress(ManifestUnknown):  # deleted since it was listed
            out.append((tag, str(storage.resolve_tag(name, tag))))
    return out


async def repository() -> Response:
    registry = current_registry()
    name = oci.validate_name(_arg("name"))
    tags = await registry.io(registry.storage.list_tags, name)
    shown, next_last = _page_after(tags, request.args.get("last"))
    rows = await registry.io(_tag_digests, registry.storage, name, shown)
    return page("repository.html", name=name, tags=rows, next_last=next_last, total=len(tags))


def _pull_command(name: str, tag: str | None, digest: oci.Digest) -> str:
    host = urlsplit(current_registry().url(cast(Any, request.scope), "")).netloc
    return f"docker pull {host}/{name}{f':{tag}' if tag else f'@{digest}'}"


async def manifest() -> Response:
    registry = current_registry()
    storage = registry.storage
    name = oci.validate_name(_arg("name"))
    reference = _arg("reference")
    tag = None
    if oci.is_digest_reference(reference):
        digest = oci.parse_digest(reference)
    else:
        try:
            tag = oci.validate_tag(reference)
        except oci.InvalidTag as exc:
            raise RegistryError("MANIFEST_UNKNOWN", 404, "manifest unknown", str(exc)) from None
        digest = await registry.io(storage.resolve_tag, name, tag)
    record = await registry.io(storage.get_manifest, name, digest)
    parsed = oci.parse_manifest(record.body, record.media_type)
    doc = json.loads(record.body)
    # The parsed index keeps what the registry needs; the platforms are for people.
    platforms = [m.get("platform") for m in doc.get("manifests") or []]
    children = list(zip(parsed.manifests, platforms, strict=True))
    referrers = await registry.io(storage.referrers, name, record.digest)
    body = record.body[:MANIFEST_SHOWN].decode("utf-8", "replace")
    if len(record.body) <= MANIFEST_SHOWN:
        body = json.dumps(doc, indent=2)
    return page(
        "manifest.html",
        name=name,
        tag=tag,
        digest=str(record.digest),
        media_type=record.media_type,
        size=len(record.body),
        manifest=parsed,
        children=children,
        referrers=referrers,
        body=body,
        cut=len(record.body) > MANIFEST_SHOWN,
        pull=_pull_command(name, tag, record.digest),
    )


async def static(file: str) -> Response:
    response = static_file(file)
    if response is None:
        raise NotFound()
    return response
