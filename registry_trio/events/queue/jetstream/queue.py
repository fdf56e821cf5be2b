"""The queue: :class:`JetStreamQueue`, the event queue on JetStream.

It owns the asyncio thread and the :class:`~.operations.JetStreamOperations` that run on it,
opens them at start-up (within a deadline, saying why when it cannot), publishes appends in the
order they were begun, and gives each sink's delivery worker a
:class:`~.lease.JetStreamSinkQueue`.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import trio

from ....config import HistoryConfig, QueueConfig, SinkConfig, redact_address
from ...asyncio_thread import AsyncioCall, AsyncioThread
from ...model import Event
from ..base import APPENDED, DeadLetter, PendingAppend, QueueError, SinkCounts
from ..history import EventTrace, HistoryPage, HistoryQuery
from .lease import JetStreamSinkQueue
from .operations import JetStreamOperations, sink_token

__all__ = ["JetStreamQueue"]

# Opening (connect, then create or check the streams, bucket and consumers) may take this
# many times ``queue.timeout`` before start-up gives up.
OPEN_TIMEOUTS = 4

P = ParamSpec("P")
T = TypeVar("T")


class JetStreamQueue:
    """:class:`~registry_trio.events.queue.base.EventQueue` on JetStream; see the package doc."""

    def __init__(
        self,
        config: QueueConfig,
        sinks: Sequence[SinkConfig],
        on_commit: Callable[[int, float], None] | None = None,
        history: HistoryConfig | None = None,
    ) -> None:
        self._config = config
        # Default: on, with the default limits (a queue opened by a test or a tool).
        self._history = history if history is not None else HistoryConfig()
        self._sinks = list(sinks)
        self._on_commit = on_commit
        self.ack_wait = float(config.ack_wait)
        self.instance_id = ""
        self._thread = AsyncioThread(name="jetstream-queue")
        self._nats: JetStreamOperations | None = None
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
        # Worker processes of one server open the queue together and must share one id: the
        # file is created whole or not at all (a link fails when another process made it
        # first), and whoever loses reads the winner's.
        instance_id = uuid.uuid4().hex
        temp = directory / f"instance_id.{instance_id}.tmp"
        temp.write_text(instance_id)
        try:
            os.link(temp, path)
        except FileExistsError:
            if text := path.read_text().strip():
                return text
            temp.replace(path)  # an empty file: what a crash left of an older write
        finally:
            temp.unlink(missing_ok=True)
        return instance_id

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.instance_id = await trio.to_thread.run_sync(self._load_instance_id)
        jetstream = JetStreamOperations(self._config, self._sinks, self.instance_id, self._history)
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

    def _jetstream(self) -> JetStreamOperations:
        if self._closed or self._nats is None:
            raise QueueError("the event queue is shut down")
        return self._nats

    async def call(
        self, fn: Callable[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
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
        subscription = await self.call(jetstream.subscribe, sink.name)
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

    async def replay(
        self, sink: str, event_ids: Sequence[str] | None = None, by: str | None = None
    ) -> int:
        return await self.call(self._jetstream().replay, sink, event_ids, by)

    async def history(self, query: HistoryQuery) -> HistoryPage:
        stream = self._jetstream().history
        if stream is None:
            return HistoryPage([], None)  # the history is off
        return await self.call(stream.page, query)

    async def trace(self, event_id: str) -> EventTrace | None:
        stream = self._jetstream().history
        if stream is None:
            return None
        return await self.call(stream.trace, event_id)

    async def keep_history(self) -> None:
        """Nothing to do: the history stream's own limits (max_age, max_msgs) prune it."""


async def _outcome(jetstream: JetStreamOperations, call: AsyncioCall[T]) -> T:
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
        jetstream: JetStreamOperations,
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
