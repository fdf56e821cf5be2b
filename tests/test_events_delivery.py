"""Events end to end: a real registry on Hypercorn delivering to a real HTTP sink."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys

import httpx
import pytest
import trio
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat

from bench.registry_client import RegistryClient, make_image
from registry_trio.events.queue import QueueError
from tests.conftest import counts_until, events_config, start_registry
from tests.sink import HTTPSinkServer


def http_sink(sink, **extra):
    return {
        "type": "http",
        "address": sink.url,
        "timeout": "2s",
        "retry": {"initialBackoff": "10ms", "maxBackoff": "50ms"},
        **extra,
    }


async def test_push_produces_enriched_cloudevents(nursery, tmp_path, sink, queue):
    registry = await start_registry(nursery, events_config(tmp_path, http_sink(sink), queue=queue))
    image = make_image((4096,))
    async with httpx.AsyncClient(
        base_url=registry.url, headers={"User-Agent": "tester/1.0"}
    ) as http:
        response = await RegistryClient(registry.url, client=http).push_image(
            "team/app", "v1", image
        )
    events = await sink.wait_for(lambda evs: any(e["type"].endswith("image.updated") for e in evs))
    types = [e["type"] for e in events]
    assert types == [
        "zotregistry.blob.pushed",
        "zotregistry.blob.pushed",
        "zotregistry.repository.created",
        "zotregistry.image.updated",
    ]
    # Parse back with the cloudevents package, as a consumer would.
    last = sink.received[-1]
    parsed = ce_http.from_http(
        ce_http.HTTPMessage(headers=last.headers, body=last.body), JSONFormat()
    )
    data = parsed.get_data()
    assert parsed.get_type() == "zotregistry.image.updated"
    assert data["name"] == "team/app" and data["reference"] == "v1"
    assert data["digest"] == image.digest
    assert data["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert data["manifest"] == image.manifest.decode()
    request = data["request"]
    assert request["id"] == response.headers["X-Request-Id"]
    assert request["method"] == "PUT"
    assert request["useragent"] == "tester/1.0"
    assert request["host"] == registry.url.split("://")[1]
    assert request["addr"].startswith("127.0.0.1:")
    assert "actor" not in data  # no authentication configured: no actor
    assert len({e["id"] for e in events}) == 4


# Field names of distribution's notifications/event.go (see shared/seeds/003_*).
DISTRIBUTION_EVENT_KEYS = {"id", "timestamp", "action", "target", "request", "source"}
DISTRIBUTION_TARGET_KEYS = {
    "mediaType",
    "digest",
    "size",
    "length",
    "repository",
    "fromRepository",
    "url",
    "tag",
    "references",
}
DISTRIBUTION_REQUEST_KEYS = {"id", "addr", "host", "method", "useragent"}


async def push(registry, repository, tag, image=None):
    async with httpx.AsyncClient(base_url=registry.url) as http:
        return await RegistryClient(registry.url, client=http).push_image(
            repository, tag, image or make_image((1024,))
        )


def manifest_pushes(events):
    return [e for e in events if e.get("type", e.get("action")) in ("zotregistry.image.updated",)]


async def test_binary_format_parses_back(nursery, tmp_path, sink):
    registry = await start_registry(
        nursery, events_config(tmp_path, http_sink(sink, format="cloudevents-binary"))
    )
    response = await push(registry, "fmt/binary", "v1")
    await sink.wait_for(lambda evs: len(evs) == 4)
    last = sink.received[-1]
    assert last.headers["ce-type"] == "zotregistry.image.updated"
    parsed = ce_http.from_http(
        ce_http.HTTPMessage(headers=last.headers, body=last.body), JSONFormat()
    )
    assert parsed.get_data()["request"]["id"] == response.headers["X-Request-Id"]
    assert parsed.get_subject() == "fmt/binary:v1"


async def test_batch_format_carries_several_events(nursery, tmp_path, sink, queue):
    registry = await start_registry(
        nursery,
        events_config(
            tmp_path,
            http_sink(
                sink, format="cloudevents-batch", batch={"maxEvents": 50, "maxWait": "200ms"}
            ),
            queue=queue,
        ),
    )
    await push(registry, "fmt/batch", "v1")
    events = await sink.wait_for(lambda evs: len(evs) == 4)
    assert all(
        r.headers["content-type"] == "application/cloudevents-batch+json" for r in sink.received
    )
    assert len(sink.received) < 4  # at least two events shared a request
    fmt = JSONFormat()
    for item in json.loads(sink.received[-1].body):
        assert fmt.read(None, json.dumps(item).encode()).get_id() == item["id"]
    assert events[-1]["type"] == "zotregistry.image.updated"


async def test_distribution_envelope_uses_event_go_names(nursery, tmp_path, sink):
    registry = await start_registry(
        nursery, events_config(tmp_path, http_sink(sink, format="distribution"))
    )
    image = make_image((2048,))
    response = await push(registry, "fmt/dist", "v1", image)
    events = await sink.wait_for(lambda evs: any(e["target"].get("tag") == "v1" for e in evs))
    assert sink.received[0].headers["content-type"] == (
        "application/vnd.docker.distribution.events.v1+json"
    )
    # repository.created has no distribution counterpart and is not sent in this format.
    assert [e["action"] for e in events] == ["push", "push", "push"]
    manifest = events[-1]
    assert set(manifest) <= DISTRIBUTION_EVENT_KEYS | {"actor"}
    assert set(manifest["target"]) <= DISTRIBUTION_TARGET_KEYS
    assert set(manifest["request"]) == DISTRIBUTION_REQUEST_KEYS
    assert manifest["target"]["digest"] == image.digest
    assert manifest["target"]["length"] == manifest["target"]["size"] == len(image.manifest)
    assert [r["digest"] for r in manifest["target"]["references"]] == [
        image.config.digest,
        image.layers[0].digest,
    ]
    assert manifest["request"]["id"] == response.headers["X-Request-Id"]
    assert set(manifest["source"]) == {"addr", "instanceID"}


async def test_sink_outage_then_recovery_delivers_everything_in_order(
    nursery, tmp_path, sink, queue
):
    registry = await start_registry(nursery, events_config(tmp_path, http_sink(sink), queue=queue))
    await sink.stop()
    tags = [f"v{i}" for i in range(8)]
    for tag in tags:
        await push(registry, "outage/app", tag)
    await counts_until(registry.config, sink.url, lambda c: c.failed_attempts >= 2)
    await sink.start(nursery)  # same port: the sink is back
    events = await sink.wait_for(lambda evs: len(manifest_pushes(evs)) == len(tags))
    assert [e["data"]["reference"] for e in manifest_pushes(events)] == tags
    assert len(events) == len(tags) * 3 + 1  # 2 blobs + manifest each, 1 repository.created
    ids = [e["id"] for e in events]
    assert len(set(ids)) == len(ids)
    counts = await counts_until(registry.config, sink.url, lambda c: c.pending == 0)
    assert counts.delivered == len(events) and counts.dead == 0


async def test_permanent_rejection_goes_to_dead_letters(nursery, tmp_path, sink, caplog, queue):
    sink.status = 400
    registry = await start_registry(nursery, events_config(tmp_path, http_sink(sink), queue=queue))
    await push(registry, "dead/app", "v1")
    # (A JetStream queue acknowledges a buried message just after storing its dead letter.)
    counts = await counts_until(registry.config, sink.url, lambda c: c.dead == 4 and not c.pending)
    assert counts.delivered == 0
    assert counts.last_error == "rejected: HTTP 400 from the sink"
    assert sum("moved to dead letters" in r.getMessage() for r in caplog.records) == 4


async def test_exhausted_retry_budget_goes_to_dead_letters(nursery, tmp_path, sink, queue):
    sink.status = 503
    registry = await start_registry(
        nursery,
        events_config(
            tmp_path,
            http_sink(sink, retry={"initialBackoff": "1ms", "maxBackoff": "5ms", "maxAttempts": 3}),
            queue=queue,
        ),
    )
    await push(registry, "budget/app", "v1")
    counts = await counts_until(registry.config, sink.url, lambda c: c.dead == 4)
    assert counts.failed_attempts == 12  # 3 attempts for each of 4 events
    assert counts.last_error.startswith("retry budget exhausted: HTTP 503")


@pytest.mark.parametrize(
    ("retry_after", "delay"),
    [
        ("2", 2.0),  # seconds, honoured over the 10 ms the backoff would pick
        ("3600", 5.0),  # but never past maxBackoff: a sink cannot park its events for an hour
    ],
)
async def test_retry_after_sets_the_next_attempt(
    nursery, tmp_path, sink, caplog, retry_after, delay
):
    caplog.set_level(logging.INFO, logger="registry_trio.events.delivery")
    sink.status, sink.retry_after = 429, retry_after
    registry = await start_registry(
        nursery,
        events_config(
            tmp_path, http_sink(sink, retry={"initialBackoff": "10ms", "maxBackoff": "5s"})
        ),
    )
    async with httpx.AsyncClient(base_url=registry.url) as http:
        layer = b"retry-after"
        digest = f"sha256:{hashlib.sha256(layer).hexdigest()}"
        response = await http.post(
            "/v2/ra/app/blobs/uploads/", params={"digest": digest}, content=layer
        )
        assert response.status_code == 201
    await counts_until(registry.config, sink.url, lambda c: c.failed_attempts >= 1)
    (line,) = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()][:1]
    assert "HTTP 429 from the sink" in line
    assert line.endswith(f"attempt 1, retrying in {delay:.2f}s"), line


async def test_an_event_past_its_max_age_goes_to_dead_letters(nursery, tmp_path, sink, queue):
    sink.status = 503  # forever; attempts are unlimited, so only the age can end it
    retry = {"initialBackoff": "50ms", "maxBackoff": "200ms", "maxAttempts": 0, "maxAge": "1s"}
    registry = await start_registry(
        nursery, events_config(tmp_path, http_sink(sink, retry=retry), queue=queue)
    )
    await push(registry, "aged/app", "v1")
    # (A JetStream queue acknowledges a buried message just after storing its dead letter.)
    counts = await counts_until(registry.config, sink.url, lambda c: c.dead == 4 and not c.pending)
    assert counts.delivered == 0
    assert counts.failed_attempts > 4  # retried, not buried at the first failure
    assert counts.last_error.startswith("retry budget exhausted: HTTP 503")


async def test_hanging_sink_blocks_neither_pushes_nor_other_sinks(nursery, tmp_path, sink, queue):
    hanging = HTTPSinkServer(delay=60)
    await hanging.start(nursery)
    registry = await start_registry(
        nursery,
        events_config(tmp_path, http_sink(hanging, timeout="30s"), http_sink(sink), queue=queue),
    )
    with trio.fail_after(10):  # each push is milliseconds; a blocked one would hit this
        for i in range(5):
            await push(registry, "iso/app", f"v{i}")
    events = await sink.wait_for(lambda evs: len(manifest_pushes(evs)) == 5)
    assert len(events) == 16
    assert hanging.received == []


async def test_crashed_sink_task_is_restarted(nursery, tmp_path, sink, monkeypatch, caplog, queue):
    from registry_trio.events.sinks.http import HTTPSink

    real_send = HTTPSink.send
    crashes = []

    async def crash_once(self, messages):
        if not crashes:
            crashes.append(1)
            raise RuntimeError("injected crash")
        return await real_send(self, messages)

    monkeypatch.setattr(HTTPSink, "send", crash_once)
    registry = await start_registry(nursery, events_config(tmp_path, http_sink(sink), queue=queue))
    await push(registry, "crash/app", "v1")
    events = await sink.wait_for(lambda evs: len(evs) == 4)
    assert [e["type"] for e in events][-1] == "zotregistry.image.updated"
    assert any("delivery task crashed; restarting" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("sink_config", "key"),
    [
        ({"address": "http://127.0.0.1:9/x"}, "extensions.events.sinks[0].type"),
        ({"type": "smtp", "address": "mailto:x"}, "extensions.events.sinks[0].type"),
        (
            {"type": "nats", "address": "nats://127.0.0.1:4222"},
            "extensions.events.sinks[0].channel",
        ),
        ({"type": "http"}, "extensions.events.sinks[0].address"),
        (
            {"type": "http", "address": "http://x", "format": "xml"},
            "extensions.events.sinks[0].format",
        ),
        (
            {"type": "http", "address": "http://x", "timeout": "soon"},
            "extensions.events.sinks[0].timeout",
        ),
        (
            {"type": "http", "address": "http://x", "tls": {"caFile": "/nonexistent/ca.pem"}},
            "extensions.events.sinks[0].tls.caFile",
        ),
        (
            {"type": "http", "address": "http://x", "filter": {"actions": ["image.exploded"]}},
            "extensions.events.sinks[0].filter.actions[0]",
        ),
    ],
)
def test_misconfigured_sink_refuses_to_start(tmp_path, sink_config, key):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "storage": {"rootDirectory": str(tmp_path / "data")},
                "http": {"address": "127.0.0.1", "port": 0},
                "extensions": {"events": {"enable": True, "sinks": [sink_config]}},
            }
        )
    )
    for verb in ("verify", "serve"):
        result = subprocess.run(
            [sys.executable, "-m", "registry_trio", verb, "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, result.stderr
        assert key in result.stderr


async def test_queue_that_cannot_commit_fails_the_append(tmp_path):
    from registry_trio.events import Action, Event, Source, Target
    from registry_trio.events.queue import Outbox

    outbox = Outbox(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        event = Event(Action.BLOB_PUSHED, Target(repository="r"), Source("a", "i"))
        await outbox.append([(event, ["s"])])
        # A read-only database is what a full or broken disk looks like to SQLite.
        outbox._conn.execute("PRAGMA query_only=1")
        with pytest.raises(QueueError, match="could not commit"):
            await outbox.append([(event, ["s"])])
        outbox.close()


ALL_ACTIONS = [
    "manifest.pushed",
    "manifest.deleted",
    "tag.deleted",
    "repository.created",
    "blob.pushed",
    "blob.mounted",
    "blob.deleted",
    "manifest.pulled",
    "blob.pulled",
]


async def every_action(registry) -> tuple:
    """Push, pull, mount, delete a tag, a manifest and a blob: one of each action."""
    image = make_image((1024,))
    layer = image.layers[0].digest
    async with httpx.AsyncClient(base_url=registry.url) as http:
        client = RegistryClient(registry.url, client=http)
        await client.push_image("act/src", "v1", image)
        await client.pull_image("act/src", "v1")
        mounted = await http.post(
            "/v2/act/dst/blobs/uploads/", params={"mount": layer, "from": "act/src"}
        )
        assert mounted.status_code == 201, mounted.text
        assert (await http.delete("/v2/act/src/manifests/v1")).status_code == 202
        assert (await http.delete(f"/v2/act/src/manifests/{image.digest}")).status_code == 202
        assert (await http.delete(f"/v2/act/dst/blobs/{layer}")).status_code == 202
    return image, layer


async def test_every_action_has_its_documented_type_and_distribution_action(
    nursery, tmp_path, sink
):
    distribution = HTTPSinkServer()
    await distribution.start(nursery)
    wanted = {"actions": ALL_ACTIONS}  # pull events included: they are opt-in
    registry = await start_registry(
        nursery,
        events_config(
            tmp_path,
            http_sink(sink, filter=wanted),
            http_sink(distribution, format="distribution", filter=wanted),
        ),
    )
    image, layer = await every_action(registry)
    events = await sink.wait_for(lambda evs: len(evs) == 11)
    assert [(e["type"], e["subject"]) for e in events] == [
        ("zotregistry.blob.pushed", f"act/src@{image.config.digest}"),
        ("zotregistry.blob.pushed", f"act/src@{layer}"),
        ("zotregistry.repository.created", "act/src"),
        ("zotregistry.image.updated", "act/src:v1"),
        ("zotregistry.image.pulled", "act/src:v1"),
        ("zotregistry.blob.pulled", f"act/src@{image.config.digest}"),
        ("zotregistry.blob.pulled", f"act/src@{layer}"),
        ("zotregistry.blob.mounted", f"act/dst@{layer}"),
        ("zotregistry.image.deleted", "act/src:v1"),  # tag.deleted: the tag only
        ("zotregistry.image.deleted", f"act/src@{image.digest}"),  # manifest.deleted
        ("zotregistry.blob.deleted", f"act/dst@{layer}"),
    ]
    assert events[7]["data"]["fromRepository"] == "act/src"
    assert events[8]["data"]["reference"] == "v1"
    assert events[8]["data"]["digest"] == events[9]["data"]["digest"] == image.digest

    # distribution's verbs; repository.created has none and is not sent, listed or not.
    dist = await distribution.wait_for(lambda evs: len(evs) == 10)
    assert [(e["action"], e["target"]["repository"]) for e in dist] == [
        ("push", "act/src"),
        ("push", "act/src"),
        ("push", "act/src"),
        ("pull", "act/src"),
        ("pull", "act/src"),
        ("pull", "act/src"),
        ("mount", "act/dst"),
        ("delete", "act/src"),
        ("delete", "act/src"),
        ("delete", "act/dst"),
    ]
    assert dist[6]["target"]["fromRepository"] == "act/src"
    assert dist[7]["target"]["tag"] == "v1"
    # Both sinks got the same events, under the same ids.
    assert [e["id"] for e in dist] == [e["id"] for e in events if "repository" not in e["type"]]


async def test_http_sink_filters_and_pull_events_only_on_request(nursery, tmp_path):
    filters = {
        "everything": {},
        "team-manifests": {"actions": ["manifest.pushed"], "repositories": ["team/*"]},
        "pulls": {"actions": ["manifest.pulled", "blob.pulled"]},
        "no-manifests": {"ignoreMediaTypes": ["application/vnd.oci.image.manifest.v1+json"]},
    }
    receivers = {name: HTTPSinkServer() for name in filters}
    for receiver in receivers.values():
        await receiver.start(nursery)
    registry = await start_registry(
        nursery,
        events_config(
            tmp_path,
            *(http_sink(receivers[name], name=name, filter=f) for name, f in filters.items()),
        ),
    )
    await push(registry, "team/app", "v1")
    await push(registry, "other/app", "v1")
    async with httpx.AsyncClient(base_url=registry.url) as http:
        await RegistryClient(registry.url, client=http).pull_image("team/app", "v1")
    for name in filters:
        await counts_until(registry.config, name, lambda c: c.pending == 0 and c.delivered > 0)

    got = {
        name: [(e["type"], e["data"]["name"]) for e in receiver.events()]
        for name, receiver in receivers.items()
    }
    pushed = [
        (f"zotregistry.{t}", repository)
        for repository in ("team/app", "other/app")
        for t in ("blob.pushed", "blob.pushed", "repository.created", "image.updated")
    ]
    assert got["everything"] == pushed  # no filter: every push event, and no pull event
    assert got["team-manifests"] == [("zotregistry.image.updated", "team/app")]
    assert got["pulls"] == [
        ("zotregistry.image.pulled", "team/app"),
        ("zotregistry.blob.pulled", "team/app"),
        ("zotregistry.blob.pulled", "team/app"),
    ]
    assert got["no-manifests"] == [e for e in pushed if e[0] != "zotregistry.image.updated"]


async def test_concurrency_sends_in_parallel_on_up_to_that_many_connections(
    nursery, tmp_path, sink
):
    sink.delay = 0.5  # each request takes a while: parallel loops overlap
    registry = await start_registry(
        nursery, events_config(tmp_path, http_sink(sink, concurrency=3, timeout="5s"))
    )
    for tag in ("v1", "v2", "v3"):
        await push(registry, "par/app", tag)
    # A send that outlives the 5 s timeout on a loaded machine is sent again (at least once):
    # wait for every event, not for exactly ten deliveries.
    events = await sink.wait_for(lambda evs: len({e["id"] for e in evs}) >= 10)
    assert len({e["id"] for e in events}) == 10
    connections = {request.client for request in sink.requests}
    assert None not in connections
    assert 2 <= len(connections) <= 3, connections
    counts = await counts_until(registry.config, sink.url, lambda c: c.pending == 0)
    assert counts.delivered == 10


async def test_type_prefix_names_the_cloudevents_types(nursery, tmp_path, sink):
    registry = await start_registry(
        nursery, events_config(tmp_path, http_sink(sink), typePrefix="example.registry")
    )
    await push(registry, "prefix/app", "v1")
    events = await sink.wait_for(lambda evs: len(evs) == 4)
    assert [e["type"] for e in events] == [
        "example.registry.blob.pushed",
        "example.registry.blob.pushed",
        "example.registry.repository.created",
        "example.registry.image.updated",
    ]


@pytest.mark.parametrize("fmt", ["cloudevents-batch", "distribution"])
async def test_batches_hold_at_most_max_events(nursery, tmp_path, sink, fmt):
    registry = await start_registry(
        nursery,
        events_config(tmp_path, http_sink(sink, format=fmt, batch={"maxEvents": 3})),
    )
    await sink.stop()  # a backlog builds up: the sink then drains it in full batches
    for tag in ("v1", "v2", "v3"):
        await push(registry, "batch/app", tag)
    await counts_until(registry.config, sink.url, lambda c: c.failed_attempts >= 1)
    await sink.start(nursery)
    total = 9 if fmt == "distribution" else 10  # distribution has no repository.created
    events = await sink.wait_for(lambda evs: len(evs) == total)
    sizes = [len(r.json()["events"] if fmt == "distribution" else r.json()) for r in sink.received]
    assert sum(sizes) == total and max(sizes) == 3, sizes
    assert len({e["id"] for e in events}) == total


@pytest.mark.parametrize("actor", [None, ("alice", "basic")])
def test_structured_and_batch_bodies_are_the_documents_the_sdk_writes(actor):
    """The JSON encoders build the document themselves (orjson, one call); it must be the
    one cloudevents' JSONFormat writes for the same CloudEvent, key order and time included."""
    from datetime import UTC, datetime

    from registry_trio.events import Action, Actor, Event, RequestInfo, Source, Target
    from registry_trio.events.formats import cloudevent, encoder_for

    events = [
        Event(
            Action.MANIFEST_PUSHED,
            Target(
                "team/app",
                digest="sha256:" + "a" * 64,
                media_type="application/vnd.oci.image.manifest.v1+json",
                size=321,
                tag="v1",
                url="http://127.0.0.1:5000/v2/team/app/manifests/sha256:" + "a" * 64,
                references=({"mediaType": "x", "digest": "sha256:" + "b" * 64, "size": 1},),
                manifest='{"schemaVersion": 2, "note": "caf\u00e9 \u2028"}',
            ),
            Source("127.0.0.1:5000", "instance"),
            Actor(*actor) if actor else None,
            RequestInfo("rid", "127.0.0.1:1", "127.0.0.1:5000", "PUT", "agent/\xe9"),
            time=when,
        )
        for when in (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), datetime.now(UTC))
    ]
    sdk = [ce_http.to_structured(cloudevent(e, "zotregistry"), JSONFormat()) for e in events]
    for event, expected in zip(events, sdk, strict=True):
        headers, body = encoder_for("cloudevents")([event], "zotregistry")
        assert headers == dict(expected.headers)
        assert list(json.loads(body).items()) == list(json.loads(expected.body).items())
    headers, body = encoder_for("cloudevents-batch")(events, "zotregistry")
    assert headers == {"content-type": "application/cloudevents-batch+json"}
    assert json.loads(body) == [json.loads(m.body) for m in sdk]


def test_backoff_after_thousands_of_failed_attempts_stays_within_its_cap():
    from registry_trio.events.delivery import full_jitter

    # An outage long enough for 1026 attempts used to crash the sink's task on every retry.
    for attempt in (1, 2, 1025, 1026, 5000, 10**6):
        assert 0 <= full_jitter(attempt, 0.5, 60.0) <= 60.0
