"""Manifests (OCI and Docker, images and indexes) and the referrers API, on a real server."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.api_helpers import (
    DOCKER_LIST,
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


async def push_kind(http: httpx.AsyncClient, name: str, media_type: str, tag: str) -> bytes:
    """Push a manifest of ``media_type`` (with what it needs first) under ``tag``."""
    if media_type in (OCI_MANIFEST, DOCKER_MANIFEST):
        return await push_image(http, name, tag, media_type=media_type)
    child_type = OCI_MANIFEST if media_type == OCI_INDEX else DOCKER_MANIFEST
    children = [await push_image(http, name, media_type=child_type) for _ in range(2)]
    body = index_manifest([(child_type, c) for c in children], media_type=media_type)
    await push_manifest(http, name, tag, body, media_type)
    return body


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
async def test_manifest_roundtrip_by_tag_and_digest(http, media_type):
    name = "library/multi"
    body = await push_kind(http, name, media_type, "v1")
    digest = digest_of(body)

    for reference in ("v1", digest):
        get = await http.get(f"/v2/{name}/manifests/{reference}", headers={"Accept": media_type})
        assert get.status_code == 200
        assert get.content == body
        assert get.headers["Content-Type"] == media_type
        assert get.headers["Docker-Content-Digest"] == digest
        assert get.headers["Content-Length"] == str(len(body))

        head = await http.head(f"/v2/{name}/manifests/{reference}")
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["Content-Type"] == media_type
        assert head.headers["Docker-Content-Digest"] == digest
        # Clients (containerd) take the descriptor size from HEAD's Content-Length.
        assert head.headers["Content-Length"] == str(len(body))

    # PUT by digest of the same body is accepted and names the same manifest.
    again = await http.put(
        f"/v2/{name}/manifests/{digest}", content=body, headers={"Content-Type": media_type}
    )
    assert again.status_code == 201
    assert again.headers["Docker-Content-Digest"] == digest
    await push_manifest(http, name, "v2", body, media_type)

    # DELETE by tag: that tag only.
    assert (await http.delete(f"/v2/{name}/manifests/v1")).status_code == 202
    assert_oci_error(await http.get(f"/v2/{name}/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    assert (await http.get(f"/v2/{name}/manifests/{digest}")).content == body
    assert (await http.get(f"/v2/{name}/manifests/v2")).content == body

    # DELETE by digest: gone by digest and by every tag that named it.
    assert (await http.delete(f"/v2/{name}/manifests/{digest}")).status_code == 202
    assert_oci_error(await http.get(f"/v2/{name}/manifests/{digest}"), 404, "MANIFEST_UNKNOWN")
    assert_oci_error(await http.get(f"/v2/{name}/manifests/v2"), 404, "MANIFEST_UNKNOWN")
    assert (await http.head(f"/v2/{name}/manifests/v2")).status_code == 404
    assert (await http.head(f"/v2/{name}/manifests/{digest}")).status_code == 404


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
async def test_put_by_digest(http, media_type):
    body = await push_image(http, "bydigest", media_type=media_type)
    digest = digest_of(body)
    response = await http.get(f"/v2/bydigest/manifests/{digest}")
    assert response.status_code == 200
    assert response.content == body
    assert response.headers["Content-Type"] == media_type
    # Pushed by digest only: no tag was made.
    assert (await http.get("/v2/bydigest/tags/list")).json()["tags"] == []


async def test_put_response_headers(http):
    config, layer = config_blob(), random_blob()
    await push_blob(http, "headers", config)
    await push_blob(http, "headers", layer)
    body = image_manifest(config, [layer])
    response = await http.put(
        "/v2/headers/manifests/latest", content=body, headers={"Content-Type": OCI_MANIFEST}
    )
    assert response.status_code == 201
    assert response.headers["Location"] == absolute(
        http, f"/v2/headers/manifests/{digest_of(body)}"
    )
    assert response.headers["Docker-Content-Digest"] == digest_of(body)
    assert "OCI-Subject" not in response.headers


async def test_manifest_media_type_from_the_body_when_content_type_is_absent(http):
    config, layer = config_blob(), random_blob()
    await push_blob(http, "notype", config)
    await push_blob(http, "notype", layer)
    body = image_manifest(config, [layer], media_type=DOCKER_MANIFEST)
    response = await http.put("/v2/notype/manifests/t", content=body)
    assert response.status_code == 201
    got = await http.get("/v2/notype/manifests/t")
    assert got.headers["Content-Type"] == DOCKER_MANIFEST


async def test_sha512_manifest_reference(http):
    body = await push_image(http, "sha", "t")
    digest = digest_of(body, "sha512")
    response = await http.put(
        f"/v2/sha/manifests/{digest}", content=body, headers={"Content-Type": OCI_MANIFEST}
    )
    assert response.status_code == 201
    assert response.headers["Docker-Content-Digest"] == digest
    got = await http.get(f"/v2/sha/manifests/{digest}")
    assert got.status_code == 200
    assert got.content == body
    assert got.headers["Docker-Content-Digest"] == digest


async def test_missing_blob_is_manifest_blob_unknown(http, registry):
    config, layer = config_blob(), random_blob()
    await push_blob(http, "partial", config)  # the layer is never pushed
    before = snapshot(registry.root / "repositories")
    body = image_manifest(config, [layer])
    response = await http.put(
        "/v2/partial/manifests/latest", content=body, headers={"Content-Type": OCI_MANIFEST}
    )
    entry = assert_oci_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
    assert entry["detail"] == {"digest": digest_of(layer)}
    assert snapshot(registry.root / "repositories") == before
    assert_oci_error(await http.get("/v2/partial/manifests/latest"), 404, "MANIFEST_UNKNOWN")


async def test_blob_of_another_repository_does_not_count(http):
    config, layer = config_blob(), random_blob()
    await push_blob(http, "other", config)
    await push_blob(http, "other", layer)
    body = image_manifest(config, [layer])
    response = await http.put(
        "/v2/mine/manifests/latest", content=body, headers={"Content-Type": OCI_MANIFEST}
    )
    assert_oci_error(response, 400, "MANIFEST_BLOB_UNKNOWN")


@pytest.mark.parametrize(
    ("index_type", "child_type"), [(OCI_INDEX, OCI_MANIFEST), (DOCKER_LIST, DOCKER_MANIFEST)]
)
async def test_index_with_a_missing_child_is_manifest_blob_unknown(
    http, registry, index_type, child_type
):
    present = await push_image(http, "idx", media_type=child_type)
    absent = image_manifest(config_blob(), [random_blob()], media_type=child_type)
    before = snapshot(registry.root / "repositories")
    body = index_manifest([(child_type, present), (child_type, absent)], media_type=index_type)
    response = await http.put(
        "/v2/idx/manifests/multi", content=body, headers={"Content-Type": index_type}
    )
    entry = assert_oci_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
    assert entry["detail"] == {"digest": digest_of(absent)}
    assert snapshot(registry.root / "repositories") == before


async def test_put_by_digest_with_another_body_is_digest_invalid(http, registry):
    body = await push_image(http, "wrong", "t")
    other = image_manifest(config_blob(), [random_blob()])
    before = snapshot(registry.root)
    response = await http.put(
        f"/v2/wrong/manifests/{digest_of(other)}",
        content=body,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert_oci_error(response, 400, "DIGEST_INVALID")
    assert snapshot(registry.root) == before
    assert (await http.head(f"/v2/wrong/manifests/{digest_of(other)}")).status_code == 404


async def test_delete_by_tag_removes_only_the_tag(http):
    body = await push_image(http, "untag", "v1")
    await push_manifest(http, "untag", "v2", body, OCI_MANIFEST)
    digest = digest_of(body)

    assert (await http.delete("/v2/untag/manifests/v1")).status_code == 202
    assert_oci_error(await http.get("/v2/untag/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    by_digest = await http.get(f"/v2/untag/manifests/{digest}")
    assert by_digest.status_code == 200
    assert by_digest.content == body
    assert (await http.get("/v2/untag/manifests/v2")).status_code == 200
    assert (await http.get("/v2/untag/tags/list")).json()["tags"] == ["v2"]
    assert_oci_error(await http.delete("/v2/untag/manifests/v1"), 404, "MANIFEST_UNKNOWN")


async def test_delete_by_digest_removes_the_manifest_and_its_tags(http):
    body = await push_image(http, "purge", "a")
    await push_manifest(http, "purge", "b", body, OCI_MANIFEST)
    other = await push_image(http, "purge", "c")
    digest = digest_of(body)

    assert (await http.delete(f"/v2/purge/manifests/{digest}")).status_code == 202
    assert_oci_error(await http.get(f"/v2/purge/manifests/{digest}"), 404, "MANIFEST_UNKNOWN")
    for tag in ("a", "b"):
        assert_oci_error(await http.get(f"/v2/purge/manifests/{tag}"), 404, "MANIFEST_UNKNOWN")
    assert (await http.get("/v2/purge/manifests/c")).content == other
    assert (await http.get("/v2/purge/tags/list")).json()["tags"] == ["c"]
    response = await http.delete(f"/v2/purge/manifests/{digest}")
    assert_oci_error(response, 404, "MANIFEST_UNKNOWN")


async def test_pushing_a_tag_again_moves_it(http):
    first = await push_image(http, "moving", "latest")
    second = await push_image(http, "moving", "latest")
    assert (await http.get("/v2/moving/manifests/latest")).content == second
    assert (await http.get(f"/v2/moving/manifests/{digest_of(first)}")).content == first


async def test_manifest_at_exactly_the_size_limit_is_accepted(http, registry):
    config, layer = config_blob(), random_blob()
    await push_blob(http, "big", config)
    await push_blob(http, "big", layer)
    limit = registry.config.http.max_manifest_size
    empty = image_manifest(config, [layer], annotations={"pad": ""})
    body = image_manifest(config, [layer], annotations={"pad": "x" * (limit - len(empty))})
    assert len(body) == limit
    response = await http.put(
        "/v2/big/manifests/t", content=body, headers={"Content-Type": OCI_MANIFEST}
    )
    assert response.status_code == 201, response.text
    assert (await http.get("/v2/big/manifests/t")).content == body


# -- subject and referrers -------------------------------------------------------------------

SBOM = "application/vnd.example.sbom.v1"
SIGNATURE_CONFIG = "application/vnd.example.signature.config.v1+json"


async def push_referrer(
    http: httpx.AsyncClient, name: str, subject: bytes, **options: object
) -> tuple[bytes, httpx.Response]:
    config, layer = config_blob(), random_blob()
    await push_blob(http, name, config)
    await push_blob(http, name, layer)
    body = image_manifest(
        config,
        [layer],
        subject={"mediaType": OCI_MANIFEST, "digest": digest_of(subject), "size": len(subject)},
        **options,
    )
    response = await push_manifest(http, name, digest_of(body), body, OCI_MANIFEST)
    return body, response


async def test_subject_is_echoed_in_oci_subject(http):
    subject = await push_image(http, "app", "v1")
    _, response = await push_referrer(http, "app", subject, artifact_type=SBOM)
    assert response.headers["OCI-Subject"] == digest_of(subject)


async def test_referrer_may_be_pushed_before_its_subject(http):
    subject = image_manifest(config_blob(), [random_blob()])  # never pushed
    body, response = await push_referrer(http, "early", subject, artifact_type=SBOM)
    assert response.headers["OCI-Subject"] == digest_of(subject)
    listing = (await http.get(f"/v2/early/referrers/{digest_of(subject)}")).json()
    assert [d["digest"] for d in listing["manifests"]] == [digest_of(body)]


async def test_referrers_list_filter_and_delete(http):
    subject = await push_image(http, "app", "v1")
    sbom, _ = await push_referrer(
        http, "app", subject, artifact_type=SBOM, annotations={"org.example.kind": "sbom"}
    )
    # No artifactType: the listing falls back to the config media type.
    signature, _ = await push_referrer(http, "app", subject, config_type=SIGNATURE_CONFIG)
    unrelated = await push_image(http, "app", "v2")

    response = await http.get(f"/v2/app/referrers/{digest_of(subject)}")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in response.headers
    index = response.json()
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == OCI_INDEX
    by_digest = {d["digest"]: d for d in index["manifests"]}
    assert set(by_digest) == {digest_of(sbom), digest_of(signature)}
    assert digest_of(unrelated) not in by_digest
    assert by_digest[digest_of(sbom)] == {
        "mediaType": OCI_MANIFEST,
        "digest": digest_of(sbom),
        "size": len(sbom),
        "artifactType": SBOM,
        "annotations": {"org.example.kind": "sbom"},
    }
    assert by_digest[digest_of(signature)]["artifactType"] == SIGNATURE_CONFIG
    assert by_digest[digest_of(signature)]["size"] == len(signature)

    filtered = await http.get(
        f"/v2/app/referrers/{digest_of(subject)}", params={"artifactType": SBOM}
    )
    assert filtered.status_code == 200
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
    assert [d["digest"] for d in filtered.json()["manifests"]] == [digest_of(sbom)]

    by_config = await http.get(
        f"/v2/app/referrers/{digest_of(subject)}", params={"artifactType": SIGNATURE_CONFIG}
    )
    assert [d["digest"] for d in by_config.json()["manifests"]] == [digest_of(signature)]

    none = await http.get(
        f"/v2/app/referrers/{digest_of(subject)}", params={"artifactType": "application/none"}
    )
    assert none.headers["OCI-Filters-Applied"] == "artifactType"
    assert none.json()["manifests"] == []

    # Deleting a referrer takes it out of the list.
    assert (await http.delete(f"/v2/app/manifests/{digest_of(sbom)}")).status_code == 202
    after = (await http.get(f"/v2/app/referrers/{digest_of(subject)}")).json()
    assert [d["digest"] for d in after["manifests"]] == [digest_of(signature)]


async def test_referrers_of_an_unknown_digest_is_an_empty_index(http):
    await push_image(http, "app", "v1")
    for name in ("app", "never/pushed"):
        response = await http.get(f"/v2/{name}/referrers/{digest_of(b'nothing refers here')}")
        assert response.status_code == 200
        assert response.headers["Content-Type"] == OCI_INDEX
        assert response.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


async def test_referrers_are_per_repository(http):
    subject = await push_image(http, "one", "v1")
    await push_referrer(http, "one", subject, artifact_type=SBOM)
    response = await http.get(f"/v2/two/referrers/{digest_of(subject)}")
    assert response.json()["manifests"] == []


async def test_index_referrer_uses_its_artifact_type(http):
    subject = await push_image(http, "idxref", "v1")
    child = await push_image(http, "idxref")
    body = index_manifest(
        [(OCI_MANIFEST, child)],
        artifactType=SBOM,
        subject={"mediaType": OCI_MANIFEST, "digest": digest_of(subject), "size": len(subject)},
    )
    response = await push_manifest(http, "idxref", "refidx", body, OCI_INDEX)
    assert response.headers["OCI-Subject"] == digest_of(subject)
    listing = (await http.get(f"/v2/idxref/referrers/{digest_of(subject)}")).json()
    assert listing["manifests"] == [
        {"mediaType": OCI_INDEX, "digest": digest_of(body), "size": len(body), "artifactType": SBOM}
    ]


async def test_config_only_manifest_with_empty_layers(http):
    # Artifacts commonly have an empty config and no layers at all.
    empty = b"{}"
    await push_blob(http, "artifact", empty)
    body = dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": SBOM,
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": digest_of(empty),
                "size": 2,
            },
            "layers": [],
        }
    )
    await push_manifest(http, "artifact", "sbom", body, OCI_MANIFEST)
    got = await http.get("/v2/artifact/manifests/sbom")
    assert got.content == body
    assert json.loads(got.content)["artifactType"] == SBOM
