"""Hostile request lines: every spelling of a protected path, invented methods.

The requests are written byte for byte on a socket (httpx would normalise the path), against a
registry with htpasswd and access control on, holding a private repository and dead letters.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from bench.registry_client import RegistryClient, make_image
from tests.conftest import make_config, start_registry
from tests.raw_http import RawConnection
from tests.test_auth import PASSWORDS, auth_overrides
from tests.waiting import eventually

DIGEST = "sha256:" + "0" * 64
UPLOAD = "0123456789abcdef0123456789abcdef"
# What a refused request must never show: the private tag, a manifest, dead letters, sinks,
# the delivery history, a console page.
LEAKS = re.compile(
    rb'"v1"|"schemaVersion"|"deadLetters"|"sinks"|"replayed"|"records"|"steps"|<html|<table'
)

# Every route that needs a login (anonymousPolicy is empty on team/**), with its method.
PROTECTED = [
    ("GET", "/v2/"),
    ("GET", "/v2/team/app/tags/list"),
    ("GET", f"/v2/team/app/referrers/{DIGEST}"),
    ("GET", "/v2/team/app/manifests/v1"),
    ("HEAD", "/v2/team/app/manifests/v1"),
    ("PUT", "/v2/team/app/manifests/v2"),
    ("DELETE", "/v2/team/app/manifests/v1"),
    ("GET", f"/v2/team/app/blobs/{DIGEST}"),
    ("DELETE", f"/v2/team/app/blobs/{DIGEST}"),
    ("POST", "/v2/team/app/blobs/uploads/"),
    ("PATCH", f"/v2/team/app/blobs/uploads/{UPLOAD}"),
    ("PUT", f"/v2/team/app/blobs/uploads/{UPLOAD}?digest={DIGEST}"),
    ("GET", f"/v2/team/app/blobs/uploads/{UPLOAD}"),
    ("DELETE", f"/v2/team/app/blobs/uploads/{UPLOAD}"),
    ("GET", "/_registry/events/sinks"),
    ("GET", "/_registry/events/dead?limit=100"),
    ("POST", "/_registry/events/dead/replay"),
    ("GET", "/_registry/events/history?limit=100"),
    ("GET", "/_registry/events/trace/0f8e5d1c-1111-4222-8333-944455556666"),
    ("GET", "/_registry/ui/"),
    ("GET", "/_registry/ui/sinks"),
    ("GET", "/_registry/ui/sink?name=127.0.0.1"),
    ("POST", "/_registry/ui/sink/replay"),
    ("GET", "/_registry/ui/event?id=x"),
    ("GET", "/_registry/ui/repositories"),
    ("GET", "/_registry/ui/repository?name=team/app"),
    ("GET", "/_registry/ui/manifest?name=team/app&reference=v1"),
    ("GET", "/_registry/ui/static/console.js"),
]


def spellings(path: str) -> set[str]:
    """Other ways to write ``path`` that a lenient router might serve as ``path``."""
    target, _, query = path.partition("?")
    suffix = f"?{query}" if query else ""
    slashes = [i for i, c in enumerate(target) if c == "/"]
    variants = {"/" + target, "//" + target, target + "/", target.replace("/v2", "/V2", 1)}
    for i in slashes:
        head, tail = target[:i], target[i + 1 :]
        variants |= {
            f"{head}//{tail}",
            f"{head}/./{tail}",
            f"{head}/x/../{tail}",
            f"{head}%2F{tail}",
            f"{head}%2f{tail}",
            f"{head}/%2e/{tail}",
        }
    variants.discard(target)
    return {v + suffix for v in variants if v}


async def raw_request(url: str, method: str, target: str, headers: str = "") -> tuple[int, bytes]:
    """Send one request with ``target`` exactly as given; its status and body."""
    connection = await RawConnection.open(url)
    async with connection.stream:
        request = f"{method} {target} HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\n{headers}"
        await connection.send(f"{request}Content-Length: 2\r\n\r\n{{}}".encode())
        with trio.fail_after(10):
            response = await connection.response(method)
    return response.status_code, response.content


@pytest.fixture
async def locked_registry(nursery, tmp_path, sink):
    """A registry with auth on, a private tag `team/app:v1`, and a dead letter."""
    sink.status = 400  # every event is refused for good: dead letters to steal
    events = {
        "enable": True,
        "sinks": [{"type": "http", "address": sink.url}],
        "queue": {"directory": str(tmp_path / "q")},
    }
    config = make_config(tmp_path, extensions={"events": events}, **auth_overrides(tmp_path))
    registry = await start_registry(nursery, config)
    async with httpx.AsyncClient(base_url=registry.url, auth=("alice", PASSWORDS["alice"])) as http:
        client = RegistryClient(registry.url, client=http)
        await client.push_image("team/app", "v1", make_image((512,)))
    async with httpx.AsyncClient(auth=("carol", PASSWORDS["carol"])) as admin:

        async def dead_letters() -> int:
            page = await admin.get(f"{registry.url}/_registry/events/dead?limit=100")
            return len(page.json()["deadLetters"])

        await eventually(dead_letters, lambda n: n >= 1)
    return registry


async def test_no_spelling_of_a_protected_path_skips_authentication(locked_registry):
    url = locked_registry.url
    absolute = url.rstrip("/")
    refused = {400, 401, 403, 404, 405}
    checked = 0
    for method, path in PROTECTED:
        # The canonical spelling is refused to anonymous callers...
        status, _ = await raw_request(url, method, path)
        assert status == 401, (method, path)
        # ... and so is every other way of writing it, in origin and absolute form.
        for target in sorted(spellings(path)):
            for form in (target, absolute + target):
                status, body = await raw_request(url, method, form)
                assert status in refused, (method, form, status, body[:200])
                assert not LEAKS.search(body), (method, form, body[:200])
                checked += 1
    assert checked > 1000


async def test_a_non_admin_reaches_no_admin_route_by_any_spelling(locked_registry):
    token = base64.b64encode(f"bob:{PASSWORDS['bob']}".encode()).decode()
    bob = f"Authorization: Basic {token}\r\n"
    for method, path in PROTECTED:
        if not path.startswith("/_registry/"):
            continue
        assert (await raw_request(locked_registry.url, method, path, bob))[0] == 403
        for target in spellings(path):
            status, body = await raw_request(locked_registry.url, method, target, bob)
            assert status in (403, 404, 405), (method, target, status)
            assert not LEAKS.search(body), (method, target, body[:200])


async def test_invented_methods_do_not_grow_the_metrics(registry):
    url = registry.url
    methods = [f"X{i}" for i in range(300)] + ["M" * 8000, "BREW", "TRACE"]
    for method in methods:
        for path in ("/v2/", "/v2/repo/manifests/latest", "/metrics", "/nowhere"):
            status, body = await raw_request(url, method, path)
            assert status == 501, (method, path)
            assert b'"UNSUPPORTED"' in body
    async with httpx.AsyncClient(base_url=url) as http:
        text = (await http.get("/metrics")).text
    labels = set(re.findall(r"registry_http_requests_total\{([^}]*)\}", text))
    methods_seen = {re.search(r'method="([^"]*)"', labels_).group(1) for labels_ in labels}
    assert methods_seen <= {"GET", "HEAD", "OTHER"}, methods_seen
    assert len(labels) < 10, labels
    assert "M" * 100 not in text
