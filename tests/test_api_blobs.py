"""The API root, blobs and upload sessions, against a real server on a temp directory."""

from __future__ import annotations

import httpx
import pytest

from tests.api_helpers import (
    absolute,
    assert_oci_error,
    digest_of,
    push_blob,
    random_blob,
    snapshot,
)

# -- the API root and the headers every response carries -------------------------------------


async def test_api_root_answers_with_the_api_version(http):
    response = await http.get("/v2/")
    assert response.status_code == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert response.headers["X-Request-Id"]
    head = await http.head("/v2/")
    assert head.status_code == 200
    assert head.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_every_response_carries_a_unique_request_id(http):
    data = random_blob()
    digest = digest_of(data)
    responses = [
        await http.get("/v2/"),  # Quart, success
        await http.get("/v2/repo/tags/list"),  # Quart, error
        await http.post("/v2/repo/blobs/uploads/", params={"digest": digest}, content=data),
        await http.head(f"/v2/repo/blobs/{digest}"),  # raw route, success
        await http.get(f"/v2/repo/blobs/{digest_of(b'absent')}"),  # raw route, error
        await http.get("/v2/Bad/blobs/uploads/x"),  # rejected by the dispatcher
        await http.get("/v2/"),
    ]
    assert [r.status_code for r in responses] == [200, 404, 201, 200, 404, 400, 200]
    ids = [r.headers["X-Request-Id"] for r in responses]
    assert all(len(i) >= 16 for i in ids)
    assert len(set(ids)) == len(ids)
    assert all(r.headers["Docker-Distribution-API-Version"] == "registry/2.0" for r in responses)


# -- pulling blobs ---------------------------------------------------------------------------


async def test_head_and_get_blob(http):
    data = random_blob(1000)
    digest = await push_blob(http, "library/busybox", data)

    head = await http.head(f"/v2/library/busybox/blobs/{digest}")
    assert head.status_code == 200
    assert head.headers["Content-Length"] == "1000"
    assert head.headers["Docker-Content-Digest"] == digest
    assert head.content == b""

    get = await http.get(f"/v2/library/busybox/blobs/{digest}")
    assert get.status_code == 200
    assert get.content == data
    assert get.headers["Content-Length"] == "1000"
    assert get.headers["Docker-Content-Digest"] == digest


async def test_blob_is_visible_only_in_the_repository_that_holds_it(http):
    digest = await push_blob(http, "holder", random_blob())
    assert (await http.head(f"/v2/holder/blobs/{digest}")).status_code == 200
    assert_oci_error(await http.get(f"/v2/stranger/blobs/{digest}"), 404, "BLOB_UNKNOWN")


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [
        ("bytes=0-9", 0, 9),
        ("bytes=10-19", 10, 19),
        ("bytes=-16", 84, 99),  # suffix: the last 16 bytes
        ("bytes=90-", 90, 99),  # open: from 90 to the end
        ("bytes=95-500", 95, 99),  # an end past the blob is clamped
        ("bytes=-500", 0, 99),  # a suffix longer than the blob is all of it
    ],
)
async def test_range_requests(http, range_header, start, end):
    data = random_blob(100)
    digest = await push_blob(http, "ranges", data)
    response = await http.get(f"/v2/ranges/blobs/{digest}", headers={"Range": range_header})
    assert response.status_code == 206
    assert response.headers["Content-Range"] == f"bytes {start}-{end}/100"
    assert response.headers["Content-Length"] == str(end - start + 1)
    assert response.content == data[start : end + 1]

    head = await http.head(f"/v2/ranges/blobs/{digest}", headers={"Range": range_header})
    assert head.status_code == 206
    assert head.headers["Content-Range"] == f"bytes {start}-{end}/100"
    assert head.headers["Content-Length"] == str(end - start + 1)


@pytest.mark.parametrize("range_header", ["bytes=100-", "bytes=150-200", "bytes=-0", "bytes=9-3"])
async def test_unsatisfiable_range_is_416_with_the_size(http, range_header):
    digest = await push_blob(http, "ranges", random_blob(100))
    response = await http.get(f"/v2/ranges/blobs/{digest}", headers={"Range": range_header})
    assert response.status_code == 416
    assert response.headers["Content-Range"] == "bytes */100"
    assert response.json()["errors"][0]["code"]


@pytest.mark.parametrize(
    "range_header",
    [
        "items=0-9",  # RFC 9110 14.2: a unit the server does not understand MUST be ignored
        "bytes=0-59,40-99",  # ranges asking for more than the blob: served whole, as Go does
    ],
)
async def test_range_the_server_does_not_serve_is_ignored(http, range_header):
    data = random_blob(100)
    digest = await push_blob(http, "ranges", data)
    response = await http.get(f"/v2/ranges/blobs/{digest}", headers={"Range": range_header})
    assert response.status_code == 200
    assert response.content == data
    assert "Content-Range" not in response.headers


async def test_delete_blob(http, registry):
    data = random_blob()
    digest = await push_blob(http, "deleting", data)
    other = await push_blob(http, "keeping", data)
    assert other == digest

    response = await http.delete(f"/v2/deleting/blobs/{digest}")
    assert response.status_code == 202
    assert (await http.head(f"/v2/deleting/blobs/{digest}")).status_code == 404
    assert_oci_error(await http.get(f"/v2/deleting/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    assert_oci_error(await http.delete(f"/v2/deleting/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    # The other repository's link to the same content is untouched.
    assert (await http.get(f"/v2/keeping/blobs/{digest}")).content == data


# -- sha512 ----------------------------------------------------------------------------------


async def test_sha512_monolithic_upload(http):
    data = random_blob(3000)
    digest = await push_blob(http, "sha", data, algorithm="sha512")
    assert digest.startswith("sha512:") and len(digest) == 7 + 128
    response = await http.get(f"/v2/sha/blobs/{digest}")
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["Docker-Content-Digest"] == digest
    # The sha256 of the same bytes is a different name, not stored.
    assert (await http.head(f"/v2/sha/blobs/{digest_of(data)}")).status_code == 404


async def test_sha512_chunked_upload(http):
    data = random_blob(5000)
    digest = digest_of(data, "sha512")
    location = (await http.post("/v2/sha/blobs/uploads/")).headers["Location"]
    patch = await http.patch(location, content=data[:2000], headers={"Content-Range": "0-1999"})
    assert patch.status_code == 202
    put = await http.put(
        patch.headers["Location"],
        params={"digest": digest},
        content=data[2000:],
        headers={"Content-Range": f"2000-{len(data) - 1}"},
    )
    assert put.status_code == 201, put.text
    assert put.headers["Docker-Content-Digest"] == digest
    assert put.headers["Location"] == absolute(http, f"/v2/sha/blobs/{digest}")
    response = await http.get(f"/v2/sha/blobs/{digest}")
    assert response.content == data


async def test_sha512_mismatch_is_refused(http, registry):
    data = random_blob()
    wrong = digest_of(data + b"x", "sha512")
    response = await http.post("/v2/sha/blobs/uploads/", params={"digest": wrong}, content=data)
    assert_oci_error(response, 400, "DIGEST_INVALID")
    assert snapshot(registry.root / "blobs") == {}


# -- upload sessions -------------------------------------------------------------------------


async def start_session(http: httpx.AsyncClient, name: str) -> str:
    response = await http.post(f"/v2/{name}/blobs/uploads/")
    assert response.status_code == 202, response.text
    return response.headers["Location"]


async def test_post_opens_an_upload_session(http, registry):
    response = await http.post("/v2/library/app/blobs/uploads/")
    assert response.status_code == 202
    location = response.headers["Location"]
    upload_id = response.headers["Docker-Upload-UUID"]
    assert location == absolute(http, f"/v2/library/app/blobs/uploads/{upload_id}")
    assert response.headers["Range"] == "0-0"
    assert response.headers["Content-Length"] == "0"
    # One file per session, empty until the first chunk.
    assert (registry.root / "uploads" / upload_id).read_bytes() == b""

    status = await http.get(location)
    assert status.status_code == 204
    assert status.headers["Range"] == "0-0"
    assert status.headers["Location"] == location
    assert status.headers["Docker-Upload-UUID"] == upload_id


async def test_monolithic_post_with_digest(http):
    data = random_blob(2048)
    digest = digest_of(data)
    response = await http.post("/v2/mono/blobs/uploads/", params={"digest": digest}, content=data)
    assert response.status_code == 201
    assert response.headers["Location"] == absolute(http, f"/v2/mono/blobs/{digest}")
    assert response.headers["Docker-Content-Digest"] == digest
    assert (await http.get(f"/v2/mono/blobs/{digest}")).content == data


async def test_monolithic_put_after_post(http):
    data = random_blob(2048)
    digest = digest_of(data)
    location = await start_session(http, "mono")
    response = await http.put(location, params={"digest": digest}, content=data)
    assert response.status_code == 201
    assert response.headers["Docker-Content-Digest"] == digest
    assert (await http.get(f"/v2/mono/blobs/{digest}")).content == data
    # The session is finished: it is gone.
    assert_oci_error(await http.get(location), 404, "BLOB_UPLOAD_UNKNOWN")


async def test_cross_repository_mount(http):
    data = random_blob()
    digest = await push_blob(http, "source/repo", data)
    response = await http.post(
        "/v2/target/repo/blobs/uploads/", params={"mount": digest, "from": "source/repo"}
    )
    assert response.status_code == 201
    assert response.headers["Location"] == absolute(http, f"/v2/target/repo/blobs/{digest}")
    assert response.headers["Docker-Content-Digest"] == digest
    assert (await http.get(f"/v2/target/repo/blobs/{digest}")).content == data


async def test_mount_of_an_absent_blob_falls_back_to_a_session(http):
    data = random_blob()
    digest = digest_of(data)
    response = await http.post(
        "/v2/target/blobs/uploads/", params={"mount": digest, "from": "source"}
    )
    assert response.status_code == 202
    assert response.headers["Range"] == "0-0"
    location = response.headers["Location"]
    assert location.startswith(absolute(http, "/v2/target/blobs/uploads/"))
    assert (await http.head(f"/v2/target/blobs/{digest}")).status_code == 404
    # The session it opened is a real one.
    put = await http.put(location, params={"digest": digest}, content=data)
    assert put.status_code == 201
    assert (await http.get(f"/v2/target/blobs/{digest}")).content == data


async def test_mount_from_a_repository_without_the_blob_falls_back(http):
    # The blob exists in the registry, but not in the repository named as the source.
    digest = await push_blob(http, "elsewhere", random_blob())
    response = await http.post(
        "/v2/target/blobs/uploads/", params={"mount": digest, "from": "empty-source"}
    )
    assert response.status_code == 202
    assert "Docker-Upload-UUID" in response.headers
    assert (await http.head(f"/v2/target/blobs/{digest}")).status_code == 404


async def test_automatic_mount_without_from(http):
    data = random_blob()
    digest = await push_blob(http, "somewhere", data)
    response = await http.post("/v2/auto/blobs/uploads/", params={"mount": digest})
    assert response.status_code == 201
    assert response.headers["Docker-Content-Digest"] == digest
    assert (await http.get(f"/v2/auto/blobs/{digest}")).content == data

    absent = digest_of(b"never pushed")
    response = await http.post("/v2/auto/blobs/uploads/", params={"mount": absent})
    assert response.status_code == 202


async def test_chunked_upload(http, registry):
    data = random_blob(10_000)
    digest = digest_of(data)
    location = await start_session(http, "chunked")

    first = await http.patch(location, content=data[:4000], headers={"Content-Range": "0-3999"})
    assert first.status_code == 202
    assert first.headers["Range"] == "0-3999"
    assert first.headers["Location"] == location
    assert first.headers["Content-Length"] == "0"

    second = await http.patch(
        location, content=data[4000:7000], headers={"Content-Range": "4000-6999"}
    )
    assert second.status_code == 202
    assert second.headers["Range"] == "0-6999"

    # A chunk without Content-Range (a streamed PATCH) appends too.
    third = await http.patch(location, content=data[7000:9000])
    assert third.status_code == 202
    assert third.headers["Range"] == "0-8999"

    # The closing PUT carries the last chunk.
    put = await http.put(
        location,
        params={"digest": digest},
        content=data[9000:],
        headers={"Content-Range": "9000-9999"},
    )
    assert put.status_code == 201
    assert put.headers["Location"] == absolute(http, f"/v2/chunked/blobs/{digest}")
    assert put.headers["Docker-Content-Digest"] == digest
    assert (await http.get(f"/v2/chunked/blobs/{digest}")).content == data
    # The session's directory is gone once it became a blob.
    assert snapshot(registry.root / "uploads") == {}


async def test_put_closes_without_a_last_chunk(http):
    data = random_blob(1000)
    digest = digest_of(data)
    location = await start_session(http, "closing")
    assert (await http.patch(location, content=data)).status_code == 202
    put = await http.put(location, params={"digest": digest})
    assert put.status_code == 201
    assert (await http.get(f"/v2/closing/blobs/{digest}")).content == data


@pytest.mark.parametrize(
    "content_range",
    [
        "200-299",  # skips bytes 100-199
        "50-149",  # overlaps what the session holds
        "0-99",  # resends the first chunk
        "99-198",  # off by one
    ],
)
async def test_out_of_order_or_overlapping_chunk_is_416(http, registry, content_range):
    data = random_blob(300)
    location = await start_session(http, "ordered")
    upload_id = location.rsplit("/", 1)[1]
    assert (
        await http.patch(location, content=data[:100], headers={"Content-Range": "0-99"})
    ).status_code == 202
    before = (registry.root / "uploads" / upload_id).read_bytes()

    response = await http.patch(
        location, content=data[:100], headers={"Content-Range": content_range}
    )
    assert_oci_error(response, 416, "BLOB_UPLOAD_INVALID")
    assert response.headers["Range"] == "0-99"
    assert response.headers["Location"] == location
    assert (registry.root / "uploads" / upload_id).read_bytes() == before

    # The session is intact: the right next chunk is accepted.
    ok = await http.patch(location, content=data[100:], headers={"Content-Range": "100-299"})
    assert ok.status_code == 202
    assert ok.headers["Range"] == "0-299"
    put = await http.put(location, params={"digest": digest_of(data)})
    assert put.status_code == 201
    assert (await http.get(f"/v2/ordered/blobs/{digest_of(data)}")).content == data


async def test_chunk_shorter_than_its_content_range_is_rolled_back(http, registry):
    data = random_blob(200)
    location = await start_session(http, "short")
    assert (
        await http.patch(location, content=data[:100], headers={"Content-Range": "0-99"})
    ).status_code == 202
    response = await http.patch(
        location, content=data[100:150], headers={"Content-Range": "100-199"}
    )
    assert_oci_error(response, 400, "SIZE_INVALID")
    status = await http.get(location)
    assert status.headers["Range"] == "0-99"
    ok = await http.patch(location, content=data[100:], headers={"Content-Range": "100-199"})
    assert ok.headers["Range"] == "0-199"
    assert (await http.put(location, params={"digest": digest_of(data)})).status_code == 201


async def test_upload_status_follows_every_chunk(http):
    data = random_blob(3000)
    location = await start_session(http, "status")
    assert (await http.get(location)).headers["Range"] == "0-0"

    for end in (999, 1999, 2999):
        start = end - 999
        patch = await http.patch(
            location, content=data[start : end + 1], headers={"Content-Range": f"{start}-{end}"}
        )
        assert patch.status_code == 202
        # Status after the chunk is the new offset, not a stale one from before it.
        status = await http.get(location)
        assert status.status_code == 204
        assert status.headers["Range"] == f"0-{end}"
        assert status.headers["Location"] == location
        assert status.headers["Content-Length"] == "0"

    # After a refused chunk the status still reports what the session holds.
    refused = await http.patch(location, content=b"zz", headers={"Content-Range": "5000-5001"})
    assert refused.status_code == 416
    assert (await http.get(location)).headers["Range"] == "0-2999"


async def test_cancel_upload(http, registry):
    location = await start_session(http, "cancel")
    upload_id = location.rsplit("/", 1)[1]
    assert (await http.patch(location, content=b"partial")).status_code == 202

    response = await http.delete(location)
    assert response.status_code == 204
    assert not (registry.root / "uploads" / upload_id).exists()
    assert_oci_error(await http.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_oci_error(await http.patch(location, content=b"more"), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_oci_error(await http.delete(location), 404, "BLOB_UPLOAD_UNKNOWN")
    response = await http.put(location, params={"digest": digest_of(b"partial")})
    assert_oci_error(response, 404, "BLOB_UPLOAD_UNKNOWN")
    assert snapshot(registry.root / "blobs") == {}


async def test_session_belongs_to_its_repository(http):
    location = await start_session(http, "owner")
    upload_id = location.rsplit("/", 1)[1]
    foreign = f"/v2/intruder/blobs/uploads/{upload_id}"
    assert_oci_error(await http.get(foreign), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_oci_error(await http.patch(foreign, content=b"x"), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_oci_error(await http.delete(foreign), 404, "BLOB_UPLOAD_UNKNOWN")
    assert (await http.get(location)).headers["Range"] == "0-0"


async def test_digest_mismatch_on_put_stores_nothing(http, registry):
    data = random_blob(500)
    claimed = digest_of(b"something else")
    location = await start_session(http, "mismatch")
    assert (await http.patch(location, content=data)).status_code == 202

    response = await http.put(location, params={"digest": claimed})
    assert_oci_error(response, 400, "DIGEST_INVALID")
    assert (await http.head(f"/v2/mismatch/blobs/{claimed}")).status_code == 404
    assert (await http.head(f"/v2/mismatch/blobs/{digest_of(data)}")).status_code == 404
    assert snapshot(registry.root / "blobs") == {}
    assert snapshot(registry.root / "repositories") == {}
    # The bytes can never become the claimed blob, so the session is discarded.
    assert_oci_error(await http.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert snapshot(registry.root / "uploads") == {}


async def test_put_without_digest_is_refused_and_keeps_the_session(http, registry):
    data = random_blob(500)
    location = await start_session(http, "nodigest")
    assert (await http.patch(location, content=data)).status_code == 202

    response = await http.put(location)
    assert_oci_error(response, 400, "DIGEST_INVALID")
    assert snapshot(registry.root / "blobs") == {}
    assert (await http.get(location)).headers["Range"] == "0-499"
    # The client can still finish properly.
    assert (await http.put(location, params={"digest": digest_of(data)})).status_code == 201


async def test_empty_blob(http):
    digest = digest_of(b"")
    response = await http.post("/v2/empty/blobs/uploads/", params={"digest": digest}, content=b"")
    assert response.status_code == 201
    head = await http.head(f"/v2/empty/blobs/{digest}")
    assert head.headers["Content-Length"] == "0"
    get = await http.get(f"/v2/empty/blobs/{digest}")
    assert get.status_code == 200
    assert get.content == b""


async def test_large_blob_streams_in_both_directions(http):
    # Several IO_CHUNK batches each way, in chunks the client streams.
    data = random_blob(3 * (1 << 20) + 12345)
    digest = digest_of(data)

    async def chunks():
        for i in range(0, len(data), 256 * 1024):
            yield data[i : i + 256 * 1024]

    location = await start_session(http, "large")
    response = await http.put(location, params={"digest": digest}, content=chunks())
    assert response.status_code == 201
    got = await http.get(f"/v2/large/blobs/{digest}")
    assert got.headers["Content-Length"] == str(len(data))
    assert digest_of(got.content) == digest
