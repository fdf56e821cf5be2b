"""Real container clients for the tests: running their commands, their daemons, and what the
registry's event sink saw of them.

Daemons (dockerd, containerd) are started once per test session by *sync* session fixtures:
pytest-trio runs each test in a Trio loop of its own, so a process that outlives one test
cannot be a Trio task. Each daemon gets private state under pytest's temporary directory and a
private socket (it never touches the machine's own daemon), and is stopped at the end of the
session: SIGTERM, then SIGKILL of its process group after a deadline.

A client that cannot start on a machine is skipped, with the reason; where ``CI`` is set it
fails instead: ``.ci/run`` installs every client, so a skip there would hide a missing install.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NoReturn

import pytest
import trio

from registry_trio.config import EVENT_ACTIONS
from tests.conftest import RunningRegistry, make_config, start_registry
from tests.sink import HTTPSinkServer

__all__ = [
    "ALL_ACTIONS",
    "events_of",
    "host_of",
    "registry_with_sink",
    "require",
    "run_tool",
    "sha256",
    "started_daemon",
    "unavailable",
]

TOOL_TIMEOUT = 120.0
DAEMON_START_TIMEOUT = 60.0
DAEMON_STOP_TIMEOUT = 20.0

# Every action, the pulls included (they reach only a sink that lists them).
ALL_ACTIONS = sorted(EVENT_ACTIONS)


def unavailable(reason: str) -> NoReturn:
    """Skip the test (fail it under CI, which installs every client) for ``reason``."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs every client: see .ci/run)", pytrace=False)
    pytest.skip(reason)


def require(binary: str, package: str, path: str | None = None) -> str:
    """The path of ``binary`` (searched in ``path``, else ``$PATH``), or skip naming the
    Debian package that brings it."""
    found = shutil.which(binary, path=path)
    if found is None:
        unavailable(f"{binary} is not installed (Debian package {package})")
    return found


def host_of(url: str) -> str:
    """``127.0.0.1:PORT`` of a registry URL: how clients name the registry in references."""
    return url.split("://", 1)[1].rstrip("/")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def run_tool(
    command: list[str],
    *,
    env: dict[str, str] | None = None,
    stdin: bytes = b"",
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run a client command; unless ``check=False``, fail the test (with its stderr) when
    it does not exit 0."""
    with trio.fail_after(TOOL_TIMEOUT):
        result = await trio.run_process(
            command,
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, **(env or {})},
        )
    if check:
        assert result.returncode == 0, (
            f"{' '.join(command)} exited {result.returncode}:\n"
            f"{result.stderr.decode(errors='replace')}"
        )
    return result


async def registry_with_sink(
    nursery: trio.Nursery, tmp_path: Path, **overrides: object
) -> tuple[RunningRegistry, HTTPSinkServer]:
    """A registry (config ``overrides`` as for ``make_config``) whose every event, pulls
    included, goes to a real HTTP sink."""
    sink = HTTPSinkServer()
    await sink.start(nursery)
    events = {
        "enable": True,
        "queue": {"directory": str(tmp_path / "queue_data")},
        "sinks": [
            {
                "type": "http",
                "address": sink.url,
                "retry": {"initialBackoff": "10ms", "maxBackoff": "50ms"},
                "filter": {"actions": ALL_ACTIONS},
            }
        ],
    }
    config = make_config(tmp_path, extensions={"events": events}, **overrides)
    return await start_registry(nursery, config), sink


def events_of(sink: HTTPSinkServer, kind: str, repository: str) -> list[dict[str, Any]]:
    """The ``data`` of the events of type ``zotregistry.<kind>`` about ``repository``."""
    return [
        e["data"]
        for e in sink.events()
        if e["type"] == f"zotregistry.{kind}" and e["data"]["name"] == repository
    ]


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def started_daemon(
    command: list[str], log: Path, ready: str, what: str
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a daemon until the context exits: ready once its log matches ``ready``.

    A daemon that exits or stays silent at start skips the tests that need it (see
    :func:`unavailable`), with the end of its log as the reason.
    """
    with log.open("wb") as out:
        # A session of its own: the fallback SIGKILL reaches what the daemon started
        # (dockerd's containerd) without touching anything else.
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        pattern = re.compile(ready)
        while not pattern.search(log.read_text(errors="replace")):
            if process.poll() is not None:
                unavailable(f"{what} exited {process.returncode} at start:\n{_tail(log)}")
            if time.monotonic() > deadline:
                unavailable(f"{what} not ready in {DAEMON_START_TIMEOUT}s:\n{_tail(log)}")
            time.sleep(0.05)  # ok-sleep: polling the daemon's log under a deadline
        yield process
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(DAEMON_STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            pass
    # Gone or stuck: whatever is left of its process group goes too.
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(DAEMON_STOP_TIMEOUT)
