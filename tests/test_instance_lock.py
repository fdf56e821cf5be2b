"""One serving instance per event queue directory; offline commands still work beside it.

Real processes throughout: ``registry-trio serve`` subprocesses (one is ``kill -9``ed) and
the real command line for the offline commands.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from tests.api_helpers import digest_of
from tests.procs import START_TIMEOUT, server_process, write_config

# Nothing listens on the discard port: events wait in the queue, which is what
# `events dead|replay` work on.
UNREACHABLE_SINK = {"type": "http", "address": "http://127.0.0.1:9/hook", "name": "hook"}


def queue_config(tmp_path: Path) -> tuple[Path, Path]:
    """A config file with events on, and its queue directory (as the server resolves it)."""
    directory = (tmp_path / "queue_data").resolve()
    events = {"enable": True, "queue": {"directory": str(directory)}, "sinks": [UNREACHABLE_SINK]}
    return write_config(tmp_path, extensions={"events": events}), directory


async def registry_trio(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the command line to its end (within the start timeout); its result."""
    with trio.fail_after(START_TIMEOUT):
        return await trio.run_process(
            [sys.executable, "-m", "registry_trio", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def assert_refused(config: Path, queue_directory: Path) -> None:
    second = await registry_trio("serve", "-c", str(config))
    assert second.returncode == 1, second
    lines = second.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert str(queue_directory) in lines[0], lines[0]
    assert "another registry-trio process (pid " in lines[0], lines[0]
    assert second.stdout == b""


async def assert_serving(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        assert (await http.get("/v2/")).status_code == 200


async def test_a_second_server_on_the_same_queue_refuses_to_start_until_the_first_dies(tmp_path):
    config, directory = queue_config(tmp_path)
    async with server_process(config) as first:
        await assert_refused(config, directory)
        await assert_serving(first.url)  # the refused one changed nothing for the first

        # kill -9: the kernel drops the lock with its holder, so the next start succeeds.
        await first.restart()
        await assert_serving(first.url)
        await assert_refused(config, directory)


async def test_offline_commands_work_beside_a_running_server(tmp_path):
    config, _ = queue_config(tmp_path)
    async with server_process(config) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            params = {"digest": digest_of(b"x")}
            pushed = await http.post("/v2/app/blobs/uploads/", params=params, content=b"x")
            assert pushed.status_code == 201

        # Port 0 in the config: the commands cannot find the server's admin API, so they
        # open the queue directory itself, beside the server that holds its serving lock.
        status = await registry_trio("events", "status", "-c", str(config), "--json")
        assert status.returncode == 0, status.stderr
        (hook,) = json.loads(status.stdout)
        assert hook["name"] == "hook" and hook["pending"] >= 1
        for command in (
            ("events", "dead", "-c", str(config)),
            ("events", "replay", "-c", str(config)),
            ("gc", "-c", str(config), "--dry-run"),
            ("gc", "-c", str(config)),
        ):
            result = await registry_trio(*command)
            assert result.returncode == 0, (command, result.stderr)
        assert server.running
        await assert_serving(server.url)


async def test_an_unusable_queue_directory_stops_start_up_naming_the_key(tmp_path):
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    queue = {"directory": str(not_a_directory / "queue_data")}
    config = write_config(tmp_path, extensions={"events": {"enable": True, "queue": queue}})
    result = await registry_trio("serve", "-c", str(config))
    assert result.returncode == 1, result
    (line,) = result.stderr.decode().splitlines()
    assert "extensions.events.queue.directory" in line and str(not_a_directory) in line, line
