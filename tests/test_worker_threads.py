"""The threads that do blocking work for the event loop run under SCHED_BATCH (Linux).

Why it matters is in registry_trio/threads.py: on a busy core, a worker woken under the
default policy preempted the loop only to wait for the GIL the loop held. Read here from the
kernel, on a registry serving in this process, after a push with events on.
"""

from __future__ import annotations

import os
import threading

import httpx
import pytest

from bench.registry_client import RegistryClient, make_image
from tests.conftest import events_config, start_registry

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux only")


def policies() -> dict[str, list[int]]:
    """The scheduling policy of each live thread of this process, by thread name."""
    out: dict[str, list[int]] = {}
    for thread in threading.enumerate():
        if thread.native_id is not None:
            with_policy = os.sched_getscheduler(thread.native_id)
            out.setdefault(thread.name, []).append(with_policy)
    return out


async def test_storage_and_outbox_threads_yield_the_cpu_to_the_loop(nursery, tmp_path):
    registry = await start_registry(nursery, events_config(tmp_path))
    async with httpx.AsyncClient(base_url=registry.url) as http:
        await RegistryClient(registry.url, client=http).push_image(
            "threads/app", "v1", make_image((1024,))
        )
    threads = policies()
    assert threads["outbox-writer"] == [os.SCHED_BATCH]
    workers = [
        p for name, found in threads.items() if name.startswith("Trio thread") for p in found
    ]
    assert os.SCHED_BATCH in workers, threads  # the ones that ran the push's storage calls
    # The loop keeps the default policy: it is the one that must not wait.
    assert os.sched_getscheduler(threading.main_thread().native_id or 0) == os.SCHED_OTHER
