"""Tag listing and the catalog, with ``n``/``last`` pagination and ``Link`` headers."""

from __future__ import annotations

import re

import httpx

from tests.api_helpers import (
    OCI_MANIFEST,
    assert_oci_error,
    push_blob,
    push_image,
    push_manifest,
)

_NEXT = re.compile(r'^<(?P<url>[^>]+)>; rel="next"$')


async def walk(http: httpx.AsyncClient, url: str, key: str) -> list[list[str]]:
    """Follow ``Link: <...>; rel="next"`` from ``url``; every page's items, in order."""
    pages = []
    for _ in range(50):
        response = await http.get(url)
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"] == "application/json"
        pages.append(response.json()[key])
        link = response.headers.get("Link")
        if link is None:
            return pages
        match = _NEXT.match(link)
        assert match, link
        url = match["url"]
    raise AssertionError("pagination never ended")


async def tag_many(http: httpx.AsyncClient, name: str, tags: list[str]) -> None:
    body = await push_image(http, name, tags[0])
    for tag in tags[1:]:
        await push_manifest(http, name, tag, body, OCI_MANIFEST)


TAGS = ["1.0", "1.1", "2.0", "latest", "v3"]


async def test_tags_list(http):
    await tag_many(http, "library/tags", ["v3", "latest", "1.0", "2.0", "1.1"])
    response = await http.get("/v2/library/tags/tags/list")
    assert response.status_code == 200
    assert response.json() == {"name": "library/tags", "tags": TAGS}
    assert "Link" not in response.headers


async def test_tags_pagination_with_link(http):
    await tag_many(http, "paged", TAGS)

    first = await http.get("/v2/paged/tags/list", params={"n": 2})
    assert first.json() == {"name": "paged", "tags": ["1.0", "1.1"]}
    assert first.headers["Link"] == '</v2/paged/tags/list?n=2&last=1.1>; rel="next"'

    pages = await walk(http, "/v2/paged/tags/list?n=2", "tags")
    assert pages == [["1.0", "1.1"], ["2.0", "latest"], ["v3"]]

    # An exact fit: the last full page has no Link.
    assert await walk(http, "/v2/paged/tags/list?n=5", "tags") == [TAGS]
    assert await walk(http, "/v2/paged/tags/list?n=100", "tags") == [TAGS]


async def test_tags_last_without_n(http):
    await tag_many(http, "after", TAGS)
    response = await http.get("/v2/after/tags/list", params={"last": "1.1"})
    assert response.json()["tags"] == ["2.0", "latest", "v3"]
    assert "Link" not in response.headers
    response = await http.get("/v2/after/tags/list", params={"last": "v3"})
    assert response.json()["tags"] == []


async def test_tags_of_an_unknown_repository(http):
    assert_oci_error(await http.get("/v2/no/such/repo/tags/list"), 404, "NAME_UNKNOWN")


async def test_tags_of_a_repository_whose_tags_were_all_deleted(http):
    await tag_many(http, "emptied", ["only"])
    assert (await http.delete("/v2/emptied/manifests/only")).status_code == 202
    response = await http.get("/v2/emptied/tags/list")
    assert response.status_code == 200
    assert response.json() == {"name": "emptied", "tags": []}


async def test_catalog_with_nested_names(http):
    assert (await http.get("/v2/_catalog")).json() == {"repositories": []}
    names = ["a/b/c", "z", "a/b", "a/b-c", "m/n/o/p"]
    for name in names:
        await push_image(http, name, "t")
    response = await http.get("/v2/_catalog")
    assert response.status_code == 200
    assert response.json() == {"repositories": sorted(names)}
    assert "Link" not in response.headers

    pages = await walk(http, "/v2/_catalog?n=2", "repositories")
    assert pages == [["a/b", "a/b-c"], ["a/b/c", "m/n/o/p"], ["z"]]

    first = await http.get("/v2/_catalog", params={"n": 1})
    assert first.headers["Link"] == '</v2/_catalog?n=1&last=a%2Fb>; rel="next"'

    after = await http.get("/v2/_catalog", params={"last": "a/b/c"})
    assert after.json() == {"repositories": ["m/n/o/p", "z"]}


async def test_catalog_lists_only_repositories_with_manifests(http):
    await push_image(http, "with/manifest", "t")
    # A blob alone does not make a repository appear; nor does a parent path.
    await push_blob(http, "blob/only", b"just a blob")
    assert (await http.get("/v2/_catalog")).json() == {"repositories": ["with/manifest"]}
    assert_oci_error(await http.get("/v2/with/tags/list"), 404, "NAME_UNKNOWN")
