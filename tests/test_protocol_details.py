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


async def test_locations_are_absolute_urls_from_a_sane_host(nursery, tmp_path):
    registry = await start_registry(nursery, make_config(tmp_path))
    own = registry.url  # http://127.0.0.1:<port>: the fallback for a Host not believed
    data = random_blob(100)
    digest = digest_of(data)
    async with httpx.AsyncClient(base_url=registry.url) as http:
        for host, origin in [
            ("registry.example:5000", "http://registry.example:5000"),
            ("[::1]:8443", "http://[::1]:8443"),
            ("my_registry", "http://my_registry"),
            ("evil.example/@x", own),
            ("user@evil.example", own),
            ("evil.example:99999", own),
            ("evil.example?", own),
            ("[not-v6]", own),
            ("a..b", own),
        ]:
            headers = {"Host": host}
            started = await http.post("/v2/loc/app/blobs/uploads/", headers=headers)
            location = started.headers["Location"]
            assert location.startswith(f"{origin}/v2/loc/app/blobs/uploads/"), (host, location)
            path = httpx.URL(location).raw_path.decode()
            patched = await http.patch(path, content=data, headers=headers)
            assert patched.headers["Location"] == location
            status = await http.get(path, headers=headers)
            assert status.headers["Location"] == location
            done = await http.put(path, params={"digest": digest}, headers=headers)
            assert done.status_code == 201
            assert done.headers["Location"] == f"{origin}/v2/loc/app/blobs/{digest}"
        # An untrusted peer's forwarded host and scheme are not believed.
        forged = {
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "https",
            "Forwarded": "host=evil.example;proto=https",
        }
        started = await http.post("/v2/loc/app/blobs/uploads/", headers=forged)
        assert started.headers["Location"].startswith(f"{own}/v2/")


async def test_a_trusted_proxy_sets_the_host_and_scheme_of_locations(nursery, tmp_path):
    config = make_config(tmp_path, http={"trustedProxies": ["127.0.0.1/32"]})
    registry = await start_registry(nursery, config)
    own = registry.url
    async with httpx.AsyncClient(base_url=registry.url) as http:
        for headers, origin in [
            (
                {"X-Forwarded-Host": "reg.example", "X-Forwarded-Proto": "https"},
                "https://reg.example",
            ),
            # The value the trusted proxy appended (the last) counts, not the client's.
            ({"X-Forwarded-Host": "evil.example, reg.example:8443"}, "http://reg.example:8443"),
            ({"Forwarded": 'for=192.0.2.1;host="fw.example";proto=https'}, "https://fw.example"),
            # Forwarded wins over X-Forwarded-*, as for the client address.
            (
                {"Forwarded": "host=fw.example", "X-Forwarded-Host": "xf.example"},
                "http://fw.example",
            ),
            # A forwarded value that is no sane host or scheme is not believed either.
            ({"X-Forwarded-Host": "evil.example/@x", "X-Forwarded-Proto": "javascript"}, own),
        ]:
            started = await http.post("/v2/proxied/blobs/uploads/", headers=headers)
            assert started.status_code == 202
            assert started.headers["Location"].startswith(f"{origin}/v2/proxied/"), headers
        body = random_blob(64)
        digest = digest_of(body)
        pushed = await http.post(
            "/v2/proxied/blobs/uploads/",
            params={"digest": digest},
            content=body,
            headers={"X-Forwarded-Host": "reg.example", "X-Forwarded-Proto": "https"},
        )
        assert pushed.headers["Location"] == f"https://reg.example/v2/proxied/blobs/{digest}"
        manifest = await http.put(
            "/v2/proxied/manifests/v1",
            content=(await push_image(http, "proxied", "v0")),
            headers={
                "Content-Type": "application/vnd.oci.image.manifest.v1+json",
                "Forwarded": "proto=https;host=fw.example",
            },
        )
        assert manifest.headers["Location"].startswith("https://fw.example/v2/proxied/manifests/")


def byteranges(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a ``multipart/byteranges`` body, checking its framing byte for byte."""
    media_type, _, boundary = response.headers["Content-Type"].partition("; boundary=")
    assert media_type == "multipart/byteranges" and boundary
    delimiter = b"--" + boundary.encode()
    body = response.content
    assert body.startswith(delimiter + b"\r\n")
    assert body.endswith(b"\r\n" + delimiter + b"--\r\n")
    inner = body[len(delimiter) + 2 : -(len(delimiter) + 6)]
    parts = []
    for part in inner.split(b"\r\n" + delimiter + b"\r\n"):
        head, _, data = part.partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        parts.append((fields, data))
    return parts


async def test_several_ranges_are_served_as_multipart_byteranges(http):
    data = random_blob(3 << 20)  # parts cross the server's 1 MiB read batches
    digest = await push_blob(http, "ranges/multi", data)
    url = f"/v2/ranges/multi/blobs/{digest}"
    # What podman's zstd:chunked partial pull sends: several ranges in one request.
    asked = [(0, 99), (1000, 1999), (1 << 20, (2 << 20) + 10), (len(data) - 50, len(data) - 1)]
    spec = "bytes=" + ", ".join(f"{a}-{b}" for a, b in asked[:-1]) + ",-50"
    response = await http.get(url, headers={"Range": spec})
    assert response.status_code == 206
    assert "Content-Range" not in response.headers
    assert response.headers["Content-Length"] == str(len(response.content))
    parts = byteranges(response)
    assert [p[0]["Content-Range"] for p in parts] == [
        f"bytes {a}-{b}/{len(data)}" for a, b in asked
    ]
    assert all(p[0]["Content-Type"] == "application/octet-stream" for p in parts)
    assert [p[1] for p in parts] == [data[a : b + 1] for a, b in asked]
    head = await http.head(url, headers={"Range": spec})
    assert head.status_code == 206
    assert head.headers["Content-Type"].startswith("multipart/byteranges; boundary=")
    assert head.headers["Content-Length"] == response.headers["Content-Length"]
    assert head.content == b""


@pytest.mark.parametrize(
    ("spec", "status", "content_range"),
    [
        ("bytes=0-9, 500-600", 206, "bytes 0-9/100"),  # a range past the end is dropped
        ("bytes=0-9,,20-29,", 206, None),  # empty list elements are allowed (RFC 9110 5.6.1)
        ("bytes=0-59,40-99", 200, None),  # more than the blob in all: served whole
        ("bytes=100-,200-300", 416, "bytes */100"),  # nothing satisfiable
        ("bytes=0-9,x", 416, "bytes */100"),  # a part that is no range
        ("bytes=0-9,9-3", 416, "bytes */100"),
        ("bytes=" + ",".join(f"{i}-{i}" for i in range(65)), 416, "bytes */100"),  # too many
        # Positions of thousands of digits (Python refuses to convert them): past any end.
        ("bytes=90-" + "9" * 5000, 206, "bytes 90-99/100"),
        ("bytes=-" + "9" * 5000, 206, "bytes 0-99/100"),
        ("bytes=" + "9" * 5000 + "-", 416, "bytes */100"),
    ],
)
async def test_range_lists_follow_the_documented_rules(http, spec, status, content_range):
    data = random_blob(100)
    digest = await push_blob(http, "ranges/rules", data)
    response = await http.get(f"/v2/ranges/rules/blobs/{digest}", headers={"Range": spec})
    assert response.status_code == status, response.text
    assert response.headers.get("Content-Range") == content_range
    if status == 416:
        message = response.json()["errors"][0]["message"]
        assert "cannot be satisfied for a blob of 100 bytes" in message
    elif status == 200:
        assert response.content == data
    elif content_range is None:
        assert [p[1] for p in byteranges(response)] == [data[0:10], data[20:30]]
