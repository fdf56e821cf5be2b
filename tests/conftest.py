"""Shared fixtures: a real registry on Hypercorn (ephemeral port, temp dir) and clients."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from registry_trio.client import RegistryClient
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
