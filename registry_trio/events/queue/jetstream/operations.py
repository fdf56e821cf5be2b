"""The NATS side of the JetStream queue: every operation it makes on the server.

:class:`JetStreamOperations` connects, creates or checks the streams (:mod:`.stream`), the
counters bucket and one durable consumer per sink, then publishes, fetches, settles, counts,
buries, takes leases and reads orphans and dead letters. Every method runs on the queue's
asyncio thread; the Trio side (:mod:`.queue`, :mod:`.lease`) calls them through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from ....config import HistoryConfig, QueueConfig, SinkConfig
from ...failures import describe_failure, sensitive_values
from ...model import Event
from ...natsconn import connect_options, new_client
from ..base import DeadLetter, OwedEvent, SinkCounts, take_limit
from .history import HistoryStream, replay_record
from .stream import align_stream, ensure_stream

__all__ = ["JetStreamOperations", "sink_token"]

log = logging.getLogger("registry_trio.events.queue.jetstream")


def sink_token(sink: str) -> str:
    """A subject and consumer-name token for a sink name (names may be any URL)."""
    return hashlib.sha256(sink.encode()).hexdigest()[:16]


def _header_text(text: str) -> str:
    # A NATS header value is one line.
    return " ".join(text.split())[:1000]


class _Stored(NamedTuple):
    """A message read back from a stream."""

    seq: int
    data: bytes
    headers: dict[str, str]


@dataclass
class _Counters:
    delivered: int = 0
    failed_attempts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    # Absent from what older registries stored: None until this instance delivers.
    last_delivered_at: float | None = None


class JetStreamOperations:
    """The NATS side of the queue. Every method runs on the queue's asyncio thread."""

    def __init__(
        self,
        config: QueueConfig,
        sinks: Sequence[SinkConfig],
        instance_id: str,
        history: HistoryConfig,
    ) -> None:
        self._config = config
        self._history_config = history
        # The history stream, once open (None while the history is off); its reads run on
        # the queue's thread like every method here.
        self.history: HistoryStream | None = None
        # Whether the last history publish failed: a run of failures is logged once.
        self._history_failing = False
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
        await ensure_stream(
            self._js,
            api.StreamConfig(
                name=self._stream,
                subjects=[f"{self._stream}.sink.*"],
                retention=api.RetentionPolicy.INTEREST,
                storage=storage,
                num_replicas=self._config.replicas,
                duplicate_window=float(self._config.duplicate_window),
            ),
        )
        await ensure_stream(
            self._js,
            api.StreamConfig(
                name=self._dead_stream,
                subjects=[f"{self._stream}.dead.*"],
                retention=api.RetentionPolicy.LIMITS,
                storage=storage,
                num_replicas=self._config.replicas,
            ),
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
            await align_stream(
                self._js,
                (await self._js.stream_info(kv_stream)).config,
                api.StreamConfig(
                    name=kv_stream, storage=storage, num_replicas=self._config.replicas
                ),
            )
        if self._history_config.enable:
            history = HistoryStream(self._js, self._stream, sink_token)
            await ensure_stream(
                self._js,
                history.config(
                    float(self._history_config.max_age),
                    self._history_config.max_rows,
                    self._config.replicas,
                ),
            )
            self.history = history
        # Consumers exist before the first append: with interest retention, a message no
        # consumer is interested in would not be kept.
        for sink in self._sinks:
            await self._ensure_consumer(sink)
            self._counters[sink.name] = await self._load_counters(sink.name)

    async def _ensure_consumer(self, sink: SinkConfig) -> None:
        token = sink_token(sink.name)
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

    async def subscribe(self, sink: str) -> JetStreamContext.PullSubscription:
        token = sink_token(sink)
        subscription: JetStreamContext.PullSubscription = await self._js.pull_subscribe_bind(
            f"sink_{token}", self._stream
        )
        return subscription

    async def unsubscribe(self, subscription: JetStreamContext.PullSubscription) -> None:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()

    async def fetch(
        self, subscription: JetStreamContext.PullSubscription, batch: int, expires: float
    ) -> list[Msg]:
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
            await self._nc.flush(timeout=self._timeout)  # type: ignore[arg-type]  # nats-py says int; float seconds work

    async def count(
        self,
        sink: str,
        *,
        delivered: int = 0,
        failed: int = 0,
        error: str | None = None,
        history: Sequence[tuple[Event, bytes]] = (),
    ) -> None:
        """Add to this instance's counters of the sink, and record the history of the
        attempts counted: both in the same hop, side by side, so that the history costs no
        round trip of its own (nor, in an outage, a timeout of its own)."""
        counters = self._counters.setdefault(sink, _Counters())
        counters.delivered += delivered
        counters.failed_attempts += failed
        if delivered:
            counters.last_delivered_at = time.time()
        if error is not None:
            counters.last_error, counters.last_error_at = error, time.time()
        value = json.dumps(counters.__dict__).encode()
        outcomes: list[object] = await asyncio.gather(
            self._kv.put(f"{sink_token(sink)}.{self._instance}", value),
            self._record(sink, history),
            return_exceptions=True,
        )
        if isinstance(counted := outcomes[0], BaseException):
            raise counted

    async def _record(self, sink: str, records: Sequence[tuple[Event, bytes]]) -> None:
        """Publish history records. A failure is logged and dropped: the history describes
        delivery and must not stop it (a history stream deleted by hand would otherwise
        fail every acknowledgement)."""
        if self.history is None or not records:
            return
        try:
            await self.history.publish(sink, records)
        except Exception as exc:
            if not self._history_failing:
                log.warning(
                    "jetstream queue: cannot record delivery history (%s); delivery goes on",
                    self.describe(exc),
                )
            self._history_failing = True
        else:
            self._history_failing = False

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
            except nats.js.errors.NotFoundError:
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

    async def orphans(self, sink: str) -> list[tuple[int, bytes, float | None]]:
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
            found.append((raw.seq, raw.data, None if raw.time is None else raw.time.timestamp()))
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
        # This instance's own key is read whatever the listing says: nats-py's keys() can
        # come back before the watcher has seen every key.
        own = f"{token}.{self._instance}"
        for key in sorted({k for k in keys if k.startswith(f"{token}.")} | {own}):
            try:
                entry = await self._kv.get(key)
            except nats.js.errors.NotFoundError:
                continue  # no count from this instance yet
            if entry.value is None:
                continue
            part = _Counters(**json.loads(entry.value))
            total.delivered += part.delivered
            total.failed_attempts += part.failed_attempts
            if part.last_error_at is not None and (
                total.last_error_at is None or part.last_error_at > total.last_error_at
            ):
                total.last_error, total.last_error_at = part.last_error, part.last_error_at
            if part.last_delivered_at is not None:
                total.last_delivered_at = max(part.last_delivered_at, total.last_delivered_at or 0)
        return SinkCounts(
            pending=pending,
            dead=dead,
            delivered=total.delivered,
            failed_attempts=total.failed_attempts,
            oldest_pending=oldest,
            last_error=total.last_error,
            last_error_at=total.last_error_at,
            last_delivered_at=total.last_delivered_at,
        )

    async def _dead_messages(self, sink: str, after: int) -> AsyncIterator[_Stored]:
        subject = f"{self._stream}.dead.{sink_token(sink)}"
        seq = after + 1
        while True:
            try:
                raw: api.RawStreamMsg = await self._js.get_msg(
                    self._dead_stream, seq=seq, subject=subject, next=True
                )
            except nats.js.errors.NotFoundError:
                return
            # A stored message always has its sequence (nats-py types every field of the
            # reply optional), and an empty payload comes back as None.
            stored = _Stored(cast(int, raw.seq), raw.data or b"", raw.headers or {})
            yield stored
            seq = stored.seq + 1

    async def dead(self, sink: str, limit: int, after: int) -> list[DeadLetter]:
        letters = []
        async for stored in self._dead_messages(sink, after):
            letters.append(
                DeadLetter(
                    seq=stored.seq,
                    sink=sink,
                    event=Event.from_bytes(stored.data),
                    attempts=int(stored.headers.get("Registry-Attempts", "0")),
                    last_error=stored.headers.get("Registry-Error", ""),
                )
            )
            if len(letters) >= limit:
                break
        return letters

    async def replay(self, sink: str, event_ids: Sequence[str] | None, by: str | None) -> int:
        token = sink_token(sink)
        wanted = None if event_ids is None else set(event_ids)
        replayed = 0
        async for stored in self._dead_messages(sink, 0):
            event = Event.from_bytes(stored.data)
            if wanted is not None and event.id not in wanted:
                continue
            # Recorded first: once published, the event may be delivered (and that recorded)
            # before this call returns. A publish that fails leaves the dead letter (and this
            # record of an attempted replay).
            original = int(stored.headers.get("Nats-Msg-Id", "").rpartition(".")[2] or 0)
            await self._record(sink, [replay_record(sink, event, original, by)])
            # A new message id: the original is likely still inside the duplicate window.
            headers = {"Nats-Msg-Id": f"{event.id}.{token}.replay.{stored.seq}"}
            await self._js.publish(f"{self._stream}.sink.{token}", stored.data, headers=headers)
            await self._js.delete_msg(self._dead_stream, stored.seq)
            replayed += 1
        return replayed
