"""What start-up says: one summary line when it serves, one line and a non-zero exit when not.

Real ``registry-trio serve`` processes, one process and several workers alike.
"""

from __future__ import annotations

import importlib.metadata
import re
import socket
from pathlib import Path

import pytest

from tests.procs import server_process, write_config
from tests.test_instance_lock import registry_trio

WORKERS = pytest.mark.parametrize("workers", [1, 2])


async def assert_one_line_failure(config: Path, *expected: str) -> str:
    result = await registry_trio("serve", "-c", str(config))
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@WORKERS
async def test_an_address_in_use_is_one_line_naming_the_keys(tmp_path, workers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, http={"port": port, "workers": workers})
        await assert_one_line_failure(
            config, f"cannot listen on 127.0.0.1:{port}", "http.address, http.port", "in use"
        )


@WORKERS
async def test_an_unusable_storage_root_is_one_line_naming_the_key(tmp_path, workers):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = write_config(
        tmp_path,
        http={"workers": workers},
        storage={"rootDirectory": str(blocker / "registry_data")},
    )
    await assert_one_line_failure(config, "storage.rootDirectory", str(blocker))


async def test_a_queue_that_cannot_open_in_a_worker_is_one_line(tmp_path):
    queue = tmp_path / "queue_data"
    queue.mkdir()
    (queue / "events.db").write_bytes(b"this is not an SQLite database" * 100)
    config = write_config(
        tmp_path,
        http={"workers": 2},
        extensions={"events": {"enable": True, "queue": {"directory": str(queue)}}},
    )
    await assert_one_line_failure(config, "events.db")


@WORKERS
async def test_start_up_says_what_serves_in_one_line(nursery, tmp_path, workers):
    config = write_config(
        tmp_path,
        http={"workers": workers},
        extensions={
            "events": {
                "enable": True,
                "queue": {"directory": str(tmp_path / "queue_data")},
                "sinks": [
                    {"type": "http", "name": "audit", "address": "http://u:secret@127.0.0.1:9/"}
                ],
            }
        },
    )
    async with server_process(config) as server:
        output = server.current_output
        (line,) = [line for line in output.splitlines() if "listening on" in line]
        processes = f"{workers} workers" if workers > 1 else "one process"
        version = importlib.metadata.version("registry-trio")
        assert re.search(
            rf"registry-trio {re.escape(version)} listening on {re.escape(server.url)} "
            rf"\({processes}; storage {re.escape(str(tmp_path / 'registry_data'))}; "
            rf"events on, queue {re.escape(str(tmp_path / 'queue_data'))}, sinks: audit; "
            r"no auth; no TLS\)",
            line,
        ), line
        # Hypercorn's own "Running on" line (from a logger named "hypercorn.error", once per
        # worker) is not repeated, and no password is shown.
        assert "Running on" not in output
        assert "secret" not in output
