"""The operator console over HTTP: who may see it, what it shows, its forms, hostile input.

A real server, a real HTTP sink and a hostile receiver; the pages are read as a browser gets
them (the browser itself drives the console in ``tests/test_console_browser.py``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import trio

from bench.registry_client import RegistryClient, make_image
from tests.api_helpers import (
    OCI_CONFIG,
    OCI_MANIFEST,
    assert_oci_error,
    push_blob,
    push_image,
    push_manifest,
)
from tests.conftest import RunningRegistry, events_config, make_config, start_registry
from tests.test_auth import PASSWORDS, auth_overrides
from tests.waiting import eventually

UI = "/_registry/ui/"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
# Markup an attacker's text would become if it were not escaped.
HOSTILE = "<img src=x onerror=alert(1)>"
ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"


def sink_config(url: str) -> dict[str, object]:
    """Sink ``audit``: one event per push (its manifest), retried within milliseconds."""
    return {
        "type": "http",
        "address": url,
        "name": "audit",
        "retry": {"initialBackoff": "20ms", "maxBackoff": "50ms"},
        "filter": {"actions": ["manifest.pushed"]},
    }


def locked_config(tmp_path: Path, sink_url: str):
    """Events to ``audit``, htpasswd and access control on: carol is the administrator."""
    events = {
        "enable": True,
        "queue": {"directory": str(tmp_path / "queue_data")},
        "sinks": [sink_config(sink_url)],
    }
    return make_config(tmp_path, extensions={"events": events}, **auth_overrides(tmp_path))


async def dead_letters(http: httpx.AsyncClient, sink: str = "audit") -> list[dict]:
    page = await http.get("/_registry/events/dead", params={"sink": sink})
    assert page.status_code == 200, page.text
    return page.json()["deadLetters"]


async def pending(http: httpx.AsyncClient, sink: str = "audit") -> int:
    sinks = (await http.get("/_registry/events/sinks")).json()["sinks"]
    return next(s["pending"] for s in sinks if s["name"] == sink)


async def registry_with_dead_letters(
    nursery, tmp_path, sink, n: int = 2, queue: dict[str, object] | None = None
) -> RunningRegistry:
    """No auth (the console answers loopback clients), ``n`` pushes buried by a 400."""
    sink.status = 400
    queue = queue or {"directory": str(tmp_path / "queue_data")}
    config = events_config(tmp_path, sink_config(sink.url), queue=queue)
    registry = await start_registry(nursery, config)
    async with httpx.AsyncClient(base_url=registry.url) as http:
        for i in range(n):
            await push_image(http, f"team/app{i}", "v1")
        await eventually(lambda: dead_letters(http), lambda d: len(d) >= n)
    return registry


def assert_console_headers(response: httpx.Response) -> None:
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_pages_show_sinks_dead_letters_and_an_event(nursery, tmp_path, sink):
    registry = await registry_with_dead_letters(nursery, tmp_path, sink)
    async with httpx.AsyncClient(base_url=registry.url) as http:
        overview = await http.get(UI)
        assert overview.status_code == 200, overview.text
        assert overview.headers["Content-Type"] == "text/html; charset=utf-8"
        assert overview.headers["Cache-Control"] == "no-store"
        assert_console_headers(overview)
        assert 'data-refresh="/_registry/ui/sinks"' in overview.text
        live = await http.get(f"{UI}sinks")
        assert 'data-sink="audit"' in live.text
        assert '<td class="dead">2</td>' in live.text
        assert "HTTP 400 from the sink" in live.text

        page = await http.get(f"{UI}sink", params={"name": "audit"})
        assert page.status_code == 200
        letters = await dead_letters(http)
        for letter in letters:
            assert f'data-event="{letter["id"]}"' in page.text
        # Its recent attempts, from the delivery history: each buried by the 400.
        assert page.text.count('<tr class="attempt outcome-dead">') == len(letters)
        assert 'dead (HTTP 400): <span class="error">HTTP 400 from the sink</span>' in page.text

        first = letters[0]
        event = await http.get(
            f"{UI}event", params={"id": first["id"], "sink": "audit", "seq": first["seq"]}
        )
        assert event.status_code == 200, event.text
        assert first["repository"] in event.text and "manifest.pushed" in event.text
        assert f'name="one" value="{first["id"]}"' in event.text
        # Its path: committed, then buried at the sink.
        assert '<tr class="step outcome-committed">' in event.text
        assert '<tr class="step outcome-dead">' in event.text
        assert "History not available" not in event.text

        for script in ("console.js", "console.css"):
            static = await http.get(f"{UI}static/{script}")
            assert static.status_code == 200 and static.content
            assert_console_headers(static)


async def test_replay_from_a_form_reaches_the_receiver(nursery, tmp_path, sink, queue):
    registry = await registry_with_dead_letters(nursery, tmp_path, sink, queue=queue)
    async with httpx.AsyncClient(base_url=registry.url) as http:
        page = await http.get(f"{UI}sink", params={"name": "audit"})
        token = CSRF.search(page.text).group(1)
        cookie = page.headers["Set-Cookie"]
        assert (
            "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/_registry/ui/" in cookie
        )
        first, second = await dead_letters(http)
        sink.status = 200

        replayed = await http.post(
            f"{UI}sink/replay", data={"csrf": token, "sink": "audit", "one": first["id"]}
        )
        assert replayed.status_code == 303
        result = await http.get(replayed.headers["Location"])
        assert "Replayed 1 dead letter(s)" in result.text
        await sink.wait_for(lambda events: any(e["id"] == first["id"] for e in events))
        assert [d["id"] for d in await dead_letters(http)] == [second["id"]]

        everything = await http.post(
            f"{UI}sink/replay", data={"csrf": token, "sink": "audit", "all": "1"}
        )
        assert everything.status_code == 303
        await sink.wait_for(lambda events: any(e["id"] == second["id"] for e in events))
        assert await dead_letters(http) == []
        # The delivery history names who replayed them from the console.
        history = await http.get("/_registry/events/history", params={"outcome": "replayed"})
        replays = history.json()["records"]
        assert {r["event"] for r in replays} == {first["id"], second["id"]}
        assert all(r["by"].startswith("anonymous at 127.0.0.1") for r in replays)


async def test_a_post_without_a_valid_token_is_refused_and_changes_nothing(nursery, tmp_path, sink):
    sink.status = 400
    registry = await start_registry(nursery, locked_config(tmp_path, sink.url))
    carol = ("carol", PASSWORDS["carol"])
    async with httpx.AsyncClient(base_url=registry.url, auth=("alice", PASSWORDS["alice"])) as a:
        await RegistryClient(registry.url, client=a).push_image("team/app", "v1", make_image())
    async with httpx.AsyncClient(base_url=registry.url, auth=carol) as http:
        before = await eventually(lambda: dead_letters(http), lambda d: len(d) == 1)
        page = await http.get(f"{UI}sink", params={"name": "audit"})
        token = CSRF.search(page.text).group(1)
        nonce = http.cookies["registry_console_csrf"]
        replay = {"sink": "audit", "all": "1"}
        attempts = {
            "no token": {**replay},
            "a wrong token": {**replay, "csrf": token[:-2] + "AA"},
            "an empty token": {**replay, "csrf": ""},
        }
        for why, data in attempts.items():
            refused = await http.post(f"{UI}sink/replay", data=data)
            entry = assert_oci_error(refused, 403, "DENIED")
            assert "security token" in entry["message"], why
        # The token without the cookie it was made with (a cross-site post sends no
        # SameSite=Strict cookie), and a cookie of the attacker's own choosing.
        http.cookies.clear()
        refused = await http.post(f"{UI}sink/replay", data={**replay, "csrf": token})
        assert_oci_error(refused, 403, "DENIED")
        http.cookies.set("registry_console_csrf", "attacker-chosen", path=UI)
        refused = await http.post(f"{UI}sink/replay", data={**replay, "csrf": token})
        assert_oci_error(refused, 403, "DENIED")
        # A page of another site, even with the right token and cookie.
        http.cookies.set("registry_console_csrf", nonce, path=UI)
        for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://evil.example"}):
            refused = await http.post(
                f"{UI}sink/replay", data={**replay, "csrf": token}, headers=headers
            )
            assert "another site" in assert_oci_error(refused, 403, "DENIED")["message"]
        assert await dead_letters(http) == before
        assert await pending(http) == 0
        # The same form with its token goes through.
        sink.status = 200
        accepted = await http.post(f"{UI}sink/replay", data={**replay, "csrf": token})
        assert accepted.status_code == 303, accepted.text
        await sink.wait_for(lambda events: any(e["id"] == before[0]["id"] for e in events))


async def test_only_administrators_see_the_console(nursery, tmp_path, sink):
    registry = await start_registry(nursery, locked_config(tmp_path, sink.url))
    pages = [
        UI,
        f"{UI}sinks",
        f"{UI}sink?name=audit",
        f"{UI}repositories",
        f"{UI}static/console.js",
    ]
    async with httpx.AsyncClient(base_url=registry.url) as anonymous:
        for path in pages:
            refused = await anonymous.get(path)
            assert_oci_error(refused, 401, "UNAUTHORIZED")
            # A Basic challenge: the browser asks for a login.
            assert refused.headers["WWW-Authenticate"].startswith('Basic realm="registry-trio"')
        wrong = await anonymous.get(UI, auth=("carol", "not-her-password"))
        assert wrong.status_code == 401 and "Basic" in wrong.headers["WWW-Authenticate"]
    for user in ("alice", "bob"):
        async with httpx.AsyncClient(base_url=registry.url, auth=(user, PASSWORDS[user])) as http:
            for path in pages:
                assert_oci_error(await http.get(path), 403, "DENIED")
            post = await http.post(f"{UI}sink/replay", data={"sink": "audit", "all": "1"})
            assert_oci_error(post, 403, "DENIED")
    async with httpx.AsyncClient(base_url=registry.url, auth=("carol", PASSWORDS["carol"])) as http:
        for path in pages:
            assert (await http.get(path)).status_code == 200, path


async def test_without_auth_only_requests_addressed_to_loopback_are_served(registry):
    # DNS rebinding: a page of evil.example, its name now resolving to 127.0.0.1, reaches
    # the loopback address, but says its own name.
    async with httpx.AsyncClient(base_url=registry.url) as http:
        assert (await http.get(UI)).status_code == 200
        assert (await http.get(UI, headers={"Host": "localhost"})).status_code == 200
        hosts = ("evil.example", "evil.example:5000", "127.0.0.1.evil.example", "", "[::1", "[")
        for host in hosts:
            refused = await http.get(UI, headers={"Host": host})
            assert_oci_error(refused, 403, "DENIED")
            admin = await http.get("/_registry/events/sinks", headers={"Host": host})
            assert_oci_error(admin, 403, "DENIED")


async def test_the_admin_api_refuses_a_post_another_site_made(nursery, tmp_path, sink):
    registry = await registry_with_dead_letters(nursery, tmp_path, sink, n=1)
    # What a form on evil.example can post without a CORS preflight: text/plain.
    body = '{"sink": "audit"}'
    plain = {"Content-Type": "text/plain"}
    async with httpx.AsyncClient(base_url=registry.url) as http:
        before = await dead_letters(http)
        foreigners = (
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},  # another port of the same host
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
            {"Origin": "http://["},
        )
        for foreign in foreigners:
            refused = await http.post(
                "/_registry/events/dead/replay", content=body, headers={**plain, **foreign}
            )
            assert_oci_error(refused, 403, "DENIED")
        assert await dead_letters(http) == before
        # curl and the CLI send no Origin: they are not concerned.
        done = await http.post("/_registry/events/dead/replay", content=body, headers=plain)
        assert done.json() == {"sink": "audit", "replayed": 1}


async def hostile_receiver(nursery: trio.Nursery) -> str:
    """An HTTP 'receiver' whose answer puts markup into the sink's last error."""

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(f"HTTP/1.1 200 OK\r\n{HOSTILE}: y\r\n\r\n".encode())

    listeners = await nursery.start(trio.serve_tcp, answer, 0)
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/events"


async def test_attacker_text_is_escaped_everywhere(nursery, tmp_path, sink):
    registry = await start_registry(
        nursery, events_config(tmp_path, sink_config(await hostile_receiver(nursery)))
    )
    async with httpx.AsyncClient(base_url=registry.url, headers={"User-Agent": HOSTILE}) as http:
        await push_image(http, "team/app", "v1", annotations={"note": HOSTILE})
        # The receiver's bytes in the sink's last error.
        sinks = await eventually(
            lambda: http.get("/_registry/events/sinks"),
            lambda r: HOSTILE in (r.json()["sinks"][0]["lastError"] or ""),
        )
        assert sinks.status_code == 200
        overview = await http.get(UI)
        sink_page = await http.get(f"{UI}sink", params={"name": "audit"})
        manifest = await http.get(f"{UI}manifest", params={"name": "team/app", "reference": "v1"})
        for page in (overview, sink_page, manifest):
            assert page.status_code == 200, page.text
            assert ESCAPED in page.text
            assert HOSTILE not in page.text

    # The event payload: the pusher's User-Agent, on a dead letter's page.
    sink.status = 400
    registry = await start_registry(nursery, events_config(tmp_path / "2", sink_config(sink.url)))
    async with httpx.AsyncClient(base_url=registry.url, headers={"User-Agent": HOSTILE}) as http:
        await push_image(http, "team/app", "v1")
        (letter,) = await eventually(lambda: dead_letters(http), lambda d: len(d) == 1)
        event = await http.get(
            f"{UI}event", params={"id": letter["id"], "sink": "audit", "seq": letter["seq"]}
        )
        assert event.status_code == 200
        assert ESCAPED in event.text and HOSTILE not in event.text


async def test_repositories_tags_manifest_layers_referrers_and_the_pull_command(registry, http):
    body = await push_image(http, "team/app", "v1")
    subject = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": _digest(body),
        "size": len(body),
    }
    signature = await push_image(
        http, "team/app", artifact_type="application/vnd.example.sig", subject=subject
    )
    listing = await http.get(f"{UI}repositories")
    assert "team/app" in listing.text
    repository = await http.get(f"{UI}repository", params={"name": "team/app"})
    assert '<tr class="tag">' in repository.text and _digest(body) in repository.text
    page = await http.get(f"{UI}manifest", params={"name": "team/app", "reference": "v1"})
    assert page.status_code == 200
    assert page.text.count('<tr class="layer">') == 2  # the config and one layer
    assert '<tr class="referrer">' in page.text and _digest(signature) in page.text
    assert "application/vnd.example.sig" in page.text
    host = registry.url.split("://", 1)[1]
    assert f'<code class="pull">docker pull {host}/team/app:v1</code>' in page.text
    by_digest = await http.get(
        f"{UI}manifest", params={"name": "team/app", "reference": _digest(signature)}
    )
    assert f"docker pull {host}/team/app@{_digest(signature)}" in by_digest.text
    assert "Refers to" in by_digest.text


async def test_a_deeply_nested_manifest_is_shown(registry, http):
    # A push takes a manifest nested hundreds of levels deep; its page must not recurse
    # into a 500.
    config = await push_blob(http, "team/deep", b"{}")
    for depth in (300, 900):
        head = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config, "size": 2},
            "layers": [],
        }
        nested = "[" * depth + '"deep"' + "]" * depth
        body = (json.dumps(head)[:-1] + f', "x": {nested}}}').encode()
        await push_manifest(http, "team/deep", f"d{depth}", body, OCI_MANIFEST)
        shown = await http.get(
            f"{UI}manifest", params={"name": "team/deep", "reference": f"d{depth}"}
        )
        assert shown.status_code == 200, shown.text
        assert "deep" in shown.text


def _digest(body: bytes) -> str:
    from tests.api_helpers import digest_of

    return digest_of(body)


async def test_bad_input_gets_oci_errors_never_a_500(nursery, tmp_path, sink):
    registry = await registry_with_dead_letters(nursery, tmp_path, sink, n=1)
    bad = [
        (f"{UI}sink", 400, "UNSUPPORTED"),
        (f"{UI}sink?name=nope", 404, "UNSUPPORTED"),
        (f"{UI}sink?name=audit&after=-1", 400, "UNSUPPORTED"),
        (f"{UI}sink?name=audit&after=99999999999999999999999", 400, "UNSUPPORTED"),
        (f"{UI}sink?name=audit&after=²", 400, "UNSUPPORTED"),  # a digit int() refuses
        (f"{UI}sink?name=audit&replayed=²", 400, "UNSUPPORTED"),
        ("/_registry/events/dead?sink=audit&limit=²", 400, "UNSUPPORTED"),
        (f"{UI}event?id=" + "x" * 500, 400, "UNSUPPORTED"),
        (f"{UI}event?id=nope&sink=audit&seq=1", 404, "UNSUPPORTED"),
        (f"{UI}event?id=nope&sink=audit&seq=abc", 400, "UNSUPPORTED"),
        (f"{UI}repository?name=Bad..Name", 400, "NAME_INVALID"),
        (f"{UI}repository?name=no/such", 404, "NAME_UNKNOWN"),
        (f"{UI}manifest?name=team/app0&reference=..bad", 404, "MANIFEST_UNKNOWN"),
        (f"{UI}manifest?name=team/app0&reference=nope", 404, "MANIFEST_UNKNOWN"),
        (f"{UI}manifest?name=team/app0&reference=sha256:zz", 400, "DIGEST_INVALID"),
        (f"{UI}manifest?name=team/app0", 400, "UNSUPPORTED"),
        # Only the console's script and stylesheet: not its modules, by any spelling.
        (f"{UI}static/" + "pages.py", 404, "UNSUPPORTED"),
        (f"{UI}static/..%2Fhealth.py", 404, "UNSUPPORTED"),
        (f"{UI}static/..%2F..%2Fconfig.py", 404, "UNSUPPORTED"),
    ]
    async with httpx.AsyncClient(base_url=registry.url) as http:
        for path, status, code in bad:
            assert_oci_error(await http.get(path), status, code)
        page = await http.get(f"{UI}sink", params={"name": "audit"})
        token = CSRF.search(page.text).group(1)
        posts = [
            ({"sink": "audit"}, 400),  # nothing chosen
            ({"sink": "nope", "all": "1"}, 404),
            ({"sink": "audit", "ids": ["x" * 500]}, 400),
            ({"sink": "audit", "ids": [str(i) for i in range(1001)]}, 400),
        ]
        for data, status in posts:
            refused = await http.post(f"{UI}sink/replay", data={**data, "csrf": token})
            assert_oci_error(refused, status, "UNSUPPORTED")
        huge = await http.post(
            f"{UI}sink/replay", data={"csrf": token, "sink": "audit", "ids": "x" * 100_000}
        )
        assert_oci_error(huge, 413, "UNSUPPORTED")
        assert_oci_error(await http.put(UI), 405, "UNSUPPORTED")
        assert len(await dead_letters(http)) == 1


async def test_the_console_works_with_events_off(nursery, tmp_path: Path):
    registry = await start_registry(nursery, make_config(tmp_path))
    async with httpx.AsyncClient(base_url=registry.url) as http:
        overview = await http.get(UI)
        assert overview.status_code == 200 and "events extension is off" in overview.text
        assert_oci_error(await http.get(f"{UI}sink?name=audit"), 404, "UNSUPPORTED")


async def test_any_worker_takes_a_form_that_another_rendered(nursery, tmp_path, sink):
    from tests.procs import server_process
    from tests.test_workers import workers_config

    sink.status = 400
    async with server_process(workers_config(tmp_path, sink)) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            await push_image(http, "team/app", "v1")
            page = await http.get(f"{UI}sink", params={"name": sink.url})
            assert page.status_code == 200, page.text
            token, cookies = CSRF.search(page.text).group(1), dict(http.cookies)
        # Each post on a connection of its own: the kernel spreads them over the workers.
        # (An id that is no dead letter: every post is taken, and replays nothing.)
        form = {"csrf": token, "sink": sink.url, "ids": "no-such-event"}
        for _ in range(12):
            async with httpx.AsyncClient(base_url=server.url, cookies=cookies) as fresh:
                posted = await fresh.post(f"{UI}sink/replay", data=form)
                assert posted.status_code == 303, posted.text
                assert posted.headers["Location"].endswith("replayed=0")
        takers = re.findall(
            r"\[(worker \d)\] registry_trio\.access .* POST /_registry/ui/sink/replay 303",
            server.current_output,
        )
        assert set(takers) == {"worker 1", "worker 2"}, server.current_output


async def test_an_administrator_by_client_certificate_uses_the_console(nursery, tmp_path, sink):
    from tests.test_auth import write_htpasswd
    from tests.test_tls import CLIENT_NAME, client_context, tls_config
    from tests.tls_certs import make_tls_files

    sink.status = 400
    files = make_tls_files(tmp_path / "tls", client=True)
    access = {
        "repositories": {"**": {"policies": [{"users": ["alice"], "actions": ["create"]}]}},
        "adminPolicy": {"users": [CLIENT_NAME, "alice"], "actions": ["read"]},
    }
    htpasswd = {"htpasswd": {"path": str(write_htpasswd(tmp_path / "htpasswd"))}}
    config = tls_config(tmp_path, files, sink.url, mtls=True, auth=htpasswd, accessControl=access)
    registry = await start_registry(nursery, config)
    sink_name = config.extensions.events.sinks[0].name
    context = client_context(files.ca, client=files)
    async with httpx.AsyncClient(base_url=registry.url, verify=context) as http:
        alice = ("alice", PASSWORDS["alice"])
        async with httpx.AsyncClient(base_url=registry.url, verify=context, auth=alice) as a:
            await RegistryClient(registry.url, client=a).push_image("a/b", "v1", make_image())
        await eventually(lambda: dead_letters(http, sink_name), bool)
        page = await http.get(f"{UI}sink", params={"name": sink_name})
        assert page.status_code == 200, page.text
        assert "Secure" in page.headers["Set-Cookie"]  # served over https
        form = {"csrf": CSRF.search(page.text).group(1), "sink": sink_name, "all": "1"}
        # The token is the certificate's: another administrator's login on the same
        # connection, with the same cookie, does not carry it.
        refused = await http.post(f"{UI}sink/replay", data=form, auth=alice)
        assert "security token" in assert_oci_error(refused, 403, "DENIED")["message"]
        assert (await http.post(f"{UI}sink/replay", data=form)).status_code == 303


async def test_no_page_shows_a_secret(nursery, tmp_path, sink):
    secrets = ("url-password-1", "bearer-token-2", "hmac-key-3")
    sink.status = 400  # a dead letter too, so that every part of the pages is shown
    address = sink.url.replace("http://", f"http://hook-user:{secrets[0]}@")
    config = events_config(
        tmp_path,
        {
            "type": "http",
            "address": address,
            "credentials": {"token": secrets[1]},
            "hmac": {"secret": secrets[2]},
        },
    )
    registry = await start_registry(nursery, config)
    name = config.extensions.events.sinks[0].name
    async with httpx.AsyncClient(base_url=registry.url) as http:
        await push_image(http, "team/app", "v1")
        (letter, *_) = await eventually(lambda: dead_letters(http, name), bool)
        pages = [
            await http.get(UI),
            await http.get(f"{UI}sinks"),
            await http.get(f"{UI}sink", params={"name": name}),
            await http.get(
                f"{UI}event", params={"id": letter["id"], "sink": name, "seq": letter["seq"]}
            ),
        ]
    for page in pages:
        assert page.status_code == 200, page.text
        assert sink.url in page.text  # the address, less its credentials
        for secret in (*secrets, "hook-user"):
            assert secret not in page.text
