"""Run asyncio coroutines on one dedicated asyncio thread, awaited from Trio.

nats-py is asyncio-only. Rather than a second event loop inside Trio, each NATS user (a NATS
sink, the JetStream queue) owns one :class:`AsyncioThread`: an asyncio loop running forever on
its own thread. Trio code awaits :meth:`AsyncioThread.run`, which schedules a coroutine on that
loop and sleeps until it is done. No Trio worker thread is held per call, but every call
("hop") crosses threads twice, so callers batch work per hop (the NATS sink publishes a whole
run of messages in one; ``bench/nats_sink.py`` measures one event per hop against a run).

Contract:

- The thread starts at the first :meth:`~AsyncioThread.run` and stops in
  :meth:`~AsyncioThread.aclose`, which cancels whatever is still running on the loop, waits
  for it, closes the loop and joins the thread. Nothing is left behind.
- Cancelling the Trio caller cancels the asyncio task, and the caller waits (shielded, up to
  :data:`CANCEL_GRACE` seconds) until that task has really finished, so a cancelled call does
  not leave work running behind the caller's back. A task that ignores cancellation longer
  than that is left to :meth:`~AsyncioThread.aclose`.
- The coroutine's result is returned, its exception raised, in the Trio caller.
- Calls begin on the loop in the order they were made. :meth:`~AsyncioThread.start`
  schedules one at once and returns an :class:`AsyncioCall` to await later, so a caller can
  fix its place in that order before it waits (the JetStream queue's appends rely on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

import trio

__all__ = ["CANCEL_GRACE", "AsyncioCall", "AsyncioThread"]

T = TypeVar("T")

# How long a cancelled caller waits for the asyncio task to acknowledge the cancellation.
CANCEL_GRACE = 5.0


class AsyncioThread:
    """One asyncio event loop on one thread, for one owner; see the module doc."""

    def __init__(self, name: str = "asyncio-bridge") -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop (starting the thread if needed); for callbacks scheduled from asyncio."""
        return self._start()

    def _start(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise RuntimeError(f"{self.name}: the asyncio thread is closed")
        if self._loop is None:
            # The loop is created here but only ever runs on the thread; call_soon_threadsafe
            # before run_forever starts is queued, so callers need not wait for the thread.
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
            self._thread.start()
        return self._loop

    def _main(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            # Stopped by aclose(): cancel what is left and let it unwind before closing.
            leftover = asyncio.all_tasks(loop)
            for task in leftover:
                task.cancel()
            if leftover:
                loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    def start(
        self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any
    ) -> AsyncioCall[T]:
        """Schedule ``fn(*args, **kwargs)`` on the asyncio loop now; await its ``result()``.

        Calls started one after another begin on the loop in that order (the loop runs its
        callbacks first in, first out), whenever their callers get to wait for them.
        """
        return AsyncioCall(self.name, self._start(), fn, args, kwargs)

    async def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the asyncio loop; its result in Trio."""
        return await self.start(fn, *args, **kwargs).result()

    async def aclose(self) -> None:
        """Stop the loop (cancelling what still runs on it) and join the thread."""
        self._closed = True
        if self._loop is None or self._thread is None:
            return
        loop, thread = self._loop, self._thread
        with contextlib.suppress(RuntimeError):  # the loop already closed
            loop.call_soon_threadsafe(loop.stop)
        # Not cancellable: returning before the thread is gone would leave an orphan.
        await trio.to_thread.run_sync(thread.join)


class AsyncioCall(Generic[T]):
    """One coroutine function call scheduled on an :class:`AsyncioThread`'s loop."""

    def __init__(
        self,
        name: str,
        loop: asyncio.AbstractEventLoop,
        fn: Callable[..., Coroutine[Any, Any, T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self._name = name
        self._loop = loop
        self._done = trio.Event()
        self._task: asyncio.Task[T] | None = None
        self._error: BaseException | None = None
        token = trio.lowlevel.current_trio_token()

        def wake(_: object = None) -> None:  # on the asyncio thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._done.set)

        def start() -> None:  # on the asyncio thread
            try:
                task = loop.create_task(fn(*args, **kwargs))
            except BaseException as exc:  # fn raised before returning a coroutine
                self._error = exc
                wake()
                return
            self._task = task
            task.add_done_callback(wake)

        loop.call_soon_threadsafe(start)

    def _cancel(self) -> None:  # on the asyncio thread; always after start() (FIFO)
        if self._task is not None:
            self._task.cancel()

    async def result(self) -> T:
        """Wait for the call to end: its result, or its exception raised here."""
        try:
            await self._done.wait()
        except trio.Cancelled:
            self._loop.call_soon_threadsafe(self._cancel)
            with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_GRACE):
                await self._done.wait()
            task = self._task
            if task is not None and task.done() and not task.cancelled():
                task.exception()  # retrieved: it ended its own way while being cancelled
            raise
        if self._error is not None:
            raise self._error
        task = self._task
        assert task is not None
        if task.cancelled():
            # Cancelled from the asyncio side (by aclose): the caller's call did not happen.
            raise RuntimeError(f"{self._name}: the call was cancelled by shutdown")
        return task.result()
