"""Shared fixtures: a real registry on Hypercorn (ephemeral port, temp dir) and clients."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from bench.registry_client import RegistryClient
from registry_trio.config import Config, parse_config
from registry_trio.server import serve


@dataclasses.dataclass
class RunningRegistry:
    url: str
    config: Config
    root: Path
    shutdown: trio.Event


def make_config(tmp_path: Path, **overrides: object) -> Config:
    """A config on 127.0.0.1:0 with storage under ``tmp_path``; overrides are JSON keys."""
    data: dict[str, object] = {
        "storage": {"rootDirectory": str(tmp_path / "registry_data")},
        "http": {"address": "127.0.0.1", "port": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}  # type: ignore[dict-item]
        else:
            data[key] = value
    return parse_config(data)


async def start_registry(nursery: trio.Nursery, config: Config) -> RunningRegistry:
    shutdown = trio.Event()
    url = await nursery.start(functools.partial(serve, config, shutdown=shutdown))
    return RunningRegistry(url, config, Path(config.storage.root_directory), shutdown)


@pytest.fixture
async def registry(nursery: trio.Nursery, tmp_path: Path) -> RunningRegistry:
    return await start_registry(nursery, make_config(tmp_path))


@pytest.fixture
async def http(registry: RunningRegistry) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=registry.url, timeout=30) as client:
        yield client


@pytest.fixture
async def client(http: httpx.AsyncClient, registry: RunningRegistry) -> RegistryClient:
    return RegistryClient(registry.url, client=http)


def events_config(tmp_path: Path, *sinks: dict[str, object], **events: object) -> Config:
    """A registry config with the events extension on, its queue under ``tmp_path``."""
    return make_config(
        tmp_path,
        extensions={
            "events": {
                "enable": True,
                "queue": {"directory": str(tmp_path / "queue_data")},
                "sinks": list(sinks),
                **events,
            }
        },
    )


@pytest.fixture
async def sink(nursery: trio.Nursery) -> AsyncIterator[object]:
    from tests.sink import HTTPSinkServer

    server = HTTPSinkServer()
    await server.start(nursery)
    yield server


QUEUE_TYPES = ("sqlite", "jetstream")


@pytest.fixture(params=QUEUE_TYPES)
async def queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict[str, object]]:
    """``extensions.events.queue`` for each implementation: the guarantees hold for both.

    JetStream runs on a real nats-server (file storage, fsync always); ``ackWait`` is short
    so that a killed instance's run is handed out within the test's deadlines.
    """
    directory = str(tmp_path / "queue_data")
    if request.param == "sqlite":
        yield {"directory": directory}
        return
    from tests.nats_server import nats_server

    async with nats_server(tmp_path / "nats") as server:
        yield {"type": "jetstream", "address": server.url, "directory": directory, "ackWait": "2s"}


async def counts_until(config: Config, sink_name: str, predicate, within: float = 20):
    """The sink's counts, read through the configured queue, once ``predicate`` holds."""
    from registry_trio.events.queue import running_queue
    from tests.waiting import eventually

    async with running_queue(config.extensions.events) as queue:
        return await eventually(lambda: queue.counts(sink_name), predicate, within)
