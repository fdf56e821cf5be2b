"""Protocol details real clients notice (issue #15), each against a real registry."""

from __future__ import annotations

import httpx

from bench.registry_client import RegistryClient, make_image
from tests.conftest import events_config, start_registry


async def test_distribution_event_of_an_anonymous_push_has_an_empty_actor(nursery, tmp_path, sink):
    sink_config = {"type": "http", "address": sink.url, "format": "distribution"}
    registry = await start_registry(nursery, events_config(tmp_path, sink_config))
    async with httpx.AsyncClient(base_url=registry.url) as http:
        await RegistryClient(registry.url, client=http).push_image(
            "anon/app", "v1", make_image((64,))
        )
    events = await sink.wait_for(lambda evs: len(evs) == 3)
    # distribution sends "actor": {} for anonymous requests; its consumers read it blindly.
    assert [e["actor"] for e in events] == [{}, {}, {}]
