"""Protocol details real clients notice (issue #15), each against a real registry."""

from __future__ import annotations

import httpx
import pytest

from bench.registry_client import RegistryClient, make_image
from tests.api_helpers import digest_of, push_blob, push_image, random_blob
from tests.conftest import events_config, make_config, start_registry

YEAR = "max-age=31536000"


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


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_blob_answers_304_to_its_etag_and_is_cacheable(http, method):
    data = random_blob(5000)
    digest = await push_blob(http, "cond/blob", data)
    url = f"/v2/cond/blob/blobs/{digest}"
    plain = await http.request(method, url)
    assert plain.status_code == 200
    assert plain.headers["ETag"] == f'"{digest}"'
    assert plain.headers["Cache-Control"] == YEAR
    for condition in (f'"{digest}"', f'W/"{digest}"', f'"sha256:{"0" * 64}", "{digest}"', "*"):
        response = await http.request(
            method, url, headers={"If-None-Match": condition, "Range": "bytes=0-9"}
        )
        assert response.status_code == 304, condition
        assert response.content == b""
        assert response.headers["ETag"] == f'"{digest}"'
        assert response.headers["Cache-Control"] == YEAR
    other = await http.request(method, url, headers={"If-None-Match": f'"{digest_of(b"x")}"'})
    assert other.status_code == 200
    assert other.content == (data if method == "GET" else b"")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_manifest_answers_304_and_only_by_digest_is_cacheable(http, method):
    body = await push_image(http, "cond/man", "v1")
    digest = digest_of(body)
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    by_digest = f"/v2/cond/man/manifests/{digest}"
    by_tag = "/v2/cond/man/manifests/v1"
    assert (await http.request(method, by_digest, headers=accept)).headers["Cache-Control"] == YEAR
    tagged = await http.request(method, by_tag, headers=accept)
    assert tagged.status_code == 200 and "Cache-Control" not in tagged.headers
    for url in (by_digest, by_tag):
        for condition in (f'"{digest}"', f'W/"{digest}"', "*"):
            response = await http.request(
                method, url, headers={**accept, "If-None-Match": condition}
            )
            assert response.status_code == 304, (url, condition)
            assert response.content == b""
            assert response.headers["ETag"] == f'"{digest}"'
    # The tag moved: the old ETag no longer matches, the new manifest comes whole.
    moved = await push_image(http, "cond/man", "v1")
    response = await http.request(
        method, by_tag, headers={**accept, "If-None-Match": f'"{digest}"'}
    )
    assert response.status_code == 200
    assert response.headers["ETag"] == f'"{digest_of(moved)}"'


async def test_upload_sessions_announce_the_configured_chunk_min_length(nursery, tmp_path):
    config = make_config(tmp_path, http={"chunkMinLength": 5 << 20})
    registry = await start_registry(nursery, config)
    async with httpx.AsyncClient(base_url=registry.url) as http:
        started = await http.post("/v2/chunks/app/blobs/uploads/")
        assert started.status_code == 202
        assert started.headers["OCI-Chunk-Min-Length"] == str(5 << 20)
        # Advice, not a rule: a smaller chunk is still taken, and its answer repeats it.
        patched = await http.patch(started.headers["Location"], content=b"small")
        assert patched.status_code == 202
        assert patched.headers["OCI-Chunk-Min-Length"] == str(5 << 20)
        finished = await http.put(
            patched.headers["Location"], params={"digest": digest_of(b"small")}
        )
        assert finished.status_code == 201
        assert "OCI-Chunk-Min-Length" not in finished.headers
