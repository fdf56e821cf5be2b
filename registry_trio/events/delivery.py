"""Delivery: one supervised task per sink, the only place that knows about retries.

Per sink, a :class:`SinkWorker` loops: take due deliveries from its
:class:`~registry_trio.events.queue.SinkQueue` (in enqueue order),
encode them, send them through the sink's transport, then acknowledge, reschedule with
backoff, or bury in the dead-letter store. :class:`DeliverySupervisor` runs one worker per
sink, logs a crash and restarts the worker with backoff, so a broken sink never takes the
server or another sink down.

Ordering: with ``concurrency: 1`` (the default) a worker never skips past an event that is
waiting for its retry, so a sink sees events in enqueue order. ``concurrency: N`` runs N
loops over one sink and gives up ordering for throughput.

Shutdown (:meth:`DeliverySupervisor.stop`): workers stop taking new work, sends already under
way get until the deadline to finish and be acknowledged; anything else stays pending in the
queue and the next start resumes exactly there.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence

import trio

from ..config import EventsConfig, SinkConfig
from .formats import encoder_for
from .queue import Attempt, EventQueue, OwedEvent, QueueError, SinkQueue
from .queue.base import take_limit
from .sinks import Message, Outcome, Result, Transport
from .sinks.http import HTTPSink

__all__ = ["DeliverySupervisor", "SinkWorker"]

log = logging.getLogger("registry_trio.events.delivery")

# A crashed sink task is restarted after 0.1 s, doubling up to this ...
CRASH_BACKOFF_MAX = 30.0
# ... or up to this when it stopped because the queue was out of reach.
QUEUE_BACKOFF_MAX = 5.0


def full_jitter(attempt: int, initial: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, initial * 2^(n-1))].

    Full jitter spreads the retries of many failed events across the window instead of
    sending them back in lock-step when a sink comes back.
    """
    # The exponent stops at 64, far past any cap: from attempt 1026 on (hours of outage, or
    # minutes with a short maxBackoff) 2^n no longer converts to a float, and the sink's
    # task crashed on every failure from then on.
    return random.uniform(0, min(cap, initial * 2 ** min(max(attempt - 1, 0), 64)))


class SinkWorker:
    def __init__(
        self,
        config: SinkConfig,
        queue: EventQueue,
        transport: Transport,
        type_prefix: str,
        stopping: trio.Event,
        on_delivered: Callable[[str, Sequence[float]], None] | None = None,
    ) -> None:
        self.config = config
        # Called with (sink, seconds from each event's time to its acknowledgement): metrics.
        self._on_delivered = on_delivered
        self.name = config.name
        self._queue = queue
        self._transport = transport
        self._prefix = type_prefix
        self._stopping = stopping
        self._encode = encoder_for(config.format)
        self._group = config.events_per_message
        self._ordered = config.ordered
        self._take_limit = take_limit(config)
        self._sink_queue: SinkQueue | None = None

    @property
    def in_flight(self) -> int:
        """Deliveries being sent right now (kept in memory only: a crash makes them pending)."""
        return 0 if self._sink_queue is None else self._sink_queue.in_flight

    async def run(self) -> None:
        async with self._queue.consumer(self.config, stopping=self._stopping) as sink_queue:
            self._sink_queue = sink_queue
            try:
                async with trio.open_nursery() as nursery:
                    for _ in range(self.config.concurrency):
                        nursery.start_soon(self._loop, sink_queue)
            finally:
                self._sink_queue = None

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def _loop(self, sink_queue: SinkQueue) -> None:
        ahead: list[OwedEvent] = []
        while not self._stopping.is_set():
            batch = ahead or await sink_queue.take()
            ahead = []
            if not batch:
                continue
            if not self._ordered or len(batch) < self._take_limit:
                # Reading ahead pays only in a backlog (a full batch was just taken). When
                # events trickle in it would send each few at once and defeat batch filling.
                await self._deliver(sink_queue, batch)
                continue
            # Ordered: read the next batch while this one is on the wire, so a backlog
            # drains without the read waiting on the send. If this batch fails, the one read
            # ahead is released unsent: nothing may overtake an event waiting for its retry.
            async with trio.open_nursery() as nursery:

                async def read_ahead() -> None:
                    nonlocal ahead
                    ahead = await sink_queue.take(wait=False)

                nursery.start_soon(read_ahead)
                delivered = await self._deliver(sink_queue, batch)
            if not delivered:
                sink_queue.release(ahead)
                ahead = []
        sink_queue.release(ahead)

    async def _deliver(self, sink_queue: SinkQueue, batch: Sequence[OwedEvent]) -> bool:
        """Send ``batch``, then acknowledge, reschedule or bury; whether all was delivered."""
        groups = [batch[i : i + self._group] for i in range(0, len(batch), self._group)]
        messages = []
        for group in groups:
            headers, body = self._encode([o.event for o in group], self._prefix)
            messages.append(Message(headers, body, group[0].event.id))
        hop = max(self._transport.per_hop, 1)
        sent, outcome = 0, Outcome(Result.DELIVERED)
        # How each group sent went, for the history: its hop's timing, its size, the answer.
        attempts: list[Attempt] = []
        try:
            for start in range(0, len(messages), hop):
                began, clock = time.time(), time.perf_counter()
                done, outcome = await self._transport.send(messages[start : start + hop])
                latency = time.perf_counter() - clock
                answer = self._answer(outcome)
                for group in groups[start : start + done]:
                    attempts.append(Attempt(began, latency, len(group), answer))
                if outcome.result is not Result.DELIVERED and start + done < len(groups):
                    failed_group = groups[start + done]
                    attempts.append(
                        Attempt(began, latency, len(failed_group), outcome.status, outcome.error)
                    )
                sent += done
                if outcome.result is not Result.DELIVERED or self._stopping.is_set():
                    break  # on stop: finish the hop in flight, leave the rest queued
        except BaseException:
            # Cancelled mid-send (a stop past its deadline) or a crash: whether the sink got
            # them is unknown, so they stay owed and are sent again.
            sink_queue.release(batch)
            raise
        delivered = [o for group in groups[:sent] for o in group]
        # Only the group that was tried and refused failed; groups after it (or left unsent
        # by a stop) were never attempted and simply stay pending.
        attempted = outcome.result is not Result.DELIVERED and sent < len(groups)
        failed = list(groups[sent]) if attempted else []
        untried_from = sent + 1 if failed else sent
        untried = [o for group in groups[untried_from:] for o in group]
        sink_queue.release(untried)
        if delivered:
            each = [attempts[i] for i, group in enumerate(groups[:sent]) for _ in group]
            await sink_queue.ack(delivered, each)
            if self._on_delivered is not None:
                now = time.time()
                latencies = [now - o.event.time.timestamp() for o in delivered]
                self._on_delivered(self.name, latencies)
        if failed:
            await self._fail(sink_queue, failed, outcome, attempts[sent])
        return len(delivered) == len(batch)

    def _answer(self, outcome: Outcome) -> str:
        """The sink's answer to a delivered message: the outcome's, or the transport's word."""
        if outcome.result is Result.DELIVERED and outcome.status is not None:
            return outcome.status
        return self._transport.acknowledgement

    async def _fail(
        self, sink_queue: SinkQueue, group: Sequence[OwedEvent], outcome: Outcome, attempt: Attempt
    ) -> None:
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
            number = max(o.attempts for o in later) + 1
            delay = full_jitter(number, retry.initial_backoff, retry.max_backoff)
            if outcome.retry_after is not None:
                delay = max(delay, min(outcome.retry_after, retry.max_backoff))
            log.info(
                "sink %s: %d event(s) failed (%s); attempt %d, retrying in %.2fs",
                self.name,
                len(later),
                outcome.error,
                number,
                delay,
            )
            await sink_queue.retry_later(later, now + delay, attempt)
        if dead:
            for owed in dead:
                log.warning(
                    "sink %s: event %s (%s) moved to dead letters: %s",
                    self.name,
                    owed.event.id,
                    owed.event.action,
                    reason,
                )
            await sink_queue.bury(dead, reason, attempt)


def _only_queue_errors(exc: BaseException) -> bool:
    """Whether ``exc`` is a QueueError, or a group (from nurseries) holding only those."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(QueueError)[1] is None
    return isinstance(exc, QueueError)


def _first(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _transport_for(config: SinkConfig) -> Transport:
    if config.type == "nats":
        from .sinks.nats import NATSSink

        return NATSSink(config)
    return HTTPSink(config)


class DeliverySupervisor:
    """Supervises one :class:`SinkWorker` per configured sink."""

    def __init__(
        self,
        config: EventsConfig,
        queue: EventQueue,
        transport_for: Callable[[SinkConfig], Transport] = _transport_for,
        on_delivered: Callable[[str, Sequence[float]], None] | None = None,
    ) -> None:
        self._config = config
        self._queue = queue
        self._stopping = trio.Event()
        # Set once every worker has returned and every transport is closed.
        self.stopped = trio.Event()
        self._scope: trio.CancelScope | None = None
        self.workers = [
            SinkWorker(
                sink, queue, transport_for(sink), config.type_prefix, self._stopping, on_delivered
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
            self._queue.wake(worker.name)
        if self._scope is not None:
            self._scope.deadline = trio.current_time() + self._config.shutdown_timeout

    async def _supervise(self, worker: SinkWorker) -> None:
        restarts = 0
        while not self._stopping.is_set():
            started = trio.current_time()
            longest = CRASH_BACKOFF_MAX
            try:
                await worker.run()
            except Exception as exc:
                if _only_queue_errors(exc):
                    # The queue is out of reach (a JetStream outage): an expected condition,
                    # not a bug, so one line and a short backoff, to resume soon after.
                    longest = QUEUE_BACKOFF_MAX
                    log.warning("sink %s: %s; restarting delivery", worker.name, _first(exc))
                else:
                    log.exception("sink %s: delivery task crashed; restarting", worker.name)
            if trio.current_time() - started > 60:
                restarts = 0  # it ran fine for a while: start the backoff over
            delay = min(0.1 * 2**restarts, longest)
            restarts += 1
            with trio.move_on_after(delay):
                await self._stopping.wait()
