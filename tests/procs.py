"""The registry as a real subprocess, for tests that crash it (``kill -9``) and restart it.

Usage::

    config = write_config(tmp_path)
    async with server_process(config) as server:
        ... server.url ...
        await server.kill()          # SIGKILL, waits until the process is gone
        await server.start()         # a new process on the same config (same storage)

The process's stdout and stderr (logs) are drained continuously into ``server.output``, so
a chatty server never blocks on a full pipe, and a test can wait for a log line. Every
process is killed when the context exits, whatever happened in the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

__all__ = ["ServerProcess", "WatchedProcess", "server_process", "write_config"]

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
_LISTENING = re.compile(rb"listening on (https?://[^\s\"]+)")


def write_config(tmp_path: Path, **overrides: object) -> Path:
    """A JSON config on 127.0.0.1:0 with storage under ``tmp_path``; top-level overrides.

    One process unless ``http`` overrides ``workers``: what a crash test kills is then the
    whole server (tests/test_workers.py runs several).
    """
    data: dict[str, object] = {
        "storage": {"rootDirectory": str(tmp_path / "registry_data")},
        "http": {"address": "127.0.0.1", "port": 0, "workers": 1},
        "log": {"level": "info"},
    }
    for key, value in overrides.items():
        current = data.get(key)
        data[key] = (
            {**current, **value} if isinstance(current, dict) and isinstance(value, dict) else value
        )
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data, indent=2))
    return path


class WatchedProcess:
    """One process at a time whose output is drained all the time into ``output``.

    A chatty process never blocks on a full pipe, a test can wait for a line it prints, and
    stopping waits until the process is gone and its output is all read. Subclasses say how
    to start it (:meth:`_launch`) and which line means it is ready.
    """

    stop_timeout = STOP_TIMEOUT

    def __init__(self, nursery: trio.Nursery) -> None:
        self.process: trio.Process | None = None
        # Everything every process printed, in order; ``_mark`` is where the current one began.
        self.output = bytearray()
        self._mark = 0
        self._nursery = nursery
        self._changed = trio.Event()
        self._drained = trio.Event()

    @property
    def current_output(self) -> str:
        """What the running (or last) process printed."""
        return self.output[self._mark :].decode(errors="replace")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def _launch(
        self, command: list[str], ready: re.Pattern[bytes], seconds: float, **options: Any
    ) -> re.Match[bytes]:
        """Start ``command`` (its output on stdout, or stderr with ``stdout=DEVNULL``) and
        wait for ``ready``; the match. A process that fails to get there is killed."""
        assert not self.running, "the process is already running"
        self._mark = len(self.output)
        self._drained = trio.Event()
        watched = "stderr" if options.get("stdout") == subprocess.DEVNULL else "stdout"
        options.setdefault("stdout", subprocess.PIPE)
        options.setdefault("stderr", subprocess.PIPE if watched == "stderr" else subprocess.STDOUT)
        self.process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, **options
        )
        self._nursery.start_soon(self._drain, getattr(self.process, watched), self._drained)
        try:
            return await self.wait_for_output(ready, seconds)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.kill()
            raise

    async def _drain(self, stream: trio.abc.ReceiveStream, drained: trio.Event) -> None:
        try:
            async with stream:
                async for chunk in stream:
                    self.output += chunk
                    self._notify()
        finally:
            drained.set()
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_output(
        self, pattern: re.Pattern[bytes] | bytes, seconds: float = START_TIMEOUT
    ) -> re.Match[bytes]:
        """Wait until the current process prints something matching ``pattern``.

        Fails at once, with the output, if the process exits first.
        """
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        with trio.move_on_after(seconds):
            while True:
                if match := regex.search(self.output, self._mark):
                    return match
                if self._drained.is_set():
                    raise AssertionError(
                        f"process exited ({self.process and self.process.returncode}) before "
                        f"printing {regex.pattern!r}:\n{self.current_output}"
                    )
                await self._changed.wait()
        raise AssertionError(
            f"no {regex.pattern!r} from the process within {seconds}s:\n{self.current_output}"
        )

    async def kill(self) -> None:
        """``kill -9`` the process and wait until it is gone (and its output drained)."""
        await self._stop(signal.SIGKILL)

    async def _stop(self, signum: signal.Signals) -> None:
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            process.send_signal(signum)
        with trio.fail_after(self.stop_timeout):
            await process.wait()
            await self._drained.wait()


class ServerProcess(WatchedProcess):
    """One ``registry-trio serve`` subprocess at a time on a fixed config file."""

    def __init__(self, config: Path, nursery: trio.Nursery, cwd: Path | None = None) -> None:
        super().__init__(nursery)
        self.config = config
        self.cwd = cwd or config.parent
        self.url = ""

    async def start(self, seconds: float = START_TIMEOUT) -> str:
        """Start a process and wait for its "listening on URL" line; the URL."""
        match = await self._launch(
            [sys.executable, "-m", "registry_trio", "serve", "-c", str(self.config)],
            _LISTENING,
            seconds,
            cwd=self.cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.url = match[1].decode()
        return self.url

    async def terminate(self) -> int:
        """SIGTERM (graceful shutdown); wait for the process to exit; its exit code."""
        await self._stop(signal.SIGTERM)
        assert self.process is not None
        return self.process.returncode  # type: ignore[return-value]

    def children(self) -> list[int]:
        """The pids of the running process's children (a supervisor's workers)."""
        assert self.process is not None
        # Per thread: the process may start children from any of its threads.
        return [
            int(child)
            for task in Path(f"/proc/{self.process.pid}/task").iterdir()
            for child in (task / "children").read_text().split()
        ]

    async def restart(self) -> str:
        """``kill -9`` the current process, then start a new one on the same config."""
        await self.kill()
        return await self.start()

    async def wait_until(self, condition: Callable[[], bool], seconds: float = 10.0) -> None:
        """Poll a cheap condition (a file size, ...) until it holds; fail after ``seconds``."""
        with trio.fail_after(seconds):
            while not condition():
                if not self.running:
                    raise AssertionError(f"server exited while waiting:\n{self.current_output}")
                await trio.sleep(0.01)  # ok-sleep: polling a condition under a deadline


@asynccontextmanager
async def server_process(config: Path, *, cwd: Path | None = None) -> AsyncIterator[ServerProcess]:
    """A started :class:`ServerProcess`; whatever runs at exit is killed."""
    async with trio.open_nursery() as nursery:
        server = ServerProcess(config, nursery, cwd)
        try:
            await server.start()
            yield server
        finally:
            with trio.CancelScope(shield=True):
                await server.kill()
            nursery.cancel_scope.cancel()
