"""The event queue on NATS JetStream, shared by every registry instance serving one storage.

Layout, for ``queue.stream: S`` (created when missing, checked when found: see
:func:`compare_streams`; names from a hash of each sink name)::

    stream S          subjects S.sink.<sink>   file storage, interest retention: a message
                                               stays until its sink's consumer acknowledged it
    consumer sink_<sink>                       durable, explicit acks, shared by all instances
    stream S_DEAD     subjects S.dead.<sink>   dead letters, kept until replayed
    KV bucket S_COUNTERS  <sink>.<instance>    delivered / failed attempts / last error, one
                                               key per instance (no two writers per key)

**Append**: one message per (event, sink that wants it), published with ``Nats-Msg-Id`` =
``<event id>.<sink>`` and the stream's acknowledgement awaited before the request gets its
2xx. A publish retried after a lost ack is dropped by the stream's duplicate window.

**Delivery**, in order (``concurrency: 1``): one instance at a time delivers a sink, the one
holding the sink's *lease* (a KV entry changed only by compare-and-set, renewed every
``ackWait``/3). It pulls from the sink's durable consumer; a failed run is *held* by it and
retried with backoff (``in_progress`` keeps JetStream from handing it out meanwhile), and
nothing is pulled past a held event. An instance that dies stops renewing; once the lease
went ``queue.ackWait`` unrenewed by another instance's own clock (wall clocks of two hosts are
never compared), that one takes it, and first sends the *orphans* — what the dead one
was handed and never acknowledged, read from the stream in order — so fresh events cannot
overtake them (the dead one may have delivered some already: same ids, at least once).
With ``concurrency`` above 1 every instance pulls, and order is not promised.

Everything NATS happens on one asyncio thread (:class:`AsyncioThread`); the Trio side holds
nats-py messages only as opaque handles it passes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import trio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from ...config import QueueConfig, SinkConfig, redact_address
from ..asyncio_thread import AsyncioCall, AsyncioThread
from ..failures import describe_failure, sensitive_values
from ..model import Event
from ..natsconn import connect_options, new_client
from .base import (
    APPENDED,
    DeadLetter,
    OwedEvent,
    PendingAppend,
    QueueError,
    SinkCounts,
    take_limit,
)

__all__ = ["JetStreamQueue"]

log = logging.getLogger("registry_trio.events.queue.jetstream")

# One pull request waits this long for messages before the worker looks at its state again.
FETCH_POLL = 1.0
# After a NATS error while taking, wait this long before trying again.
ERROR_PAUSE = 0.5
# Opening (connect, then create or check the streams, bucket and consumers) may take this
# many times ``queue.timeout`` before start-up gives up.
OPEN_TIMEOUTS = 4


def sink_token(sink: str) -> str:
    """A subject and consumer-name token for a sink name (names may be any URL)."""
    return hashlib.sha256(sink.encode()).hexdigest()[:16]


def _header_text(text: str) -> str:
    # A NATS header value is one line.
    return " ".join(text.split())[:1000]


# Where the queue's settings live in the config file, for messages that name a key.
CONFIG_KEY = "extensions.events.queue"


def subject_covers(pattern: str, subject: str) -> bool:
    """Whether every subject that ``subject`` (wildcards allowed) matches, ``pattern`` matches."""
    have, want = pattern.split("."), subject.split(".")
    for i, token in enumerate(have):
        if token == ">":
            return len(want) > i
        if i >= len(want) or want[i] == ">" or token not in ("*", want[i]):
            return False
    return len(have) == len(want)


# The settings of an existing stream that update_stream brings in line, and their keys.
EDITABLE = {"duplicate_window": "duplicateWindow", "num_replicas": "replicas"}


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
    Only what ``wanted`` sets is compared: for a KV bucket's stream, storage and replicas.
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
    if wanted.retention is not None and found.discard != api.DiscardPolicy.NEW:
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
    return problems, edits


def _value(setting: Any) -> str:
    return str(getattr(setting, "value", setting))


def _show(field: str, value: Any) -> str:
    return f"{value:g}s" if field == "duplicate_window" else str(value)


@dataclass
class _Counters:
    delivered: int = 0
    failed_attempts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None


class _JetStream:
    """The NATS side of the queue. Every method runs on the queue's asyncio thread."""

    def __init__(self, config: QueueConfig, sinks: Sequence[SinkConfig], instance_id: str) -> None:
        self._config = config
        self._stream = config.stream
        self._dead_stream = f"{config.stream}_DEAD"
        self._bucket = f"{config.stream}_COUNTERS"
        self._sinks = list(sinks)
        self._instance = instance_id
        self._timeout = float(config.timeout)
        self._hidden = sensitive_values(config.address, config.credentials)
        self._nc: Client | None = None
        self._js: Any = None
        self._kv: Any = None
        self._counters: dict[str, _Counters] = {}
        self.last_error = ""  # the last connection error, for a start-up that gives up
        # Another holder's lease: the revision last seen, and when (on ``clock``) it was.
        self._leases_seen: dict[str, tuple[int, float]] = {}
        self.clock: Callable[[], float] = time.monotonic

    def describe(self, exc: BaseException) -> str:
        return describe_failure(exc, self._hidden)

    # -- set-up ------------------------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        # nats-py would log a traceback per failed (re)connection; keep the reason instead,
        # preferring what the server said (an authorization violation says more than the
        # broken pipe that follows it).
        text = self.describe(exc)
        if not self.last_error or (
            isinstance(exc, nats.errors.Error) and not isinstance(exc, nats.errors.TimeoutError)
        ):
            self.last_error = text
        log.debug("jetstream queue: %s", text)

    async def _on_disconnected(self) -> None:
        if self._nc is not None:
            log.warning("jetstream queue: disconnected; reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("jetstream queue: reconnected")

    async def open(self) -> None:
        nc = new_client(self._config)
        await nc.connect(
            **connect_options(self._config, "registry-trio event queue"),
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        self._nc = nc
        self._js = nc.jetstream(timeout=self._timeout)
        storage = api.StorageType.FILE
        await self._ensure_stream(
            api.StreamConfig(
                name=self._stream,
                subjects=[f"{self._stream}.sink.*"],
                retention=api.RetentionPolicy.INTEREST,
                storage=storage,
                num_replicas=self._config.replicas,
                duplicate_window=float(self._config.duplicate_window),
            )
        )
        await self._ensure_stream(
            api.StreamConfig(
                name=self._dead_stream,
                subjects=[f"{self._stream}.dead.*"],
                retention=api.RetentionPolicy.LIMITS,
                storage=storage,
                num_replicas=self._config.replicas,
            )
        )
        try:
            self._kv = await self._js.key_value(self._bucket)
        except nats.js.errors.BucketNotFoundError:
            self._kv = await self._js.create_key_value(
                bucket=self._bucket, storage=storage, replicas=self._config.replicas
            )
        else:
            # The bucket's own stream: only where it is kept matters (leases, counters).
            kv_stream = f"KV_{self._bucket}"
            await self._align_stream(
                (await self._js.stream_info(kv_stream)).config,
                api.StreamConfig(
                    name=kv_stream, storage=storage, num_replicas=self._config.replicas
                ),
            )
        # Consumers exist before the first append: with interest retention, a message no
        # consumer is interested in would not be kept.
        for sink in self._sinks:
            await self._ensure_consumer(sink)
            self._counters[str(sink.name)] = await self._load_counters(str(sink.name))

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        try:
            found = (await self._js.stream_info(config.name)).config
        except nats.js.errors.NotFoundError:
            await self._js.add_stream(config)
            return
        await self._align_stream(found, config)

    async def _align_stream(self, found: api.StreamConfig, wanted: api.StreamConfig) -> None:
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
                found = (await self._js.update_stream(replace(found, **{field: value}))).config
            except nats.js.errors.APIError as exc:
                raise QueueError(
                    f"stream {wanted.name!r} exists with {key} {was} and the server refuses to "
                    f"change that ({exc.description or exc}); set {CONFIG_KEY}.{key} to {was}, "
                    "or change the stream"
                ) from exc
            log.warning(
                "jetstream queue: stream %r brought in line with %s.%s: %s -> %s",
                wanted.name,
                CONFIG_KEY,
                key,
                was,
                _show(field, value),
            )

    async def _ensure_consumer(self, sink: SinkConfig) -> None:
        token = sink_token(str(sink.name))
        config = api.ConsumerConfig(
            durable_name=f"sink_{token}",
            description=f"registry-trio sink {sink.name}",
            filter_subject=f"{self._stream}.sink.{token}",
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=float(self._config.ack_wait),
            max_deliver=-1,
            max_ack_pending=take_limit(sink) * sink.concurrency,
        )
        # Creating an existing durable consumer with the same (or an editable) config is a
        # no-op or an update; every instance does it at start.
        await self._js.add_consumer(self._stream, config)

    async def _load_counters(self, sink: str) -> _Counters:
        try:
            entry = await self._kv.get(f"{sink_token(sink)}.{self._instance}")
        except nats.js.errors.KeyNotFoundError:
            return _Counters()
        return _Counters(**json.loads(entry.value))

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.close(), self._timeout)
            except Exception:  # already broken; nothing else to release
                log.debug("closing the queue's NATS connection failed", exc_info=True)

    # -- appending ---------------------------------------------------------------------------

    async def publish(self, messages: Sequence[tuple[str, bytes, dict[str, str]]]) -> None:
        """Publish every message and wait for all acks; raise the first failure."""
        results = await asyncio.gather(
            *(
                self._js.publish(subject, body, headers=headers)
                for subject, body, headers in messages
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # -- a sink's consumer -------------------------------------------------------------------

    async def subscribe(self, sink: str) -> Any:
        token = sink_token(sink)
        return await self._js.pull_subscribe_bind(f"sink_{token}", self._stream)

    async def unsubscribe(self, subscription: Any) -> None:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()

    async def fetch(self, subscription: Any, batch: int, expires: float) -> list[Msg]:
        try:
            return await subscription.fetch(batch, timeout=expires)
        except nats.errors.TimeoutError:
            return []

    async def settle(
        self, *, ack: Sequence[Msg] = (), nak: Sequence[Msg] = (), progress: Sequence[Msg] = ()
    ) -> None:
        """Hand back, keep (``in_progress``) or acknowledge messages, in that order; pipelined.

        Hand-backs go first so that slots freed by the acks cannot be filled past them.
        """
        for msg in nak:
            with contextlib.suppress(nats.errors.MsgAlreadyAckdError):
                await msg.nak()
        for msg in progress:
            with contextlib.suppress(nats.errors.MsgAlreadyAckdError):
                await msg.in_progress()
        for msg in ack:
            with contextlib.suppress(nats.errors.MsgAlreadyAckdError):
                await msg.ack()
        if self._nc is not None:
            await self._nc.flush(timeout=self._timeout)  # type: ignore[arg-type]

    async def count(
        self, sink: str, *, delivered: int = 0, failed: int = 0, error: str | None = None
    ) -> None:
        counters = self._counters.setdefault(sink, _Counters())
        counters.delivered += delivered
        counters.failed_attempts += failed
        if error is not None:
            counters.last_error, counters.last_error_at = error, time.time()
        value = json.dumps(counters.__dict__).encode()
        await self._kv.put(f"{sink_token(sink)}.{self._instance}", value)

    async def bury(
        self, sink: str, letters: Sequence[tuple[Msg | None, bytes, OwedEvent]], error: str
    ) -> None:
        token = sink_token(sink)
        for _, body, owed in letters:
            headers = {
                "Nats-Msg-Id": f"{owed.event.id}.{token}.dead.{owed.seq}",
                "Registry-Sink": _header_text(sink),
                "Registry-Attempts": str(owed.attempts + 1),
                "Registry-Error": _header_text(error),
            }
            await self._js.publish(f"{self._stream}.dead.{token}", body, headers=headers)
        await self.settle(ack=[msg for msg, _, _ in letters if msg is not None])

    async def lead(self, sink: str, ttl: float) -> bool:
        """Take or renew the sink's delivery lease; whether this instance now holds it.

        The lease is a KV entry naming its holder, changed only by compare-and-set on its
        revision, so two instances can never both win it. The holder renews it (a new
        revision) every ``ttl``/3. Whether it lapsed is judged on this instance's monotonic
        clock: a revision unchanged for ``ttl`` since this instance first saw it was not
        renewed. Comparing a time the holder wrote with this host's wall clock would let a
        clock running ahead take a live lease.
        """
        key = f"lease.{sink_token(sink)}"
        value = json.dumps({"instance": self._instance}).encode()
        try:
            try:
                entry = await self._kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                await self._kv.create(key, value)
                return True
            if json.loads(entry.value)["instance"] != self._instance:
                now = self.clock()
                revision, since = self._leases_seen.get(key, (None, now))
                if revision != entry.revision:
                    self._leases_seen[key] = (entry.revision, now)
                    return False
                if now - since < ttl:
                    return False
            await self._kv.update(key, value, last=entry.revision)
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            return False  # another instance changed it first

    async def orphans(self, sink: str) -> list[tuple[int, bytes]]:
        """Messages handed out to the sink's consumer and never acknowledged (by a previous
        lease holder, now gone), in order: the new holder sends them before anything else."""
        token = sink_token(sink)
        info = await self._js.consumer_info(self._stream, f"sink_{token}")
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        last = info.delivered.stream_seq if info.delivered else 0
        subject = f"{self._stream}.sink.{token}"
        found = []
        seq = floor + 1
        while seq <= last:
            try:
                raw = await self._js.get_msg(self._stream, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                break
            if raw.seq > last:
                break
            # Interest retention deletes a message once its sink acknowledged it: whatever
            # is still here was not.
            found.append((raw.seq, raw.data))
            seq = raw.seq + 1
        return found

    # -- operators ---------------------------------------------------------------------------

    async def counts(self, sink: str) -> SinkCounts:
        token = sink_token(sink)
        info = await self._js.consumer_info(self._stream, f"sink_{token}")
        pending = (info.num_pending or 0) + (info.num_ack_pending or 0)
        oldest = None
        if pending:
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            with contextlib.suppress(nats.js.errors.NotFoundError):
                raw = await self._js.get_msg(
                    self._stream, seq=floor + 1, subject=f"{self._stream}.sink.{token}", next=True
                )
                oldest = Event.from_bytes(raw.data).time.timestamp()
        dead_subject = f"{self._stream}.dead.{token}"
        dead_info = await self._js.stream_info(self._dead_stream, subjects_filter=dead_subject)
        dead = (dead_info.state.subjects or {}).get(dead_subject, 0)
        total = _Counters()
        try:
            # Unfiltered (nats-py warns about filters on older servers): one key per
            # instance and sink is few.
            keys = await self._kv.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        for key in (k for k in keys if k.startswith(f"{token}.")):
            entry = await self._kv.get(key)
            part = _Counters(**json.loads(entry.value))
            total.delivered += part.delivered
            total.failed_attempts += part.failed_attempts
            if part.last_error_at is not None and (
                total.last_error_at is None or part.last_error_at > total.last_error_at
            ):
                total.last_error, total.last_error_at = part.last_error, part.last_error_at
        return SinkCounts(
            pending=pending,
            dead=dead,
            delivered=total.delivered,
            failed_attempts=total.failed_attempts,
            oldest_pending=oldest,
            last_error=total.last_error,
            last_error_at=total.last_error_at,
        )

    async def _dead_messages(self, sink: str, after: int) -> AsyncIterator[api.RawStreamMsg]:
        subject = f"{self._stream}.dead.{sink_token(sink)}"
        seq = after + 1
        while True:
            try:
                raw = await self._js.get_msg(self._dead_stream, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                return
            yield raw
            seq = raw.seq + 1

    async def dead(self, sink: str, limit: int, after: int) -> list[DeadLetter]:
        letters = []
        async for raw in self._dead_messages(sink, after):
            headers = raw.headers or {}
            letters.append(
                DeadLetter(
                    seq=raw.seq,
                    sink=sink,
                    event=Event.from_bytes(raw.data),
                    attempts=int(headers.get("Registry-Attempts", "0")),
                    last_error=headers.get("Registry-Error", ""),
                )
            )
            if len(letters) >= limit:
                break
        return letters

    async def replay(self, sink: str, event_ids: Sequence[str] | None) -> int:
        token = sink_token(sink)
        wanted = None if event_ids is None else set(event_ids)
        replayed = 0
        async for raw in self._dead_messages(sink, 0):
            event = Event.from_bytes(raw.data)
            if wanted is not None and event.id not in wanted:
                continue
            # A new message id: the original is likely still inside the duplicate window.
            headers = {"Nats-Msg-Id": f"{event.id}.{token}.replay.{raw.seq}"}
            await self._js.publish(f"{self._stream}.sink.{token}", raw.data, headers=headers)
            await self._js.delete_msg(self._dead_stream, raw.seq)
            replayed += 1
        return replayed


class JetStreamQueue:
    """:class:`~registry_trio.events.queue.base.EventQueue` on JetStream; see the module doc."""

    def __init__(
        self,
        config: QueueConfig,
        sinks: Sequence[SinkConfig],
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        self._config = config
        self._sinks = list(sinks)
        self._on_commit = on_commit
        self.ack_wait = float(config.ack_wait)
        self.instance_id = ""
        self._thread = AsyncioThread(name="jetstream-queue")
        self._nats: _JetStream | None = None
        self._closed = False
        self._stop = trio.Event()
        self._signals: dict[str, trio.Event] = {}

    def _load_instance_id(self) -> str:
        """This instance's id, kept in ``queue.directory`` (local to the instance)."""
        directory = Path(self._config.directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "instance_id"
        with contextlib.suppress(FileNotFoundError):
            if text := path.read_text().strip():
                return text
        instance_id = uuid.uuid4().hex
        temp = path.with_suffix(".tmp")
        temp.write_text(instance_id)
        temp.replace(path)
        return instance_id

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.instance_id = await trio.to_thread.run_sync(self._load_instance_id)
        jetstream = _JetStream(self._config, self._sinks, self.instance_id)
        address = self._config.address or ""
        try:
            where = f"the JetStream queue {self._config.stream!r} at {redact_address(address)}"
            try:
                with trio.fail_after(OPEN_TIMEOUTS * float(self._config.timeout)):
                    await self._thread.run(jetstream.open)
            except trio.TooSlowError as exc:
                seconds = OPEN_TIMEOUTS * float(self._config.timeout)
                if jetstream.last_error:
                    message = f"cannot open {where} within {seconds:g}s: {jetstream.last_error}"
                else:
                    message = f"cannot open {where}: no answer within {seconds:g}s"
                raise QueueError(message) from exc
            except QueueError as exc:  # an existing stream that cannot hold the queue
                raise QueueError(f"cannot open {where}: {exc}") from exc
            except Exception as exc:
                raise QueueError(f"cannot open {where}: {jetstream.describe(exc)}") from exc
            self._nats = jetstream
            task_status.started()
            await self._stop.wait()
        finally:
            self._closed = True
            with trio.CancelScope(shield=True):
                if self._thread.started:
                    with contextlib.suppress(RuntimeError):
                        await self._thread.run(jetstream.close)
                await self._thread.aclose()

    def close(self) -> None:
        self._closed = True
        self._stop.set()

    def _jetstream(self) -> _JetStream:
        if self._closed or self._nats is None:
            raise QueueError("the event queue is shut down")
        return self._nats

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one NATS operation on the queue's thread; NATS failures become QueueError."""
        jetstream = self._jetstream()
        return await _outcome(jetstream, self._thread.start(fn, *args, **kwargs))

    # -- EventQueue ----------------------------------------------------------------------------

    async def append(self, items: Sequence[tuple[Event, Sequence[str]]]) -> None:
        await self.begin_append(items).wait()

    def begin_append(self, items: Sequence[tuple[Event, Sequence[str]]]) -> PendingAppend:
        """Start publishing; the stream stores messages in the order they were begun.

        One connection carries every publish, each written to its outgoing buffer without
        waiting (nats-py's request after its reply subscription exists, which opening made),
        and the queue's thread starts calls in the order made: so the stream numbers them
        in that order, whenever their acknowledgements come back.
        """
        jetstream = self._jetstream()
        messages = []
        for event, sinks in items:
            body = event.to_bytes()
            for sink in sinks:
                token = sink_token(sink)
                headers = {"Nats-Msg-Id": f"{event.id}.{token}"}
                messages.append((f"{self._config.stream}.sink.{token}", body, headers))
        if not messages:
            return APPENDED
        return _Publishing(
            jetstream,
            self._thread.start(jetstream.publish, messages),
            len(messages),
            self._on_commit,
        )

    def wake(self, sink: str) -> None:
        if (signal := self._signals.get(sink)) is not None:
            signal.set()

    def signal(self, sink: str) -> trio.Event:
        signal = self._signals.get(sink)
        if signal is None or signal.is_set():
            signal = self._signals[sink] = trio.Event()
        return signal

    @contextlib.asynccontextmanager
    async def consumer(
        self, sink: SinkConfig, *, stopping: trio.Event
    ) -> AsyncIterator[JetStreamSinkQueue]:
        jetstream = self._jetstream()
        subscription = await self.call(jetstream.subscribe, str(sink.name))
        sink_queue = JetStreamSinkQueue(self, jetstream, subscription, sink, stopping)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sink_queue.keep_alive)
                try:
                    yield sink_queue
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            # Whatever this worker still holds goes back at once, not after ackWait.
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(float(self._config.timeout)),
                contextlib.suppress(QueueError),
            ):
                await sink_queue.hand_back()
                await self.call(jetstream.unsubscribe, subscription)

    async def counts(self, sink: str) -> SinkCounts:
        return await self.call(self._jetstream().counts, sink)

    async def dead(self, sink: str, limit: int = 100, after: int = 0) -> list[DeadLetter]:
        return await self.call(self._jetstream().dead, sink, limit, after)

    async def replay(self, sink: str, event_ids: Sequence[str] | None = None) -> int:
        return await self.call(self._jetstream().replay, sink, event_ids)


async def _outcome(jetstream: _JetStream, call: AsyncioCall[Any]) -> Any:
    """The result of a NATS operation; NATS failures become QueueError."""
    try:
        return await call.result()
    except QueueError:
        raise
    except Exception as exc:
        raise QueueError(f"the JetStream queue failed: {jetstream.describe(exc)}") from exc


class _Publishing:
    """An append on its way to the stream (:meth:`JetStreamQueue.begin_append`)."""

    def __init__(
        self,
        jetstream: _JetStream,
        call: AsyncioCall[None],
        messages: int,
        on_commit: Callable[[int, float], None] | None,
    ) -> None:
        self._jetstream = jetstream
        self._call = call
        self._messages = messages
        self._on_commit = on_commit
        self._started = time.perf_counter()

    async def wait(self) -> None:
        await _outcome(self._jetstream, self._call)
        if self._on_commit is not None:
            self._on_commit(self._messages, time.perf_counter() - self._started)


@dataclass
class _Taken:
    """A message this instance holds: in flight, or waiting here for its retry."""

    owed: OwedEvent
    data: bytes
    # The handle to acknowledge it with; None for an orphan read from the stream (see
    # JetStreamSinkQueue), until JetStream hands it to us again.
    msg: Msg | None
    due: float = 0.0  # when held: the Unix time it may be sent again


class JetStreamSinkQueue:
    """One sink's deliveries on this instance.

    In order (``concurrency: 1``) only the holder of the sink's lease takes anything, so one
    instance at a time delivers the sink. A new holder first sends the *orphans*: messages
    the previous holder was handed and never acknowledged, read straight from the stream in
    order; when JetStream later hands them out again, it acknowledges them without sending.
    Without that, fresh events would overtake them while JetStream waits out their ackWait.
    In concurrent mode every instance takes, and order is not promised.
    """

    def __init__(
        self,
        queue: JetStreamQueue,
        jetstream: _JetStream,
        subscription: Any,
        sink: SinkConfig,
        stopping: trio.Event,
    ) -> None:
        self._queue = queue
        self._nats = jetstream
        self._subscription = subscription
        self._name = str(sink.name)
        self._ordered = sink.ordered
        self._group = sink.events_per_message
        self._max_wait = float(sink.batch.max_wait)
        self._take_limit = take_limit(sink)
        self._ack_wait = float(queue.ack_wait)
        self._stopping = stopping
        self._leading = not self._ordered
        self._lease_until = 0.0  # when the lease lapses unless renewed (trio's clock)
        self._taken: dict[int, _Taken] = {}  # every message held, in flight or not
        self._in_flight: set[int] = set()
        self._withheld: list[Msg] = []  # delivered; acked once nothing before them is held
        # Orphans already sent (or buried): acknowledged unsent when JetStream redelivers them.
        self._settled_orphans: set[int] = set()
        self._fetch_lock = trio.Lock()
        # The consumer's delivery sequence of the last message fetched here.
        self._last_delivery: int | None = None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _held(self) -> list[_Taken]:
        return sorted(
            (t for seq, t in self._taken.items() if seq not in self._in_flight),
            key=lambda t: t.owed.seq,
        )

    async def _fetch(self, limit: int, expires: float) -> list[OwedEvent]:
        """Pull up to ``limit`` messages; the fresh ones, unless they may not go first.

        Ordered, a gap in the consumer's delivery sequence means JetStream handed a message
        to someone else meanwhile: an instance that lost the lease while a pull request of
        its was still on its way (nats-py sends buffered requests on reconnect). Such a
        message may come before these, and would only come back here after ackWait: it is
        read from the stream now, as an orphan, and sent first.
        """
        async with self._fetch_lock:
            msgs = await self._queue.call(self._nats.fetch, self._subscription, limit, expires)
        fresh, settled = [], []
        gap = False
        for msg in msgs:
            delivery = msg.metadata.sequence.consumer
            if self._last_delivery is not None and delivery > self._last_delivery + 1:
                gap = True
            self._last_delivery = max(delivery, self._last_delivery or 0)
            seq = msg.metadata.sequence.stream
            if seq in self._settled_orphans:
                self._settled_orphans.discard(seq)
                settled.append(msg)
            elif (taken := self._taken.get(seq)) is not None:
                taken.msg = taken.msg or msg  # an orphan (or one past ackWait): ours already
            else:
                event = Event.from_bytes(msg.data)
                # Deliveries before this one were attempts that did not end in an ack.
                attempts = max((msg.metadata.num_delivered or 1) - 1, 0)
                owed = OwedEvent(seq, event, attempts, event.time.timestamp())
                self._taken[seq] = _Taken(owed, msg.data, msg)
                fresh.append(owed)
        if settled:
            await self._queue.call(self._nats.settle, ack=settled)
        if gap and self._ordered:
            log.info("sink %s: a delivery went to another instance; taking it back", self._name)
            await self._adopt_orphans()
            return []  # all of it is held now, and taken in stream order
        return fresh

    async def _adopt_orphans(self) -> None:
        for seq, data in await self._queue.call(self._nats.orphans, self._name):
            if seq in self._taken:
                continue
            event = Event.from_bytes(data)
            owed = OwedEvent(seq, event, 0, event.time.timestamp())
            self._taken[seq] = _Taken(owed, data, None)
        self._queue.wake(self._name)

    async def take(self, *, wait: bool = True) -> list[OwedEvent]:
        while not self._stopping.is_set():
            signal = self._queue.signal(self._name)
            if not self._leading or (self._ordered and trio.current_time() >= self._lease_until):
                # Another instance delivers this sink; keep_alive takes over when it is gone.
                # Or this one could not renew its lease lately: another can take it once it
                # goes ackWait unrenewed, so taking stops a third of ackWait before that.
                if not wait:
                    return []
                with trio.move_on_after(self._ack_wait / 3):
                    await signal.wait()
                continue
            now = time.time()
            held = self._held()
            due = []
            next_due = None
            for taken in held:
                if taken.due > now:
                    next_due = taken.due if next_due is None else min(next_due, taken.due)
                    if self._ordered:
                        break  # never overtake an event that waits for its retry
                    continue
                due.append(taken.owed)
                if len(due) >= self._take_limit:
                    break
            if due:
                return self._hand_out(due)
            if held and self._ordered:
                # Nothing may be fetched past what waits here for its retry.
                if not wait:
                    return []
                assert next_due is not None
                with trio.move_on_after(max(next_due - now, 0.0)):
                    await signal.wait()
                continue
            try:
                fresh = await self._fetch(self._take_limit, FETCH_POLL if wait else 0.05)
                if fresh and wait and len(fresh) < self._group and self._max_wait > 0:
                    fresh += await self._fill(len(fresh))
            except QueueError as exc:
                log.warning("sink %s: taking from the queue failed: %s", self._name, exc)
                if not wait:
                    return []
                with trio.move_on_after(ERROR_PAUSE):
                    await signal.wait()
                continue
            if fresh:
                return self._hand_out(fresh)
            if not wait:
                return []
        return []

    async def _fill(self, have: int) -> list[OwedEvent]:
        """Let a batch fill for the sink's ``batch.maxWait``."""
        more: list[OwedEvent] = []
        until = trio.current_time() + self._max_wait
        while have + len(more) < self._group and not self._stopping.is_set():
            left = until - trio.current_time()
            if left <= 0.01:
                break
            more += await self._fetch(self._group - have - len(more), left)
        return more

    def _hand_out(self, deliveries: list[OwedEvent]) -> list[OwedEvent]:
        self._in_flight.update(d.seq for d in deliveries)
        return deliveries

    def release(self, deliveries: Sequence[OwedEvent]) -> None:
        for owed in deliveries:
            self._in_flight.discard(owed.seq)
            if (taken := self._taken.get(owed.seq)) is not None:
                taken.due = 0.0

    def _finish(self, deliveries: Sequence[OwedEvent]) -> list[_Taken]:
        done = []
        for owed in deliveries:
            self._in_flight.discard(owed.seq)
            if (taken := self._taken.pop(owed.seq, None)) is not None:
                done.append(taken)
                if taken.msg is None:
                    self._settled_orphans.add(owed.seq)
        return done

    async def _flush_withheld(self) -> None:
        if self._withheld and not (self._ordered and self._taken):
            acks, self._withheld = self._withheld, []
            await self._queue.call(self._nats.settle, ack=acks)

    async def ack(self, deliveries: Sequence[OwedEvent]) -> None:
        # In order, while part of the run is still held here, acknowledging the rest would
        # free slots that fresh events could fill past the held ones: withhold until then.
        self._withheld += [t.msg for t in self._finish(deliveries) if t.msg is not None]
        # Counted first, as in bury: once nothing is pending, the count is complete.
        await self._queue.call(self._nats.count, self._name, delivered=len(deliveries))
        await self._flush_withheld()

    async def retry_later(
        self, deliveries: Sequence[OwedEvent], next_attempt: float, error: str
    ) -> None:
        for owed in deliveries:
            self._in_flight.discard(owed.seq)
            if (taken := self._taken.get(owed.seq)) is not None:
                taken.due = next_attempt
                # The next take hands it out again with its attempt count.
                taken.owed = OwedEvent(owed.seq, owed.event, owed.attempts + 1, owed.created)
        await self._queue.call(self._nats.count, self._name, failed=len(deliveries), error=error)

    async def bury(self, deliveries: Sequence[OwedEvent], error: str) -> None:
        letters = [(t.msg, t.data, t.owed) for t in self._finish(deliveries)]
        # Counted first: whoever sees a dead letter sees the failure that put it there.
        await self._queue.call(self._nats.count, self._name, failed=len(deliveries), error=error)
        await self._queue.call(self._nats.bury, self._name, letters, error)
        await self._flush_withheld()

    async def keep_alive(self) -> None:
        """Every ackWait/3: hold on to the lease (or take it over once it lapsed), and tell
        JetStream that what this instance holds is still being worked on. An instance that
        dies stops both; once its lease went ackWait unrenewed, another one takes over."""
        while True:
            if self._ordered:
                asked = trio.current_time()  # the renewal is no older than this
                try:
                    leading = await self._queue.call(self._nats.lead, self._name, self._ack_wait)
                except QueueError as exc:
                    log.warning("sink %s: the delivery lease failed: %s", self._name, exc)
                    # Unrenewed for ackWait, another instance may hold it now: stop before
                    # two deliver the sink at once.
                    leading = self._leading and trio.current_time() < self._lease_until
                else:
                    if leading:
                        self._lease_until = asked + self._ack_wait * 2 / 3
                if leading and not self._leading:
                    log.info("sink %s: this instance delivers it now", self._name)
                    await self._adopt_orphans()
                elif self._leading and not leading:
                    log.warning("sink %s: lost the delivery lease", self._name)
                    # Cut off from NATS, nothing can be handed back; JetStream hands it out
                    # again after ackWait all the same.
                    with contextlib.suppress(QueueError):
                        await self.hand_back()
                self._leading = leading
                self._queue.wake(self._name)
            msgs = [t.msg for t in self._taken.values() if t.msg is not None] + self._withheld
            if msgs:
                with contextlib.suppress(QueueError):
                    await self._queue.call(self._nats.settle, progress=msgs)
            await trio.sleep(self._ack_wait / 3)

    async def hand_back(self) -> None:
        """Give back what is held (at once, for another instance), then ack what was
        delivered, in that order so nothing later is handed out before the held events."""
        held = [t.msg for t in sorted(self._taken.values(), key=lambda t: t.owed.seq) if t.msg]
        self._taken.clear()
        self._in_flight.clear()
        withheld, self._withheld = self._withheld, []
        if held or withheld:
            await self._queue.call(self._nats.settle, nak=held, ack=withheld)
