"""The JetStream queue's streams: whether one found keeps the queue's promises.

The queue creates its streams (and its bucket) when missing. One found under the same name,
made by hand or by another configuration, is used only if it keeps what the queue counts on
(:func:`compare_streams`): a setting that may be edited is brought in line, anything else stops
start-up with a message that names the config key to change.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, cast

import nats.js.errors
from nats.js import JetStreamContext, api

from ..base import QueueError

__all__ = ["CONFIG_KEY", "align_stream", "compare_streams", "ensure_stream", "subject_covers"]

log = logging.getLogger("registry_trio.events.queue.jetstream")

# Where the queue's settings live in the config file, for messages that name a key.
EVENTS_KEY = "extensions.events"
CONFIG_KEY = f"{EVENTS_KEY}.queue"


def subject_covers(pattern: str, subject: str) -> bool:
    """Whether every subject that ``subject`` (wildcards allowed) matches, ``pattern`` matches."""
    have, want = pattern.split("."), subject.split(".")
    for i, token in enumerate(have):
        if token == ">":
            return len(want) > i
        if i >= len(want) or want[i] == ">" or token not in ("*", want[i]):
            return False
    return len(have) == len(want)


# The settings of an existing stream that update_stream brings in line, and their keys
# (under extensions.events). The history stream's limits are its configured size.
EDITABLE = {
    "duplicate_window": "queue.duplicateWindow",
    "num_replicas": "queue.replicas",
    "max_age": "history.maxAge",
    "max_msgs": "history.maxRows",
}


def compare_streams(
    found: api.StreamConfig, wanted: api.StreamConfig
) -> tuple[list[str], dict[str, Any]]:
    """What keeps an existing stream from being the one the queue would have created.

    Why: the queue answers a push with a 2xx once the stream stored its events, and counts
    on the stream to keep each one until every sink acknowledged it. A stream made by hand
    (or by another configuration) may not: memory storage loses everything when the NATS
    server restarts, another retention drops or never drops acknowledged events, subjects
    that miss ours store nothing, limits that discard old messages drop events no sink has
    seen. Those are *problems* (the queue refuses to start); the duplicate window and the
    replica count are *edits* (``update_stream`` makes them).
    Only what ``wanted`` sets is compared: for a KV bucket's stream, storage and replicas. A
    stream that is meant to drop its oldest messages (the history: ``wanted`` sets
    ``max_age`` and ``max_msgs``) gets those limits as edits instead.
    """
    problems = []
    if wanted.storage is not None and found.storage != wanted.storage:
        problems.append(
            f"{_value(found.storage)} storage, where the queue needs {_value(wanted.storage)} "
            "storage (events must survive a NATS server restart)"
        )
    if wanted.retention is not None and found.retention != wanted.retention:
        why = (
            "an event stays until every sink acknowledged it"
            if wanted.retention == api.RetentionPolicy.INTEREST
            else "dead letters stay until replayed"
        )
        problems.append(
            f"{_value(found.retention)} retention, where the queue needs "
            f"{_value(wanted.retention)} retention ({why})"
        )
    missing = [
        subject
        for subject in wanted.subjects or ()
        if not any(subject_covers(pattern, subject) for pattern in found.subjects or ())
    ]
    if missing:
        problems.append(
            f"subjects {', '.join(found.subjects or ()) or '(none)'}, which do not cover "
            f"{', '.join(missing)} where the queue publishes"
        )
    # Limits with the default discard policy drop the oldest messages, acknowledged or not;
    # with discard "new" a full stream refuses publishes instead, which fails the push
    # (503) rather than losing an event, so only the former is refused.
    bounded = bool(wanted.max_age or wanted.max_msgs)
    if wanted.retention is not None and not bounded and found.discard != api.DiscardPolicy.NEW:
        limits = {
            "max_age": (found.max_age or 0) > 0 and f"{found.max_age:g}s",
            "max_msgs": (found.max_msgs or 0) > 0 and found.max_msgs,
            "max_bytes": (found.max_bytes or 0) > 0 and found.max_bytes,
            "max_msgs_per_subject": (found.max_msgs_per_subject or 0) > 0
            and found.max_msgs_per_subject,
        }
        if set_limits := [f"{name} {value}" for name, value in limits.items() if value]:
            problems.append(
                f"limits {', '.join(set_limits)} that discard the oldest messages, where the "
                "queue needs every message kept until it is acknowledged or replayed"
            )
    edits: dict[str, Any] = {}
    # Zero is the server's default window: the queue does not ask for one (dead letters).
    # Durations go through nanoseconds and back: equal within a millisecond is equal.
    if wanted.duplicate_window and abs(found.duplicate_window - wanted.duplicate_window) > 1e-3:
        edits["duplicate_window"] = wanted.duplicate_window
    if wanted.num_replicas is not None and found.num_replicas != wanted.num_replicas:
        edits["num_replicas"] = wanted.num_replicas
    if bounded:
        if abs((found.max_age or 0) - (wanted.max_age or 0)) > 1e-3:
            edits["max_age"] = wanted.max_age
        if (found.max_msgs or -1) != (wanted.max_msgs or -1):
            edits["max_msgs"] = wanted.max_msgs
    return problems, edits


def _value(setting: Any) -> str:
    return str(getattr(setting, "value", setting))


def _show(field: str, value: Any) -> str:
    return f"{value or 0:g}s" if field in ("duplicate_window", "max_age") else str(value)


async def ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    """Create the stream, or use the one found under its name if it keeps the queue's promises."""
    # The queue names every stream it asks for; nats-py types the name optional.
    name = cast(str, config.name)
    try:
        found = (await js.stream_info(name)).config
    except nats.js.errors.NotFoundError:
        await js.add_stream(config)
        return
    await align_stream(js, found, config)


async def align_stream(
    js: JetStreamContext, found: api.StreamConfig, wanted: api.StreamConfig
) -> None:
    """Use an existing stream only if it keeps the queue's promises (see
    :func:`compare_streams`): edit what may be edited, refuse the rest."""
    problems, edits = compare_streams(found, wanted)
    if problems:
        raise QueueError(
            f"stream {wanted.name!r} exists with {'; '.join(problems)}; recreate it, "
            f"or set {CONFIG_KEY}.stream to another name"
        )
    # One setting per update, so that a refusal names the one key it is about.
    for field, value in edits.items():
        key, was = EDITABLE[field], _show(field, getattr(found, field))
        try:
            found = (await js.update_stream(replace(found, **{field: value}))).config
        except nats.js.errors.APIError as exc:
            raise QueueError(
                f"stream {wanted.name!r} exists with {key.rpartition('.')[2]} {was} and the "
                "server refuses to "
                f"change that ({exc.description or exc}); set {EVENTS_KEY}.{key} to {was}, "
                "or change the stream"
            ) from exc
        log.warning(
            "jetstream queue: stream %r brought in line with %s.%s: %s -> %s",
            wanted.name,
            EVENTS_KEY,
            key,
            was,
            _show(field, value),
        )
