"""Concurrent writes to one tag: the storage and the event stream stay one story.

The product contract: per repository, a change and its event are committed in one order, so a
consumer replaying an ordered sink's stream ends with exactly the tags the registry serves,
whatever requests raced. Each test races real requests against a real server with an ordered
HTTP sink, over many rounds so that an unordered implementation fails every run, then checks:

- what the registry serves: every listed tag resolves;
- the replay: applying the received events in order (a push sets a tag, a tag delete removes
  it, nothing is inferred) gives exactly the registry's tags, each at the digest it serves.

A push to another repository after the races is the barrier: the sink is ordered, so once its
event arrived every event of the races has.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest
import trio

from registry_trio.config import Config
from registry_trio.events import Action, Event, Source, Target
from registry_trio.events.queue import Attempt, running_queue
from tests.api_helpers import (
    OCI_MANIFEST,
    assert_oci_error,
    config_blob,
    digest_of,
    image_manifest,
    push_blob,
    random_blob,
)
from tests.conftest import RunningRegistry, make_config, start_registry
from tests.sink import HTTPSinkServer

REPO = "race/app"
BARRIER_REPO = "race/barrier"
PASSWORDS = {"owner": "owner-secret-pw", "maker": "maker-secret-pw"}
ACCESS_CONTROL = {
    "repositories": {
        "**": {
            "policies": [
                {"users": ["owner"], "actions": ["read", "create", "update", "delete"]},
                # May push new tags, never move one: an existing tag is an update.
                {"users": ["maker"], "actions": ["read", "create"]},
            ],
            "defaultPolicy": [],
            "anonymousPolicy": [],
        }
    }
}


def race_config(tmp_path: Path, sink_url: str, queue: dict[str, object]) -> Config:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(
        "".join(
            f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
            for user, pw in PASSWORDS.items()
        )
    )
    sink = {
        "type": "http",
        "address": sink_url,
        "format": "distribution",
        "batch": {"maxEvents": 100},
    }
    return make_config(
        tmp_path,
        http={"auth": {"htpasswd": {"path": str(htpasswd)}}, "accessControl": ACCESS_CONTROL},
        extensions={"events": {"enable": True, "queue": queue, "sinks": [sink]}},
    )


@pytest.fixture
async def racing(nursery, tmp_path, sink, queue) -> RunningRegistry:
    return await start_registry(nursery, race_config(tmp_path, sink.url, queue))


def client(registry: RunningRegistry, user: str) -> httpx.AsyncClient:
    # Enough connections that every request of a race is in flight at once.
    return httpx.AsyncClient(
        base_url=registry.url,
        auth=(user, PASSWORDS[user]),
        timeout=60,
        limits=httpx.Limits(max_connections=64),
    )


class Images:
    """Distinct manifests over one config and one layer, pushed once."""

    def __init__(self) -> None:
        self.config, self.layer = config_blob(), random_blob()
        self._made = 0

    async def push_blobs(self, http: httpx.AsyncClient, name: str = REPO) -> None:
        await push_blob(http, name, self.config)
        await push_blob(http, name, self.layer)

    def make(self) -> bytes:
        self._made += 1
        return image_manifest(self.config, [self.layer], annotations={"n": str(self._made)})


async def put(http: httpx.AsyncClient, reference: str, body: bytes) -> httpx.Response:
    return await http.put(
        f"/v2/{REPO}/manifests/{reference}", content=body, headers={"Content-Type": OCI_MANIFEST}
    )


async def race(*requests: functools.partial[Any]) -> list[httpx.Response]:
    """Start every request at once; their responses, in the order given."""
    responses: list[httpx.Response | None] = [None] * len(requests)

    async def run(i: int) -> None:
        responses[i] = await requests[i]()

    async with trio.open_nursery() as nursery:
        for i in range(len(requests)):
            nursery.start_soon(run, i)
    return [r for r in responses if r is not None]


async def served_tags(http: httpx.AsyncClient) -> dict[str, str]:
    """Every tag the registry lists, with the digest it resolves to (each must resolve)."""
    listed = await http.get(f"/v2/{REPO}/tags/list")
    assert listed.status_code == 200, listed.text
    tags = {}
    for tag in listed.json()["tags"]:
        head = await http.head(f"/v2/{REPO}/manifests/{tag}")
        assert head.status_code == 200, f"tag {tag} is listed but answers {head.status_code}"
        tags[tag] = head.headers["Docker-Content-Digest"]
    return tags


def replay(events: list[dict[str, Any]]) -> dict[str, str]:
    """The tags of REPO that the event stream describes, applied in the order received."""
    tags: dict[str, str] = {}
    for event in events:
        target = event["target"]
        if target["repository"] != REPO or "tag" not in target:
            continue
        if event["action"] == "push":
            tags[target["tag"]] = target["digest"]
        else:
            assert event["action"] == "delete", event
            assert tags.get(target["tag"]) == target["digest"], f"deleted unknown tag: {event}"
            del tags[target["tag"]]
    return tags


async def assert_stream_replays_to_state(registry: RunningRegistry, sink: HTTPSinkServer) -> None:
    async with client(registry, "owner") as http:
        images = Images()
        await images.push_blobs(http, BARRIER_REPO)
        barrier = images.make()
        response = await http.put(
            f"/v2/{BARRIER_REPO}/manifests/done",
            content=barrier,
            headers={"Content-Type": OCI_MANIFEST},
        )
        assert response.status_code == 201, response.text
        events = await sink.wait_for(
            lambda evs: any(e["target"].get("tag") == "done" for e in evs), within=60
        )
        assert replay(events) == await served_tags(http)


async def test_create_only_user_never_moves_a_tag_however_pushes_race(racing, sink):
    """``create`` without ``update`` may make a tag, never move it: of ten pushes racing to
    a new tag exactly one wins; the other nine are 403 and change nothing."""
    images = Images()
    async with client(racing, "owner") as owner:
        await images.push_blobs(owner)
    async with client(racing, "maker") as maker:
        for round_ in range(10):
            tag = f"new-{round_}"
            bodies = [images.make() for _ in range(10)]
            responses = await race(*(functools.partial(put, maker, tag, b) for b in bodies))
            won = [b for b, r in zip(bodies, responses, strict=True) if r.status_code == 201]
            assert len(won) == 1, [r.status_code for r in responses]
            for response in responses:
                if response.status_code != 201:
                    entry = assert_oci_error(response, 403, "DENIED")
                    assert f"{REPO}:{tag}" in entry["message"]
            head = await maker.head(f"/v2/{REPO}/manifests/{tag}")
            assert head.headers["Docker-Content-Digest"] == digest_of(won[0])
    await assert_stream_replays_to_state(racing, sink)


async def test_delete_by_digest_racing_tag_pushes_leaves_only_tags_that_resolve(racing, sink):
    """DELETE of a manifest by digest while the same manifest is pushed to five tags: each
    tag ends either gone (deleted with the manifest, and a tag delete event says so) or
    pointing at the manifest pushed again, never listed but 404."""
    images = Images()
    async with client(racing, "owner") as http:
        await images.push_blobs(http)
        for round_ in range(20):
            body = images.make()
            digest = digest_of(body)
            assert (await put(http, digest, body)).status_code == 201
            delete = functools.partial(http.delete, f"/v2/{REPO}/manifests/{digest}")
            pushes = [functools.partial(put, http, f"r{round_}-{i}", body) for i in range(5)]
            responses = await race(delete, *pushes)
            assert responses[0].status_code == 202, responses[0].text
            assert all(r.status_code == 201 for r in responses[1:])
            await served_tags(http)
    await assert_stream_replays_to_state(racing, sink)


async def test_last_push_event_per_tag_is_what_the_tag_serves(racing, sink):
    """Fifty pushes of different manifests racing to one tag, twenty times: each tag serves
    the manifest whose ``push`` event came last."""
    images = Images()
    async with client(racing, "owner") as http:
        await images.push_blobs(http)
        for round_ in range(20):
            bodies = [images.make() for _ in range(50)]
            responses = await race(
                *(functools.partial(put, http, f"hot-{round_}", b) for b in bodies)
            )
            assert all(r.status_code == 201 for r in responses)
    await assert_stream_replays_to_state(racing, sink)


async def test_appends_keep_the_order_they_were_begun_in(tmp_path, queue):
    """One process's appends are stored in the order begun, however their callers then wait
    (here: all at once, the last begun first). The repository lock no longer relies on it (it
    is held until the commit, since other processes append through other connections), but
    events of one request, and of requests that follow one another, keep their order by it."""
    sink = {"type": "http", "address": "http://127.0.0.1:9/events"}
    config = make_config(
        tmp_path, extensions={"events": {"enable": True, "queue": queue, "sinks": [sink]}}
    )
    (sink_config,) = config.extensions.events.sinks
    events = [
        Event(Action.MANIFEST_PUSHED, Target(repository=REPO, tag=f"t{i}"), Source("a", "i"))
        for i in range(300)
    ]
    async with running_queue(config.extensions.events) as events_queue:
        pending = [events_queue.begin_append([(e, [str(sink_config.name)])]) for e in events]
        async with trio.open_nursery() as nursery:
            for append in reversed(pending):
                nursery.start_soon(append.wait)
        taken: list[Event] = []
        async with events_queue.consumer(sink_config, stopping=trio.Event()) as sink_queue:
            with trio.fail_after(30):
                while len(taken) < len(events):
                    deliveries = await sink_queue.take()
                    attempt = Attempt(time.time(), 0.0, 1, "test")
                    await sink_queue.ack(deliveries, [attempt] * len(deliveries))
                    taken += [d.event for d in deliveries]
    assert [e.id for e in taken] == [e.id for e in events]
