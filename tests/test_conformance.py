"""OCI Distribution Specification v1.1 MUSTs and SHOULDs the other API tests leave open.

Grouped as the spec groups its conformance workflows (pull, push, content discovery, content
management), each test names the section it checks. Everything runs against a real server on
a temp directory; what the other files already pin (roundtrips, upload sessions, the bad
input table) is not repeated here.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import bcrypt
import httpx

from tests.api_helpers import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    absolute,
    assert_oci_error,
    config_blob,
    digest_of,
    dumps,
    image_manifest,
    index_manifest,
    push_blob,
    push_image,
    push_manifest,
    random_blob,
    snapshot,
)
from tests.conftest import RunningRegistry, make_config, start_registry

API_VERSION = "registry/2.0"
EMPTY_JSON = b"{}"
EMPTY_JSON_TYPE = "application/vnd.oci.empty.v1+json"
NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
SBOM = "application/vnd.example.sbom.v1"


def local_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def one_connection(registry: RunningRegistry) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=registry.url,
        timeout=10,
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
    )


def _ref(data: bytes) -> dict[str, object]:
    return {"digest": digest_of(data), "size": len(data)}


def subject_of(body: bytes, media_type: str = OCI_MANIFEST) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest_of(body), "size": len(body)}


async def referrer_digests(http: httpx.AsyncClient, name: str, subject: bytes) -> list[str]:
    response = await http.get(f"/v2/{name}/referrers/{digest_of(subject)}")
    assert response.status_code == 200
    return [d["digest"] for d in response.json()["manifests"]]


# -- pull ------------------------------------------------------------------------------------


async def test_manifest_is_served_in_the_exact_bytes_pushed(http):
    """Pushing Manifests: "The registry MUST store the manifest in the exact byte
    representation provided by the client"; Pulling manifests: Content-Type, the digest of
    the returned bytes; HEAD: Content-Length of the stored manifest and no body.

    The body is one a JSON round trip would change: indented, keys out of order, a non-ASCII
    annotation left unescaped, a field the registry does not know, a descriptor ``data``
    field and a trailing newline.
    """
    name = "exact/bytes"
    config, layer = config_blob(), random_blob()
    await push_blob(http, name, config)
    await push_blob(http, name, layer)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **_ref(layer)}],
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **_ref(config),
            "data": base64.b64encode(config).decode(),
        },
        "annotations": {"org.example.note": "größe ✓ 日本"},
        "org.example.unknown": [1, 2.5, None],
    }
    body = (json.dumps(doc, indent=3, ensure_ascii=False) + "\n").encode()
    assert dumps(json.loads(body)) != body  # a re-serialising registry would be caught
    digest = digest_of(body)

    put = await http.put(
        f"/v2/{name}/manifests/v1", content=body, headers={"Content-Type": OCI_MANIFEST}
    )
    assert put.status_code == 201, put.text
    assert put.headers["Docker-Content-Digest"] == digest
    # The Location is a pullable manifest URL.
    pulled = await http.get(put.headers["Location"])
    assert pulled.content == body

    for reference in ("v1", digest):
        get = await http.get(f"/v2/{name}/manifests/{reference}")
        assert get.status_code == 200
        assert get.content == body
        assert get.headers["Content-Type"] == OCI_MANIFEST
        assert get.headers["Content-Length"] == str(len(body))
        assert get.headers["Docker-Content-Digest"] == digest

        head = await http.head(f"/v2/{name}/manifests/{reference}")
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["Content-Type"] == OCI_MANIFEST
        assert head.headers["Content-Length"] == str(len(body))
        assert head.headers["Docker-Content-Digest"] == digest


async def test_content_type_parameters_are_ignored_on_push_and_never_served(http):
    """Pushing Manifests: "The registry SHOULD ignore parameters on the Content-Type header";
    Pulling manifests: "The registry SHOULD NOT include parameters on the Content-Type
    header" and it "SHOULD match what the client pushed"."""
    config, layer = config_blob(), random_blob()
    await push_blob(http, "params", config)
    await push_blob(http, "params", layer)
    body = image_manifest(config, [layer], media_type=DOCKER_MANIFEST)
    put = await http.put(
        "/v2/params/manifests/t",
        content=body,
        headers={"Content-Type": f"{DOCKER_MANIFEST}; charset=utf-8"},
    )
    assert put.status_code == 201, put.text
    for method in ("GET", "HEAD"):
        response = await http.request(method, "/v2/params/manifests/t")
        assert response.status_code == 200
        assert response.headers["Content-Type"] == DOCKER_MANIFEST


async def test_body_without_media_type_is_served_as_the_content_type_it_was_pushed_with(http):
    """Pulling manifests: the Content-Type "SHOULD match what the client pushed as the
    manifest's Content-Type", also when the body itself has no ``mediaType`` field."""
    child = await push_image(http, "untyped")
    doc = json.loads(index_manifest([(OCI_MANIFEST, child)]))
    del doc["mediaType"]
    body = dumps(doc)
    await push_manifest(http, "untyped", "idx", body, OCI_INDEX)
    response = await http.get("/v2/untyped/manifests/idx")
    assert response.content == body
    assert response.headers["Content-Type"] == OCI_INDEX


async def test_every_accept_form_clients_send_gets_the_stored_manifest(http):
    """Pulling manifests: clients SHOULD send Accept, and registries answer with the stored
    manifest and its own Content-Type. The forms real clients use: none at all, ``*/*``, one
    header line per type (Go clients, the conformance suite) and a comma list with q-values
    (Docker)."""
    image = await push_image(http, "accept", "img")
    docker = await push_image(http, "accept", "dkr", media_type=DOCKER_MANIFEST)
    forms: list[list[tuple[str, str]]] = [
        [],
        [("Accept", "*/*")],
        [("Accept", OCI_INDEX), ("Accept", OCI_MANIFEST), ("Accept", DOCKER_MANIFEST)],
        [("Accept", f"{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.9, {OCI_INDEX};q=0.5")],
    ]
    for tag, body, media_type in (("img", image, OCI_MANIFEST), ("dkr", docker, DOCKER_MANIFEST)):
        for headers in forms:
            for method in ("GET", "HEAD"):
                response = await http.request(
                    method, f"/v2/accept/manifests/{tag}", headers=headers
                )
                assert response.status_code == 200, (tag, headers, method)
                assert response.headers["Content-Type"] == media_type
                assert response.headers["Docker-Content-Digest"] == digest_of(body)
                assert response.content == (body if method == "GET" else b"")


async def test_head_of_missing_content_is_404_without_a_body_and_keeps_the_connection(registry):
    """Checking if content exists: "If the blob or manifest is not found in the repository,
    the response code MUST be 404", and a HEAD response carries no body: were error bytes
    sent anyway, the next response on the keep-alive connection would be garbage."""
    async with one_connection(registry) as http:
        await push_image(http, "present", "v1")
        missing = digest_of(b"never pushed")
        targets = [
            "/v2/present/manifests/absent",
            f"/v2/present/manifests/{missing}",
            f"/v2/present/blobs/{missing}",
            "/v2/no/such/repo/manifests/v1",
            f"/v2/no/such/repo/blobs/{missing}",
            "/v2/no/such/repo/tags/list",  # an error from the Quart half
        ]
        first = await http.get("/v2/")
        for target in targets:
            head = await http.head(target)
            assert head.status_code == 404, target
            assert head.content == b""
            assert head.headers["Docker-Distribution-API-Version"] == API_VERSION
            assert head.headers["X-Request-Id"]
            assert local_port(head) == local_port(first)
            # The same connection still answers the next request correctly.
            after = await http.get("/v2/present/manifests/v1")
            assert after.status_code == 200
            assert json.loads(after.content)["schemaVersion"] == 2
            assert local_port(after) == local_port(first)


async def test_a_reference_that_is_no_valid_tag_is_an_unknown_manifest(http):
    """Pulling manifests: the suite's "HEAD request to nonexistent manifest should return 404"
    and "GET nonexistent manifest should return 404" (pull and push workflows) use the
    reference ``.INVALID_MANIFEST_NAME``; end-3 fails only with 404, so a tag no push could
    have created is unknown, not invalid. DELETE says the same (its 400 means "deletion is
    disabled"); only a PUT, which would create the tag, refuses it as invalid."""
    body = await push_image(http, "refs", "v1")
    for reference in (".INVALID_MANIFEST_NAME", "-dash", "a+b", "t" * 129):
        target = f"/v2/refs/manifests/{reference}"
        entry = assert_oci_error(await http.get(target), 404, "MANIFEST_UNKNOWN")
        assert repr(reference) in entry["detail"]
        head = await http.head(target)
        assert (head.status_code, head.content) == (404, b"")
        assert_oci_error(await http.delete(target), 404, "MANIFEST_UNKNOWN")
        put = await http.put(target, content=body, headers={"Content-Type": OCI_MANIFEST})
        assert_oci_error(put, 400, "MANIFEST_INVALID")
    # Also where the repository does not exist.
    missing = await http.get("/v2/no/such/repo/manifests/.INVALID_MANIFEST_NAME")
    assert_oci_error(missing, 404, "MANIFEST_UNKNOWN")
    assert (await http.get("/v2/refs/tags/list")).json()["tags"] == ["v1"]


async def test_api_version_header_on_401_and_200_of_the_version_check(nursery, tmp_path: Path):
    """API Version Check (Docker Registry HTTP API V2, kept by the OCI spec's end-1): "When a
    200 OK or 401 Unauthorized response is returned, the Docker-Distribution-API-Version
    header SHOULD be set to registry/2.0" — clients use it to recognise the API behind a
    login challenge."""
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"pw-for-version-check", bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"dana:{hashed}\n")
    config = make_config(tmp_path, http={"auth": {"htpasswd": {"path": str(htpasswd)}}})
    registry = await start_registry(nursery, config)
    async with httpx.AsyncClient(base_url=registry.url, timeout=10) as anonymous:
        challenged = await anonymous.get("/v2/")
        assert_oci_error(challenged, 401, "UNAUTHORIZED")
        assert challenged.headers["WWW-Authenticate"].startswith("Basic ")
        assert challenged.headers["Docker-Distribution-API-Version"] == API_VERSION
    async with httpx.AsyncClient(
        base_url=registry.url, timeout=10, auth=("dana", "pw-for-version-check")
    ) as known:
        ok = await known.get("/v2/")
        assert ok.status_code == 200
        assert ok.headers["Docker-Distribution-API-Version"] == API_VERSION


# -- push ------------------------------------------------------------------------------------


async def test_single_post_larger_than_one_buffer(http, registry):
    """Pushing a blob monolithically, single POST: 201 with a pullable Location; "the
    <digest> MUST match the blob's digest", else 400 DIGEST_INVALID. The body here is
    streamed (no Content-Length) and larger than the server buffers in one piece, so it takes
    the staged-file path rather than the in-memory one, and a mismatch must leave nothing."""
    data = random_blob(2 * (1 << 20) + 4321)

    async def chunks():
        for i in range(0, len(data), 300_000):
            yield data[i : i + 300_000]

    digest = digest_of(data)
    response = await http.post(
        "/v2/single/blobs/uploads/", params={"digest": digest}, content=chunks()
    )
    assert response.status_code == 201, response.text
    assert response.headers["Location"] == absolute(http, f"/v2/single/blobs/{digest}")
    assert response.headers["Docker-Content-Digest"] == digest
    pulled = await http.get(response.headers["Location"])
    assert pulled.headers["Content-Length"] == str(len(data))
    assert pulled.content == data

    before = snapshot(registry.root / "blobs")
    wrong = digest_of(data + b"!")
    response = await http.post(
        "/v2/single/blobs/uploads/", params={"digest": wrong}, content=chunks()
    )
    assert_oci_error(response, 400, "DIGEST_INVALID")
    assert snapshot(registry.root / "blobs") == before
    assert list((registry.root / "tmp").iterdir()) == []
    assert (await http.head(f"/v2/single/blobs/{wrong}")).status_code == 404


async def test_mount_of_a_sha512_blob(http):
    """Mounting a blob from another repository: 201 with a Location that pulls the blob, and
    Docker-Content-Digest naming it; the spec's digests are not only sha256."""
    data = random_blob(1500)
    digest = await push_blob(http, "origin", data, algorithm="sha512")
    response = await http.post(
        "/v2/copy/blobs/uploads/", params={"mount": digest, "from": "origin"}
    )
    assert response.status_code == 201, response.text
    assert response.headers["Location"] == absolute(http, f"/v2/copy/blobs/{digest}")
    assert response.headers["Docker-Content-Digest"] == digest
    pulled = await http.get(response.headers["Location"])
    assert pulled.content == data
    assert pulled.headers["Docker-Content-Digest"] == digest
    head = await http.head(f"/v2/copy/blobs/{digest}")
    assert head.headers["Content-Length"] == "1500"


async def test_uploading_a_blob_the_repository_already_holds(http, registry):
    """Layer upload de-duplication: a second upload of the same content (a client that did not
    check first) still ends 201 with the blob's Location; the content stays as it was and the
    session is closed."""
    data = random_blob(4000)
    digest = await push_blob(http, "dedup", data)
    before = snapshot(registry.root / "blobs")

    location = (await http.post("/v2/dedup/blobs/uploads/")).headers["Location"]
    patch = await http.patch(location, content=data[:2500], headers={"Content-Range": "0-2499"})
    assert patch.status_code == 202
    put = await http.put(
        patch.headers["Location"],
        params={"digest": digest},
        content=data[2500:],
        headers={"Content-Range": f"2500-{len(data) - 1}"},
    )
    assert put.status_code == 201, put.text
    assert put.headers["Location"] == absolute(http, f"/v2/dedup/blobs/{digest}")
    assert (await http.get(f"/v2/dedup/blobs/{digest}")).content == data
    assert snapshot(registry.root / "blobs") == before
    assert snapshot(registry.root / "uploads") == {}
    assert_oci_error(await http.get(location), 404, "BLOB_UPLOAD_UNKNOWN")


async def test_index_of_indexes(http):
    """Push: an index's descriptors may name other indexes (the conformance suite's "nested
    index"); each level is pushed first, and pulls back by tag and by digest."""
    children = [await push_image(http, "nested") for _ in range(2)]
    inner = index_manifest([(OCI_MANIFEST, c) for c in children])
    await push_manifest(http, "nested", digest_of(inner), inner, OCI_INDEX)
    outer = index_manifest([(OCI_INDEX, inner)])
    await push_manifest(http, "nested", "top", outer, OCI_INDEX)
    for reference in ("top", digest_of(outer)):
        response = await http.get(f"/v2/nested/manifests/{reference}")
        assert response.status_code == 200
        assert response.content == outer
        assert response.headers["Content-Type"] == OCI_INDEX
    # An index naming an index this repository does not hold is refused as the spec says.
    stranger = index_manifest([(OCI_MANIFEST, await push_image(http, "elsewhere"))])
    refused = await http.put(
        "/v2/nested/manifests/bad",
        content=index_manifest([(OCI_INDEX, stranger)]),
        headers={"Content-Type": OCI_INDEX},
    )
    entry = assert_oci_error(refused, 400, "MANIFEST_BLOB_UNKNOWN")
    assert entry["detail"] == {"digest": digest_of(stranger)}


async def test_non_distributable_layers_need_not_be_pushed(http):
    """Push: a registry "MAY reject" a manifest naming blobs it does not hold, but a layer
    with ``urls`` lives elsewhere by design (the conformance suite's non-distributable
    image): that manifest is accepted, while the same layer without ``urls`` is
    MANIFEST_BLOB_UNKNOWN."""
    config, layer = config_blob(), random_blob()
    await push_blob(http, "foreign", config)
    await push_blob(http, "foreign", layer)
    outside = random_blob()  # never pushed
    foreign = {
        "mediaType": NONDISTRIBUTABLE,
        **_ref(outside),
        "urls": [f"https://store.example.com/blobs/sha256/{digest_of(outside)[7:]}"],
    }
    doc = json.loads(image_manifest(config, [layer]))
    doc["layers"].insert(0, foreign)
    body = dumps(doc)
    await push_manifest(http, "foreign", "v1", body, OCI_MANIFEST)
    assert (await http.get("/v2/foreign/manifests/v1")).content == body
    assert (await http.head(f"/v2/foreign/blobs/{digest_of(outside)}")).status_code == 404

    del doc["layers"][0]["urls"]
    refused = await http.put(
        "/v2/foreign/manifests/v2", content=dumps(doc), headers={"Content-Type": OCI_MANIFEST}
    )
    entry = assert_oci_error(refused, 400, "MANIFEST_BLOB_UNKNOWN")
    assert entry["detail"] == {"digest": digest_of(outside)}


# -- content discovery -----------------------------------------------------------------------


async def test_n_zero_is_an_empty_list_without_link(http):
    """Listing Tags: "When n is zero, this endpoint MUST return an empty list, and MUST NOT
    include a Link header" (with or without ``last``); the catalog follows the same rule."""
    body = await push_image(http, "zero", "a")
    await push_manifest(http, "zero", "b", body, OCI_MANIFEST)
    for params in ({"n": "0"}, {"n": "0", "last": "a"}):
        response = await http.get("/v2/zero/tags/list", params=params)
        assert response.status_code == 200
        assert response.json() == {"name": "zero", "tags": []}
        assert "Link" not in response.headers
    catalog = await http.get("/v2/_catalog", params={"n": "0"})
    assert catalog.status_code == 200
    assert catalog.json() == {"repositories": []}
    assert "Link" not in catalog.headers


async def test_mixed_case_tags_page_in_one_order(http):
    """Listing Tags: tags are in one order ("ASCIIbetical", Go's sort.Strings, is allowed)
    and ``last`` begins non-inclusively after the tag named, so walking the Link headers over
    tags differing only in case yields each tag exactly once, in the order of the full list."""
    tags = ["b", "A", "a", "B", "_x", "0", "Z9", "z"]
    body = await push_image(http, "cases", tags[0])
    for tag in tags[1:]:
        await push_manifest(http, "cases", tag, body, OCI_MANIFEST)
    full = (await http.get("/v2/cases/tags/list")).json()["tags"]
    assert full == sorted(tags)

    seen: list[str] = []
    url = "/v2/cases/tags/list?n=3"
    for _ in range(10):
        response = await http.get(url)
        page = response.json()["tags"]
        assert len(page) == 3 or "Link" not in response.headers
        seen.extend(page)
        link = response.headers.get("Link")
        if link is None:
            break
        url = link.split(">", 1)[0].lstrip("<")
    assert seen == full


async def test_index_referrer_without_artifact_type_omits_it_and_keeps_annotations(http):
    """Listing Referrers: "If the artifactType is empty or missing in an index, the
    artifactType MUST be omitted" and "The descriptors MUST include annotations from the
    image manifest or index"."""
    subject = await push_image(http, "idxrefs", "v1")
    child = await push_image(http, "idxrefs")
    body = index_manifest(
        [(OCI_MANIFEST, child)],
        annotations={"org.example.kind": "bundle"},
        subject=subject_of(subject),
    )
    put = await push_manifest(http, "idxrefs", digest_of(body), body, OCI_INDEX)
    assert put.headers["OCI-Subject"] == digest_of(subject)
    listing = await http.get(f"/v2/idxrefs/referrers/{digest_of(subject)}")
    assert listing.json()["manifests"] == [
        {
            "mediaType": OCI_INDEX,
            "digest": digest_of(body),
            "size": len(body),
            "annotations": {"org.example.kind": "bundle"},
        }
    ]


async def test_a_referrer_pushed_twice_is_listed_once_until_deleted(http):
    """Listing Referrers: one descriptor per referring manifest, however many times and
    under whichever references it is pushed; removing a tag leaves the manifest (and so the
    entry); deleting the manifest by digest removes it."""
    subject = await push_image(http, "twice", "v1")
    config, layer = config_blob(), random_blob()
    await push_blob(http, "twice", config)
    await push_blob(http, "twice", layer)
    body = image_manifest(config, [layer], artifact_type=SBOM, subject=subject_of(subject))
    await push_manifest(http, "twice", digest_of(body), body, OCI_MANIFEST)
    await push_manifest(http, "twice", "sbom", body, OCI_MANIFEST)
    await push_manifest(http, "twice", digest_of(body), body, OCI_MANIFEST)
    assert await referrer_digests(http, "twice", subject) == [digest_of(body)]

    assert (await http.delete("/v2/twice/manifests/sbom")).status_code == 202
    assert await referrer_digests(http, "twice", subject) == [digest_of(body)]
    assert (await http.delete(f"/v2/twice/manifests/{digest_of(body)}")).status_code == 202
    assert await referrer_digests(http, "twice", subject) == []


# -- content management ----------------------------------------------------------------------


async def test_deletes_in_a_repository_that_does_not_exist_are_404(http):
    """Deleting Manifests: "If the repository does not exist, the response MUST return 404";
    deleting a tag or a blob there is a 404 with the matching code too (end-9, end-10)."""
    missing = digest_of(b"not here")
    assert_oci_error(
        await http.delete(f"/v2/ghost/repo/manifests/{missing}"), 404, "MANIFEST_UNKNOWN"
    )
    assert_oci_error(await http.delete("/v2/ghost/repo/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    assert_oci_error(await http.delete(f"/v2/ghost/repo/blobs/{missing}"), 404, "BLOB_UNKNOWN")
    assert_oci_error(await http.get("/v2/ghost/repo/tags/list"), 404, "NAME_UNKNOWN")


async def test_a_blob_digest_is_not_a_manifest(http):
    """Pulling manifests / Deleting Manifests: the manifests endpoint answers for manifests
    only; a layer's digest there is 404 MANIFEST_UNKNOWN, and deleting it that way leaves the
    layer in place."""
    body = await push_image(http, "kinds", "v1")
    layer = json.loads(body)["layers"][0]["digest"]
    assert_oci_error(await http.get(f"/v2/kinds/manifests/{layer}"), 404, "MANIFEST_UNKNOWN")
    assert (await http.head(f"/v2/kinds/manifests/{layer}")).status_code == 404
    assert_oci_error(await http.delete(f"/v2/kinds/manifests/{layer}"), 404, "MANIFEST_UNKNOWN")
    assert (await http.head(f"/v2/kinds/blobs/{layer}")).status_code == 200
    assert (await http.get("/v2/kinds/manifests/v1")).content == body


EMPTY_ARTIFACT_CONFIG = "application/vnd.example.signature.config.v1+json"


async def test_empty_artifact_type_falls_back_to_the_config_media_type(http):
    """Listing Referrers: "If the artifactType is empty or missing in the image manifest, the
    value of artifactType MUST be set to the config descriptor mediaType value"."""
    subject = await push_image(http, "blank", "v1")
    config, layer = config_blob(), random_blob()
    await push_blob(http, "blank", config)
    await push_blob(http, "blank", layer)
    body = image_manifest(
        config,
        [layer],
        config_type=EMPTY_ARTIFACT_CONFIG,
        artifact_type="",
        subject={"mediaType": OCI_MANIFEST, "digest": digest_of(subject), "size": len(subject)},
    )
    await push_manifest(http, "blank", digest_of(body), body, OCI_MANIFEST)
    listing = (await http.get(f"/v2/blank/referrers/{digest_of(subject)}")).json()
    assert listing["manifests"] == [
        {
            "mediaType": OCI_MANIFEST,
            "digest": digest_of(body),
            "size": len(body),
            "artifactType": EMPTY_ARTIFACT_CONFIG,
        }
    ]
    filtered = await http.get(
        f"/v2/blank/referrers/{digest_of(subject)}", params={"artifactType": EMPTY_ARTIFACT_CONFIG}
    )
    assert [d["digest"] for d in filtered.json()["manifests"]] == [digest_of(body)]
