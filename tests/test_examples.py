"""The configs in examples/ run as they are, and the configs README.md and docs/ show parse.

Every ``examples/*.json`` (found by glob: a new example is tested without editing this file)
passes ``registry-trio verify`` from the repository root, and is served once: examples/ is
copied into a temporary directory, ``http.port`` set to 0 and every address the example sends
to pointed at a real local part (an HTTP sink from tests/sink.py per webhook, one nats-server
from tests/nats_server.py for NATS sinks and the JetStream queue), and ``registry-trio serve -c
examples/<name>.json`` runs there as a subprocess, so that its relative paths resolve as they
do from the repository root. An image is pushed to ``team/hello`` (as alice where the example
has htpasswd auth: examples/README.md lists the demo users) and its manifest event must reach
every sink. What an example shows beyond that is checked by the function :data:`CHECKS` has
under its name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest
import trio

from bench.receiver import parse_events
from bench.registry_client import Image, RegistryClient, make_image
from registry_trio.auth import check_files
from registry_trio.config import ConfigError, load_config, parse_config
from tests.nats_server import NATSObserver, nats_server, observe
from tests.procs import ServerProcess, server_process
from tests.sink import HTTPSinkServer

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
EXAMPLE_NAMES = sorted(path.stem for path in EXAMPLES.glob("*.json"))

# The demo users of examples/htpasswd, as examples/README.md documents them.
DEMO_PASSWORDS = {"alice": "alice-demo", "bob": "bob-demo", "carol": "carol-demo"}
# Every example lets this user (or anyone, without auth) push here.
PUSHER = "alice"
REPOSITORY, TAG = "team/hello", "v1"
MANIFEST_ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


def test_there_are_examples() -> None:
    assert {"minimal", "htpasswd-access", "webhooks-nats", "jetstream", "tls"} <= set(EXAMPLE_NAMES)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_passes_verify_from_the_repository_root(name: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "registry_trio", "verify", "-c", f"examples/{name}.json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"examples/{name}.json: configuration is valid"


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_is_described_in_the_examples_readme(name: str) -> None:
    assert f"### `{name}.json`" in (EXAMPLES / "README.md").read_text()


def test_the_demo_users_are_the_htpasswd_file_and_the_readme_names_their_passwords() -> None:
    lines = (EXAMPLES / "htpasswd").read_text().splitlines()
    users = dict(line.split(":", 1) for line in lines)
    assert users.keys() == DEMO_PASSWORDS.keys()
    readme = (EXAMPLES / "README.md").read_text()
    for user, password in DEMO_PASSWORDS.items():
        assert bcrypt.checkpw(password.encode(), users[user].encode()), user
        assert f"| `{user}` | `{password}` |" in readme, user


def test_minimal_is_what_make_run_serves_plus_one_webhook(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    minimal = load_config("examples/minimal.json")
    embedded = load_config(None)  # what `make run` serves: no config file
    (sink,) = minimal.extensions.events.sinks
    assert sink.type == "http"
    events = dataclasses.replace(minimal.extensions.events, sinks=())
    extensions = dataclasses.replace(minimal.extensions, events=events)
    assert dataclasses.replace(minimal, extensions=extensions) == embedded


# A fenced JSON block of the documentation: a whole document, or one key and its value.
_JSON_BLOCK = re.compile(r"^```json\n(.*?)^```", re.DOTALL | re.MULTILINE)
# Where a fragment (``"queue": {...}``) sits in a whole config.
FRAGMENT_PLACES = {"queue": ("extensions", "events"), "accessControl": ("http",)}
CONFIG_KEYS = {"storage", "http", "extensions"}


def documentation() -> list[Path]:
    """README.md and the pages of docs/: where configs are shown."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def documented_configs() -> list[tuple[str, Any]]:
    """``(page, config)`` for every config the documentation shows: whole ones as they are,
    fragments put in their place."""
    configs = []
    for page in documentation():
        name = str(page.relative_to(REPO))
        for block in _JSON_BLOCK.findall(page.read_text()):
            try:
                doc = json.loads(block)
            except json.JSONDecodeError:
                (key, value), *others = json.loads("{" + block + "}").items()
                assert not others, f"a fragment of {name} has several keys: {block}"
                assert key in FRAGMENT_PLACES, f"{name} fragment {key!r}: add its place here"
                for parent in reversed(FRAGMENT_PLACES[key]):
                    key, value = parent, {key: value}
                doc = {key: value}
            if CONFIG_KEYS & doc.keys():
                configs.append((name, doc))
    return configs


def test_every_config_in_the_readme_and_docs_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    # Relative paths in them resolve from the repository root, as the docs say.
    monkeypatch.chdir(REPO)
    configs = documented_configs()
    pages = {page for page, _ in configs}
    # The configuration example, the queue and access fragments, on their pages.
    assert {"docs/configuration.md", "docs/scaling.md", "docs/security.md"} <= pages
    for page, doc in configs:
        try:
            check_files(parse_config(doc))
        except ConfigError as exc:
            raise AssertionError(f"a config in {page} does not parse: {exc}") from None


@dataclasses.dataclass
class Served:
    """An example being served, and the local parts it sends to."""

    server: ServerProcess
    config: dict[str, Any]
    image: Image
    # Per sink of the example, in its order: the receiver its events reach.
    http_sinks: list[tuple[dict[str, Any], HTTPSinkServer]]
    nats: str | None
    # Where the example's relative paths resolve (a copy of the repository's examples/).
    root: Path

    def receiver(self, name: str) -> HTTPSinkServer:
        (found,) = [sink for config, sink in self.http_sinks if config.get("name") == name]
        return found


def manifest_pushes(posts: Iterable[tuple[dict[str, str], bytes]]) -> list[tuple[str, str, str]]:
    """``(repository, reference, digest)`` of each manifest-push event in some requests."""
    return [
        (record["repository"], record["reference"], record["digest"])
        for headers, body in posts
        for _, _, record in parse_events(headers, body)
        if record is not None
    ]


def posted(sink: HTTPSinkServer) -> list[tuple[dict[str, str], bytes]]:
    return [(item.headers, item.body) for item in sink.received]


def published(observer: NATSObserver) -> list[tuple[dict[str, str], bytes]]:
    # A NATS sink publishes structured CloudEvents JSON, as zot does.
    return [
        ({"content-type": "application/cloudevents+json"}, msg.data) for msg in observer.received
    ]


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
async def test_example_serves_a_push_and_its_event_reaches_every_sink(
    name: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    path = tmp_path / "examples" / f"{name}.json"
    config = json.loads(path.read_text())
    config.setdefault("http", {})["port"] = 0
    events = config.get("extensions", {}).get("events", {})
    queue, sinks = events.get("queue", {}), events.get("sinks", [])
    uses_nats = queue.get("type") == "jetstream" or any(s["type"] == "nats" for s in sinks)
    image = make_image(seed=name.encode())
    expected = (REPOSITORY, TAG, image.digest)

    async with contextlib.AsyncExitStack() as stack:
        nats = None
        if uses_nats:
            nats = (await stack.enter_async_context(nats_server(tmp_path / "nats"))).url
        if queue.get("type") == "jetstream":
            queue["address"] = nats
        http_sinks, observers = [], []
        for sink in sinks:
            if sink["type"] == "http":
                receiver = HTTPSinkServer()
                await receiver.start(nursery)
                sink["address"] = receiver.url
                http_sinks.append((sink, receiver))
            else:
                assert nats is not None
                sink["address"] = nats
                observer = await stack.enter_async_context(observe(nats))
                await observer.subscribe(sink["channel"])  # before the push: core NATS keeps none
                observers.append(observer)
        path.write_text(json.dumps(config))

        server = await stack.enter_async_context(server_process(path, cwd=tmp_path))
        auth = config["http"].get("auth", {})
        credentials = (PUSHER, DEMO_PASSWORDS[PUSHER]) if "htpasswd" in auth else None
        async with httpx.AsyncClient(
            base_url=server.url, auth=credentials, verify=client_tls(config, tmp_path), timeout=30
        ) as http:
            pushed = await RegistryClient(server.url, client=http).push_image(
                REPOSITORY, TAG, image
            )
        assert pushed.status_code == 201, pushed.text

        for sink, receiver in http_sinks:
            await receiver.wait_for(lambda _, r=receiver: expected in manifest_pushes(posted(r)))
            if "hmac" in sink:
                assert_signed(receiver, sink["hmac"])
        for observer in observers:
            await observer.wait_for(lambda _, o=observer: expected in manifest_pushes(published(o)))

        served = Served(server, config, image, http_sinks, nats, tmp_path)
        await CHECKS.get(name, nothing_more)(served)
        assert await server.terminate() == 0
        assert "Traceback" not in server.current_output, server.current_output


def client_tls(config: dict[str, Any], root: Path) -> ssl.SSLContext | bool:
    """What a client needs for the example's TLS: its CA, and the demo client certificate
    when it asks for one (examples/README.md); True (the default) without TLS."""
    tls = config["http"].get("tls")
    if tls is None:
        return True
    context = ssl.create_default_context(cafile=root / "examples" / "tls" / "ca.pem")
    if "cacert" in tls:
        demo = root / "examples" / "tls"
        context.load_cert_chain(demo / "client.pem", demo / "client-key.pem")
    return context


def assert_signed(receiver: HTTPSinkServer, settings: dict[str, str]) -> None:
    """Every request the sink sent carries the hex HMAC-SHA256 of its body."""
    header = settings.get("header", "X-Registry-Signature").lower()
    for item in receiver.received:
        digest = hmac.new(settings["secret"].encode(), item.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(item.headers[header], digest)


async def nothing_more(served: Served) -> None:
    """An example without checks of its own: the push and its events are the test."""


async def htpasswd_access(served: Served) -> None:
    """Anonymous users read public/ only; the team pushes to team/; carol administers."""
    url = served.server.url

    async def as_user(user: str | None) -> httpx.AsyncClient:
        auth = None if user is None else (user, DEMO_PASSWORDS[user])
        return await stack.enter_async_context(httpx.AsyncClient(base_url=url, auth=auth))

    def code(response: httpx.Response) -> str:
        return str(response.json()["errors"][0]["code"])

    async with contextlib.AsyncExitStack() as stack:
        anonymous, alice, bob, carol = [await as_user(u) for u in (None, "alice", "bob", "carol")]
        # The push's event names who pushed.
        (event,) = [
            e for e in served.receiver("receiver").events() if e["type"].endswith("image.updated")
        ]
        assert event["data"]["actor"] == {"name": "alice", "authType": "basic"}

        team = f"/v2/{REPOSITORY}/manifests/{TAG}"
        refused = await anonymous.get(team, headers=MANIFEST_ACCEPT)
        assert (refused.status_code, code(refused)) == (401, "UNAUTHORIZED")
        assert refused.headers["WWW-Authenticate"] == 'Basic realm="registry-trio"'
        assert (await bob.get(team, headers=MANIFEST_ACCEPT)).status_code == 200
        # Bob may push to team/ but not delete: only alice may.
        bobs = await bob.delete(f"/v2/{REPOSITORY}/manifests/{TAG}")
        assert (bobs.status_code, code(bobs)) == (403, "DENIED")

        # public/ is read-only for everyone but the administrator.
        image = make_image(seed=b"public")
        for client, status in ((anonymous, 401), (alice, 403)):
            with pytest.raises(httpx.HTTPStatusError) as failed:
                await RegistryClient(url, client=client).push_image("public/hello", "v1", image)
            assert failed.value.response.status_code == status
        published = await RegistryClient(url, client=carol).push_image("public/hello", "v1", image)
        assert published.status_code == 201, published.text
        pulled = await anonymous.get("/v2/public/hello/manifests/v1", headers=MANIFEST_ACCEPT)
        assert pulled.status_code == 200
        assert pulled.headers["Docker-Content-Digest"] == image.digest

        # The admin API is carol's.
        assert (await carol.get("/_registry/events/sinks")).status_code == 200
        denied = await alice.get("/_registry/events/sinks")
        assert (denied.status_code, code(denied)) == (403, "DENIED")


async def webhooks_nats(served: Served) -> None:
    """The signed sink gets every event in CloudEvents batches; audit only manifest changes."""
    signed, audit = served.receiver("signed"), served.receiver("audit")
    actions = {e["type"] for e in signed.events()}
    assert {"zotregistry.blob.pushed", "zotregistry.image.updated"} <= actions
    for item in signed.received:
        assert item.headers["content-type"] == "application/cloudevents-batch+json"
        assert isinstance(item.json(), list)
    # Ordered delivery: had the filter let the blob events through, they would have come first.
    (event,) = audit.events()
    assert event["action"] == "push"
    assert (event["target"]["repository"], event["target"]["digest"]) == (
        REPOSITORY,
        served.image.digest,
    )


async def jetstream(served: Served) -> None:
    """The events went through the JetStream stream the example names."""
    assert served.nats is not None
    stream = served.config["extensions"]["events"]["queue"]["stream"]
    async with observe(served.nats) as observer:
        # One message per event and sink: two blobs, the repository, the manifest.
        assert await observer.stream_last_sequence(stream) >= 4


async def tls(served: Served) -> None:
    """The client certificate names the actor; without one, or over plain HTTP, no answer."""
    (event,) = [
        e for e in served.receiver("receiver").events() if e["type"].endswith("image.updated")
    ]
    assert event["data"]["actor"] == {"name": "alice", "authType": "mtls"}
    assert served.server.url.startswith("https://")
    no_certificate = ssl.create_default_context(cafile=served.root / "examples/tls/ca.pem")
    async with httpx.AsyncClient(verify=no_certificate) as anonymous:
        with pytest.raises(httpx.TransportError):
            await anonymous.get(f"{served.server.url}/v2/")
    async with httpx.AsyncClient() as plain:
        with pytest.raises(httpx.TransportError):
            await plain.get(served.server.url.replace("https://", "http://") + "/v2/")


CHECKS: dict[str, Callable[[Served], Awaitable[None]]] = {
    "tls": tls,
    "htpasswd-access": htpasswd_access,
    "webhooks-nats": webhooks_nats,
    "jetstream": jetstream,
}


def test_every_check_is_of_an_example() -> None:
    assert CHECKS.keys() <= set(EXAMPLE_NAMES)
