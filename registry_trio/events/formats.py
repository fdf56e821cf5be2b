"""Wire formats: pure functions from events to ``(headers, body)``. No I/O, no state.

- ``cloudevents``: CloudEvents 1.0 structured mode (``application/cloudevents+json``), one
  event per message. zot's types and ``data`` fields, plus ``actor`` and ``request``, so a
  consumer written for zot works unchanged. The JSON document is the one
  ``cloudevents.core``'s ``JSONFormat`` writes, encoded by orjson in one call: building and
  validating a ``CloudEvent`` first cost ~40 us per event, on the delivery path.
- ``cloudevents-binary``: the same event in binary mode (``ce-*`` headers), as zot's HTTP
  sink sends it.
- ``cloudevents-batch``: ``application/cloudevents-batch+json``, a JSON array of
  structured events (``cloudevents.core`` has no batch helper; the spec's batch is just that).
- ``distribution``: Docker distribution's envelope
  (``application/vnd.docker.distribution.events.v1+json``, ``{"events": [...]}``) with the
  JSON names of its ``notifications/event.go``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from .model import Action, Event

__all__ = ["DISTRIBUTION_MEDIA_TYPE", "Encoded", "cloudevent", "encoder_for"]

DISTRIBUTION_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
BATCH_MEDIA_TYPE = "application/cloudevents-batch+json"
STRUCTURED_MEDIA_TYPE = "application/cloudevents+json"

Encoded = tuple[dict[str, str], bytes]

# Our action -> zot's CloudEvents type suffix. zot reports a tag deletion as image.deleted
# with the tag as reference, so tag.deleted maps there too.
_CE_TYPES = {
    Action.MANIFEST_PUSHED: "image.updated",
    Action.MANIFEST_DELETED: "image.deleted",
    Action.TAG_DELETED: "image.deleted",
    Action.REPOSITORY_CREATED: "repository.created",
    Action.BLOB_PUSHED: "blob.pushed",
    Action.BLOB_MOUNTED: "blob.mounted",
    Action.BLOB_DELETED: "blob.deleted",
    Action.MANIFEST_PULLED: "image.pulled",
    Action.BLOB_PULLED: "blob.pulled",
}

# Our action -> distribution's verb. Repository creation has no distribution counterpart:
# sinks in that format never receive it (see `carries`).
_DISTRIBUTION_ACTIONS = {
    Action.MANIFEST_PUSHED: "push",
    Action.BLOB_PUSHED: "push",
    Action.BLOB_MOUNTED: "mount",
    Action.MANIFEST_DELETED: "delete",
    Action.TAG_DELETED: "delete",
    Action.BLOB_DELETED: "delete",
    Action.MANIFEST_PULLED: "pull",
    Action.BLOB_PULLED: "pull",
}

_JSON = JSONFormat()


def _compact(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if v not in (None, "", (), [])}


def _actor_request(event: Event) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if event.actor is not None and event.actor.name:
        out["actor"] = {"name": event.actor.name, "authType": event.actor.auth_type}
    if event.request is not None:
        r = event.request
        out["request"] = {
            "id": r.id,
            "addr": r.addr,
            "host": r.host,
            "method": r.method,
            "useragent": r.useragent,
        }
    return out


def _attributes_and_data(event: Event, prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The CloudEvent attributes and ``data`` of ``event``; its ``id`` is the event id,
    stable across retries."""
    t = event.target
    data = _compact(
        {
            "name": t.repository,
            "reference": t.tag or t.digest,
            "digest": t.digest,
            "mediaType": t.media_type,
            "manifest": t.manifest,
            "size": t.size,
            "fromRepository": t.from_repository,
            "url": t.url,
        }
    )
    data.update(_actor_request(event))
    subject = t.repository
    if t.tag:
        subject += f":{t.tag}"
    elif t.digest:
        subject += f"@{t.digest}"
    attributes = {
        "id": event.id,
        "type": f"{prefix}.{_CE_TYPES[event.action]}",
        "source": f"//{event.source.addr}",
        "subject": subject,
        "time": event.time,
        "datacontenttype": "application/json",
    }
    return attributes, data


def cloudevent(event: Event, prefix: str) -> CloudEvent:
    """The CloudEvent for ``event``."""
    return CloudEvent(*_attributes_and_data(event, prefix))


def structured_document(event: Event, prefix: str) -> dict[str, Any]:
    """``event`` as a structured-mode JSON document, in the order ``JSONFormat`` writes it."""
    attributes, data = _attributes_and_data(event, prefix)
    return {**attributes, "specversion": "1.0", "data": data}


def _encode_json(document: Any) -> bytes:
    # OPT_UTC_Z: the time as CloudEvents (RFC 3339) and JSONFormat write it, "...Z".
    return orjson.dumps(document, option=orjson.OPT_UTC_Z)


def distribution_event(event: Event) -> dict[str, Any]:
    t = event.target
    target = _compact(
        {
            "mediaType": t.media_type,
            "digest": t.digest,
            "size": t.size,
            "length": t.size,
            "repository": t.repository,
            "fromRepository": t.from_repository,
            "url": t.url,
            "tag": t.tag,
            "references": list(t.references),
        }
    )
    out: dict[str, Any] = {
        "id": event.id,
        "timestamp": event.time.isoformat().replace("+00:00", "Z"),
        "action": _DISTRIBUTION_ACTIONS[event.action],
        "target": target,
        "source": {"addr": event.source.addr, "instanceID": event.source.instance_id},
    }
    extra = _actor_request(event)
    # Anonymous requests get an empty actor, as distribution sends: its consumers read
    # ``actor.name`` without checking that ``actor`` is there.
    out["actor"] = {"name": extra["actor"]["name"]} if "actor" in extra else {}
    if "request" in extra:
        out["request"] = extra["request"]
    return out


def _structured(events: Sequence[Event], prefix: str) -> Encoded:
    (event,) = events
    return {"content-type": STRUCTURED_MEDIA_TYPE}, _encode_json(structured_document(event, prefix))


def _binary(events: Sequence[Event], prefix: str) -> Encoded:
    (event,) = events
    message = ce_http.to_binary(cloudevent(event, prefix), _JSON)
    return dict(message.headers), message.body


def _batch(events: Sequence[Event], prefix: str) -> Encoded:
    body = _encode_json([structured_document(e, prefix) for e in events])
    return {"content-type": BATCH_MEDIA_TYPE}, body


def _distribution(events: Sequence[Event], prefix: str) -> Encoded:
    body = json.dumps({"events": [distribution_event(e) for e in events]}).encode()
    return {"content-type": DISTRIBUTION_MEDIA_TYPE}, body


_ENCODERS: dict[str, Callable[[Sequence[Event], str], Encoded]] = {
    "cloudevents": _structured,
    "cloudevents-binary": _binary,
    "cloudevents-batch": _batch,
    "distribution": _distribution,
}


def encoder_for(format_name: str) -> Callable[[Sequence[Event], str], Encoded]:
    """The encoder of a configured format; single-event formats take exactly one event."""
    return _ENCODERS[format_name]


def carries(format_name: str, action: Action) -> bool:
    """Whether ``format_name`` has a representation for ``action``."""
    return format_name != "distribution" or action in _DISTRIBUTION_ACTIONS
