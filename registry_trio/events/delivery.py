"""Delivery: one supervised task per sink, the only place that knows about retries.

Per sink, a :class:`SinkWorker` loops: take due deliveries from the outbox (in enqueue order),
encode them, send them through the sink's transport, then acknowledge, reschedule with
backoff, or bury in the dead-letter store. :class:`Delivery` runs one worker per sink under a
supervisor that logs a crash and restarts the worker with backoff, so a broken sink never
takes the server or another sink down.

Ordering: with ``concurrency: 1`` (the default) a worker never skips past an event that is
waiting for its retry, so a sink sees events in enqueue order. ``concurrency: N`` runs N
loops over one sink and gives up ordering for throughput.

Shutdown (:meth:`Delivery.stop`): workers stop taking new work, sends already under way get
until the deadline to finish and be acknowledged; anything else stays pending in the outbox
and the next start resumes exactly there.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence

import trio

from ..config import EventsConfig, SinkConfig
from .formats import encoder_for
from .queue import Delivery as Owed
from .queue import Outbox, OutboxReader
from .sinks import Message, Outcome, Result, Transport
from .sinks.http import HTTPSink

__all__ = ["Delivery", "SinkWorker"]

log = logging.getLogger("registry_trio.events.delivery")

# Rows read per query when overtaking is allowed (concurrent mode skips rows not yet due).
READ_AHEAD = 256
# An idle worker looks at the queue at least this often even without a signal, so work
# committed by another process (`registry-trio events replay` or `gc` on a live queue) is
# picked up without a push to wake it.
IDLE_POLL = 2.0
# In ordered mode a single-event format sends this many events one after another before
# acknowledging them in one commit; a crash in between redelivers at most this many.
ORDERED_RUN = 64


def full_jitter(attempt: int, initial: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, initial * 2^(n-1))].

    Full jitter spreads the retries of many failed events across the window instead of
    sending them back in lock-step when a sink comes back.
    """
    return random.uniform(0, min(cap, initial * 2 ** max(attempt - 1, 0)))


class SinkWorker:
    def __init__(
        self,
        config: SinkConfig,
        outbox: Outbox,
        transport: Transport,
        type_prefix: str,
        stopping: trio.Event,
        on_delivered: Callable[[str, Sequence[float]], None] | None = None,
    ) -> None:
        self.config = config
        # Called with (sink, seconds from each event's time to its acknowledgement): metrics.
        self._on_delivered = on_delivered
        self.name = str(config.name)
        self._outbox = outbox
        self._transport = transport
        self._prefix = type_prefix
        self._stopping = stopping
        self._encode = encoder_for(config.format)
        self._group = config.batch.max_events if config.batches else 1
        self._ordered = config.concurrency == 1
        # How many deliveries one take may hold: a batch, or an ordered run of single sends.
        # Concurrent loops take one request's worth each, so they really run in parallel.
        self._take_limit = ORDERED_RUN if self._ordered and not config.batches else self._group
        self._reader: OutboxReader | None = None
        self._read_lock = trio.Lock()
        # Deliveries being sent right now; kept in memory only (a crash makes them pending).
        self.in_flight: set[int] = set()

    async def run(self) -> None:
        self.in_flight.clear()
        self._reader = self._outbox.reader()
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.config.concurrency):
                    nursery.start_soon(self._loop)
        finally:
            self._reader.close()

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def _loop(self) -> None:
        ahead: list[Owed] = []
        while not self._stopping.is_set():
            batch = ahead or await self._take()
            ahead = []
            if not batch:
                continue
            if not self._ordered or len(batch) < self._take_limit:
                # Reading ahead pays only in a backlog (a full batch was just taken). When
                # events trickle in it would send each few at once and defeat batch filling.
                await self._deliver(batch)
                continue
            # Ordered: read the next batch while this one is on the wire, so a backlog
            # drains without the read waiting on the send. If this batch fails, the one read
            # ahead is released unsent: nothing may overtake an event waiting for its retry.
            async with trio.open_nursery() as nursery:

                async def read_ahead() -> None:
                    nonlocal ahead
                    ahead = await self._take(wait=False)

                nursery.start_soon(read_ahead)
                delivered = await self._deliver(batch)
            if not delivered:
                self.in_flight.difference_update(o.seq for o in ahead)
                ahead = []

    async def _read(self) -> list[tuple[Owed, float]]:
        assert self._reader is not None
        async with self._read_lock:
            if self._ordered:
                # In order, what is in flight is a prefix of the queue: read past it rather
                # than parse its rows again only to skip them.
                after = max(self.in_flight, default=0)
                return await self._reader.pending(self.name, self._take_limit, after)
            return await self._reader.pending(self.name, READ_AHEAD + len(self.in_flight))

    async def _take(self, *, wait: bool = True) -> list[Owed]:
        """Wait for due deliveries; return up to one batch of them (empty when stopping).

        With ``wait=False``: one look at the queue, returning what is due now, if anything.
        """
        filling_until: float | None = None
        while not self._stopping.is_set():
            # Taken before reading, so a commit that lands after the read still wakes us.
            signal = self._outbox.signal(self.name)
            now = time.time()
            due: list[Owed] = []
            next_due = math.inf
            for owed, due_at in await self._read():
                if owed.seq in self.in_flight:
                    continue
                if due_at > now:
                    next_due = min(next_due, due_at)
                    if self._ordered:
                        break  # never overtake an event that waits for its retry
                    continue
                due.append(owed)
                if len(due) >= self._take_limit:
                    break
            wait_for_more = (
                wait
                and due
                and len(due) < self._group
                and self.config.batch.max_wait > 0
                and (filling_until is None or trio.current_time() < filling_until)
            )
            if due and not wait_for_more:
                self.in_flight.update(o.seq for o in due)
                return due
            if not wait:
                return []
            if wait_for_more:
                # Let the batch fill for the rest of its window without re-reading the queue
                # at every commit (each read parses every pending row again). A stop ends
                # the wait at once.
                if filling_until is None:
                    filling_until = trio.current_time() + self.config.batch.max_wait
                with trio.move_on_at(filling_until):
                    await self._stopping.wait()
                continue
            deadline = trio.current_time() + min(max(next_due - now, 0.0), IDLE_POLL)
            with trio.move_on_at(deadline):
                await signal.wait()
        return []

    async def _deliver(self, batch: Sequence[Owed]) -> bool:
        """Send ``batch``, then acknowledge, reschedule or bury; whether all was delivered."""
        groups = [batch[i : i + self._group] for i in range(0, len(batch), self._group)]
        messages = []
        for group in groups:
            headers, body = self._encode([o.event for o in group], self._prefix)
            messages.append(Message(headers, body, group[0].event.id))
        hop = max(self._transport.per_hop, 1)
        sent, outcome = 0, Outcome(Result.DELIVERED)
        try:
            for start in range(0, len(messages), hop):
                done, outcome = await self._transport.send(messages[start : start + hop])
                sent += done
                if outcome.result is not Result.DELIVERED or self._stopping.is_set():
                    break  # on stop: finish the hop in flight, leave the rest queued
            delivered = [o for group in groups[:sent] for o in group]
            # Only the group that was tried and refused failed; groups after it (or left
            # unsent by a stop) were never attempted and simply stay pending.
            attempted = outcome.result is not Result.DELIVERED and sent < len(groups)
            failed = list(groups[sent]) if attempted else []
            if delivered:
                await self._outbox.ack(self.name, [o.seq for o in delivered])
                if self._on_delivered is not None:
                    now = time.time()
                    latencies = [now - o.event.time.timestamp() for o in delivered]
                    self._on_delivered(self.name, latencies)
            if failed:
                await self._fail(failed, outcome)
            return len(delivered) == len(batch)
        finally:
            self.in_flight.difference_update(o.seq for o in batch)

    async def _fail(self, group: Sequence[Owed], outcome: Outcome) -> None:
        retry = self.config.retry
        now = time.time()
        if outcome.result is Result.REJECTED:
            dead, later = list(group), []
            reason = f"rejected: {outcome.error}"
        else:
            dead = [
                o
                for o in group
                if (retry.max_attempts and o.attempts + 1 >= retry.max_attempts)
                or now - o.created >= retry.max_age
            ]
            later = [o for o in group if o not in dead]
            reason = f"retry budget exhausted: {outcome.error}"
        if later:
            attempt = max(o.attempts for o in later) + 1
            delay = full_jitter(attempt, retry.initial_backoff, retry.max_backoff)
            if outcome.retry_after is not None:
                delay = max(delay, min(outcome.retry_after, retry.max_backoff))
            log.info(
                "sink %s: %d event(s) failed (%s); attempt %d, retrying in %.2fs",
                self.name,
                len(later),
                outcome.error,
                attempt,
                delay,
            )
            await self._outbox.retry_later(
                self.name, [o.seq for o in later], now + delay, outcome.error
            )
        if dead:
            for owed in dead:
                log.warning(
                    "sink %s: event %s (%s) moved to dead letters: %s",
                    self.name,
                    owed.event.id,
                    owed.event.action,
                    reason,
                )
            await self._outbox.bury(self.name, [o.seq for o in dead], reason)


def _transport_for(config: SinkConfig) -> Transport:
    if config.type == "nats":
        from .sinks.nats import NATSSink

        return NATSSink(config)
    return HTTPSink(config)


class Delivery:
    """Supervises one :class:`SinkWorker` per configured sink."""

    def __init__(
        self,
        config: EventsConfig,
        outbox: Outbox,
        transport_for: Callable[[SinkConfig], Transport] = _transport_for,
        on_delivered: Callable[[str, Sequence[float]], None] | None = None,
    ) -> None:
        self._config = config
        self._outbox = outbox
        self._stopping = trio.Event()
        # Set once every worker has returned and every transport is closed.
        self.stopped = trio.Event()
        self._scope: trio.CancelScope | None = None
        self.workers = [
            SinkWorker(
                sink, outbox, transport_for(sink), config.type_prefix, self._stopping, on_delivered
            )
            for sink in config.sinks
        ]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                for worker in self.workers:
                    nursery.start_soon(self._supervise, worker)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                for worker in self.workers:
                    await worker.aclose()
            self.stopped.set()

    def stop(self) -> None:
        """Stop taking new work; sends under way get ``shutdownTimeout`` to finish."""
        self._stopping.set()
        for worker in self.workers:
            self._outbox.wake(worker.name)
        if self._scope is not None:
            self._scope.deadline = trio.current_time() + self._config.shutdown_timeout

    async def _supervise(self, worker: SinkWorker) -> None:
        restarts = 0
        while not self._stopping.is_set():
            started = trio.current_time()
            try:
                await worker.run()
            except Exception:
                log.exception("sink %s: delivery task crashed; restarting", worker.name)
            if trio.current_time() - started > 60:
                restarts = 0  # it ran fine for a while: start the backoff over
            delay = min(0.1 * 2**restarts, 30.0)
            restarts += 1
            with trio.move_on_after(delay):
                await self._stopping.wait()
