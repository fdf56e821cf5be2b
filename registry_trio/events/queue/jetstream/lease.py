"""One sink's deliveries on one instance: the lease and the ordering.

:class:`JetStreamSinkQueue` is what a sink's delivery worker takes from, acknowledges and
buries through. In order, it delivers only while this instance holds the sink's lease, sends a
previous holder's orphans first, and never pulls past an event that waits for its retry.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar

import trio
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ....config import SinkConfig
from ...model import Event
from ..base import OwedEvent, QueueError, take_limit
from ..history import Attempt, Step
from .history import attempt_record
from .operations import JetStreamOperations

P = ParamSpec("P")
T = TypeVar("T")


class QueueConnection(Protocol):
    """What a sink's queue needs of the queue it belongs to (``JetStreamQueue``)."""

    ack_wait: float

    async def call(
        self, fn: Callable[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    def wake(self, sink: str) -> None: ...

    def signal(self, sink: str) -> trio.Event: ...


__all__ = ["JetStreamSinkQueue"]

log = logging.getLogger("registry_trio.events.queue.jetstream")

# One pull request waits this long for messages before the worker looks at its state again.
FETCH_POLL = 1.0
# After a NATS error while taking, wait this long before trying again.
ERROR_PAUSE = 0.5


@dataclass
class _Taken:
    """A message this instance holds: in flight, or waiting here for its retry."""

    owed: OwedEvent
    data: bytes
    # The handle to acknowledge it with; None for an orphan read from the stream (see
    # JetStreamSinkQueue), until JetStream hands it to us again.
    msg: Msg | None
    # When the stream stored it (the event's commit), for the history.
    committed: float | None = None
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
        queue: QueueConnection,
        jetstream: JetStreamOperations,
        subscription: JetStreamContext.PullSubscription,
        sink: SinkConfig,
        stopping: trio.Event,
    ) -> None:
        self._queue = queue
        self._nats = jetstream
        self._subscription = subscription
        self._name = sink.name
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
                committed = msg.metadata.timestamp.timestamp()
                self._taken[seq] = _Taken(owed, msg.data, msg, committed)
                fresh.append(owed)
        if settled:
            await self._queue.call(self._nats.settle, ack=settled)
        if gap and self._ordered:
            log.info("sink %s: a delivery went to another instance; taking it back", self._name)
            await self._adopt_orphans()
            return []  # all of it is held now, and taken in stream order
        return fresh

    async def _adopt_orphans(self) -> None:
        for seq, data, committed in await self._queue.call(self._nats.orphans, self._name):
            if seq in self._taken:
                continue
            event = Event.from_bytes(data)
            owed = OwedEvent(seq, event, 0, event.time.timestamp())
            self._taken[seq] = _Taken(owed, data, None, committed)
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

    def _records(
        self,
        deliveries: Sequence[OwedEvent],
        attempts: Sequence[Attempt],
        step: Step,
        retry_at: float | None = None,
    ) -> list[tuple[Event, bytes]]:
        """The history records of these attempts (none while the history is off)."""
        if self._nats.history is None:
            return []
        return [
            attempt_record(
                self._name,
                owed.event,
                owed.seq,
                owed.attempts + 1,
                step,
                attempt,
                retry_at,
                taken.committed if (taken := self._taken.get(owed.seq)) is not None else None,
            )
            for owed, attempt in zip(deliveries, attempts, strict=True)
        ]

    async def ack(self, deliveries: Sequence[OwedEvent], attempts: Sequence[Attempt]) -> None:
        records = self._records(deliveries, attempts, Step.DELIVERED)
        # In order, while part of the run is still held here, acknowledging the rest would
        # free slots that fresh events could fill past the held ones: withhold until then.
        self._withheld += [t.msg for t in self._finish(deliveries) if t.msg is not None]
        # Counted first, as in bury: once nothing is pending, the count is complete.
        await self._queue.call(
            self._nats.count, self._name, delivered=len(deliveries), history=records
        )
        await self._flush_withheld()

    async def retry_later(
        self, deliveries: Sequence[OwedEvent], next_attempt: float, attempt: Attempt
    ) -> None:
        records = self._records(deliveries, [attempt] * len(deliveries), Step.FAILED, next_attempt)
        for owed in deliveries:
            self._in_flight.discard(owed.seq)
            if (taken := self._taken.get(owed.seq)) is not None:
                taken.due = next_attempt
                # The next take hands it out again with its attempt count.
                taken.owed = OwedEvent(owed.seq, owed.event, owed.attempts + 1, owed.created)
        await self._queue.call(
            self._nats.count,
            self._name,
            failed=len(deliveries),
            error=attempt.error or "",
            history=records,
        )

    async def bury(self, deliveries: Sequence[OwedEvent], reason: str, attempt: Attempt) -> None:
        records = self._records(deliveries, [attempt] * len(deliveries), Step.DEAD)
        letters = [(t.msg, t.data, t.owed) for t in self._finish(deliveries)]
        # Counted first: whoever sees a dead letter sees the failure that put it there.
        await self._queue.call(
            self._nats.count, self._name, failed=len(deliveries), error=reason, history=records
        )
        await self._queue.call(self._nats.bury, self._name, letters, reason)
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
