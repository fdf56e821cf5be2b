"""Events end to end: a real registry on Hypercorn delivering to a real HTTP sink."""

from __future__ import annotations

from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat

from registry_trio.client import make_image
from tests.conftest import events_config, start_registry


def http_sink(sink, **extra):
    return {
        "type": "http",
        "address": sink.url,
        "timeout": "2s",
        "retry": {"initialBackoff": "10ms", "maxBackoff": "50ms"},
        **extra,
    }


async def test_push_produces_enriched_cloudevents(nursery, tmp_path, sink):
    import httpx

    registry = await start_registry(nursery, events_config(tmp_path, http_sink(sink)))
    image = make_image((4096,))
    async with httpx.AsyncClient(
        base_url=registry.url, headers={"User-Agent": "tester/1.0"}
    ) as http:
        from registry_trio.client import RegistryClient

        response = await RegistryClient(registry.url, client=http).push_image(
            "team/app", "v1", image
        )
    events = await sink.wait_for(lambda evs: any(e["type"].endswith("image.updated") for e in evs))
    types = [e["type"] for e in events]
    assert types == [
        "zotregistry.blob.pushed",
        "zotregistry.blob.pushed",
        "zotregistry.repository.created",
        "zotregistry.image.updated",
    ]
    # Parse back with the cloudevents package, as a consumer would.
    last = sink.received[-1]
    parsed = ce_http.from_http(
        ce_http.HTTPMessage(headers=last.headers, body=last.body), JSONFormat()
    )
    data = parsed.get_data()
    assert parsed.get_type() == "zotregistry.image.updated"
    assert data["name"] == "team/app" and data["reference"] == "v1"
    assert data["digest"] == image.digest
    assert data["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert data["manifest"] == image.manifest.decode()
    request = data["request"]
    assert request["id"] == response.headers["X-Request-Id"]
    assert request["method"] == "PUT"
    assert request["useragent"] == "tester/1.0"
    assert request["host"] == registry.url.split("://")[1]
    assert request["addr"].startswith("127.0.0.1:")
    assert "actor" not in data  # no authentication configured: no actor
    assert len({e["id"] for e in events}) == 4
