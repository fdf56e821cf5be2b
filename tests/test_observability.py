"""Metrics and logs: what an operator scrapes and greps, checked by value."""

from __future__ import annotations

import base64
import collections
import json
import re
import subprocess
import sys
import time

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from bench.registry_client import RegistryClient, make_image
from tests.api_helpers import OCI_MANIFEST, digest_of, image_manifest, random_blob
from tests.conftest import events_config, make_config, start_registry
from tests.procs import server_process, write_config
from tests.test_auth import PASSWORDS, write_htpasswd
from tests.waiting import eventually


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text: (sample name, sorted labels) -> value."""
    samples = {}
    for metric in text_string_to_metric_families(text):
        for sample in metric.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def scrape(http: httpx.AsyncClient) -> dict[tuple[str, tuple], float]:
    response = await http.get("/metrics")
    assert response.status_code == 200
    return parse(response.text)


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_with_pushes_and_deliveries(nursery, tmp_path, sink):
    registry = await start_registry(
        nursery, events_config(tmp_path, {"type": "http", "address": sink.url})
    )
    async with httpx.AsyncClient(base_url=registry.url) as http:
        before = await scrape(http)
        put = {"route": "/v2/{name}/manifests/{reference}", "method": "PUT", "status": "201"}
        assert value(before, "registry_http_requests_total", **put) == 0
        client = RegistryClient(registry.url, client=http)
        images = [make_image((1000,)) for _ in range(3)]
        for i, image in enumerate(images):
            await client.push_image("metrics/app", f"v{i}", image)
        await sink.wait_for(lambda evs: len(evs) == 10)  # 3 x (2 blobs + manifest) + created
        # The sink has the events before the worker records its 2xx: wait for the ack too.
        await eventually(
            lambda: scrape(http),
            lambda s: value(s, "registry_events_delivered_total", sink=sink.url) == 10,
        )

        upload = await http.post("/v2/metrics/app/blobs/uploads/")
        during = await scrape(http)
        await http.delete(upload.headers["Location"])
        after = await scrape(http)

    assert value(during, "registry_http_requests_total", **put) == 3
    assert (
        value(
            during, "registry_http_request_duration_seconds_count", route=put["route"], method="PUT"
        )
        == 3
    )
    pushed_bytes = sum(len(i.manifest) + len(i.config.data) + 1000 for i in images)
    assert value(during, "registry_http_received_bytes_total") >= pushed_bytes
    assert value(during, "registry_upload_sessions_open") == 1
    assert value(after, "registry_upload_sessions_open") == 0
    assert value(during, "registry_events_delivered_total", sink=sink.url) == 10
    assert value(during, "registry_events_pending", sink=sink.url) == 0
    assert value(during, "registry_events_dead", sink=sink.url) == 0
    assert value(during, "registry_events_delivery_latency_seconds_count", sink=sink.url) == 10
    # Every event was committed by some group commit; there were 3 manifest + 6 blob pushes.
    assert value(during, "registry_events_commit_batch_size_count") >= 9
    assert value(during, "registry_events_commit_batch_size_sum") >= 9


def family(samples, name) -> dict[tuple, float]:
    """Every sample called ``name``: its sorted labels -> value."""
    return {labels: v for (n, labels), v in samples.items() if n == name}


class Traffic:
    """The requests a test makes, tallied the way ``/metrics`` must count them.

    Every request goes through here, scrapes included, so the registry's counters can be
    compared with the tally for equality: requests by route, method and status, request body
    bytes received and response body bytes sent (a scrape's own body is counted once it has
    been sent, so it shows in the next scrape).
    """

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.requests: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.received = 0
        self.sent = 0

    async def __call__(
        self, route: str, method: str, url: str, status: int, content: bytes = b"", **kwargs
    ) -> httpx.Response:
        response = await self.http.request(method, url, content=content, **kwargs)
        assert response.status_code == status, response.text
        # What crossed the wire is what the client got: nothing was compressed on the way.
        assert "content-encoding" not in response.headers
        self.requests[(route, method, str(status))] += 1
        self.received += len(content)
        self.sent += len(response.content)
        return response

    async def scrape(self) -> dict[tuple[str, tuple], float]:
        """Scrape, and check every HTTP figure against the tally of what came before."""
        response = await self("/metrics", "GET", "/metrics", 200)
        samples = parse(response.text)
        # This scrape is observed after its body was sent: take it out of the tally again.
        requests = self.requests - collections.Counter({("/metrics", "GET", "200"): 1})
        sent = self.sent - len(response.content)
        expected = {
            (("method", m), ("route", r), ("status", s)): float(n)
            for (r, m, s), n in requests.items()
        }
        assert family(samples, "registry_http_requests_total") == expected
        by_route: collections.Counter[tuple[str, str]] = collections.Counter()
        for (route, method, _), n in requests.items():
            by_route[(route, method)] += n
        counts = family(samples, "registry_http_request_duration_seconds_count")
        assert counts == {(("method", m), ("route", r)): float(n) for (r, m), n in by_route.items()}
        for (route, method), n in by_route.items():
            labels = {"route": route, "method": method}
            inf = value(
                samples, "registry_http_request_duration_seconds_bucket", le="+Inf", **labels
            )
            assert inf == n
            assert value(samples, "registry_http_request_duration_seconds_sum", **labels) > 0
            buckets = sorted(
                (float(dict(key)["le"]), v)
                for (sample, key), v in samples.items()
                if sample == "registry_http_request_duration_seconds_bucket"
                and {k: x for k, x in key if k != "le"} == labels
            )
            assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        assert value(samples, "registry_http_received_bytes_total") == self.received
        assert value(samples, "registry_http_sent_bytes_total") == sent
        return samples


async def test_http_metrics_count_every_request_its_bytes_and_open_upload_sessions(
    nursery, tmp_path
):
    registry = await start_registry(nursery, make_config(tmp_path))
    name = "metrics/http"
    uploads = "/v2/{name}/blobs/uploads/"
    upload = "/v2/{name}/blobs/uploads/{id}"
    blobs = "/v2/{name}/blobs/{digest}"
    manifests = "/v2/{name}/manifests/{reference}"
    layer, config = random_blob(3000), random_blob(700)
    manifest = image_manifest(config, [layer])
    async with httpx.AsyncClient(base_url=registry.url) as http:
        call = Traffic(http)
        first = await call.scrape()  # nothing yet: every figure is 0 (checked against the tally)
        assert value(first, "registry_upload_sessions_open") == 0
        assert family(first, "registry_http_requests_total") == {}

        # Push: a session (POST, PATCH, status GET, PUT), a cancelled session, a monolithic
        # POST and the manifest. The open-session gauge follows POST, completion and cancel.
        opened = await call(uploads, "POST", f"/v2/{name}/blobs/uploads/", 202)
        layer_at = opened.headers["Location"]
        assert value(await call.scrape(), "registry_upload_sessions_open") == 1
        await call(
            upload,
            "PATCH",
            layer_at,
            202,
            layer[:1000],
            headers={"Content-Type": "application/octet-stream", "Content-Range": "0-999"},
        )
        await call(upload, "GET", layer_at, 204)
        cancelled = await call(uploads, "POST", f"/v2/{name}/blobs/uploads/", 202)
        assert value(await call.scrape(), "registry_upload_sessions_open") == 2
        await call(upload, "DELETE", cancelled.headers["Location"], 204)
        assert value(await call.scrape(), "registry_upload_sessions_open") == 1
        await call(
            upload,
            "PUT",
            layer_at,
            201,
            layer[1000:],
            params={"digest": digest_of(layer)},
            headers={"Content-Type": "application/octet-stream"},
        )
        assert value(await call.scrape(), "registry_upload_sessions_open") == 0
        await call(
            uploads,
            "POST",
            f"/v2/{name}/blobs/uploads/",
            201,
            config,
            params={"digest": digest_of(config)},
        )
        await call(
            manifests,
            "PUT",
            f"/v2/{name}/manifests/v1",
            201,
            manifest,
            headers={"Content-Type": OCI_MANIFEST},
        )
        pushed = await call.scrape()
        assert value(pushed, "registry_upload_sessions_open") == 0
        assert call.received == len(layer) + len(config) + len(manifest)

        # Pull: what was sent is what the client received, byte for byte.
        sent_before = call.sent
        got = await call(manifests, "GET", f"/v2/{name}/manifests/v1", 200)
        assert got.content == manifest
        await call(blobs, "HEAD", f"/v2/{name}/blobs/{digest_of(layer)}", 200)
        got = await call(blobs, "GET", f"/v2/{name}/blobs/{digest_of(layer)}", 200)
        assert got.content == layer
        got = await call(
            blobs,
            "GET",
            f"/v2/{name}/blobs/{digest_of(config)}",
            206,
            headers={"Range": "bytes=100-299"},
        )
        assert got.content == config[100:300]
        assert call.sent - sent_before == len(manifest) + len(layer) + 200
        # Other routes, and statuses other than 2xx, each under their own labels.
        await call(manifests, "GET", f"/v2/{name}/manifests/missing", 404)
        await call(manifests, "HEAD", f"/v2/{name}/manifests/v1", 200)  # headers only
        # HEAD errors, raw and Quart routes alike: their bodies never leave, so count nothing.
        await call(manifests, "HEAD", f"/v2/{name}/manifests/missing", 404)
        await call(blobs, "HEAD", f"/v2/{name}/blobs/{digest_of(b'absent')}", 404)
        await call("/v2/", "HEAD", "/v2/", 200)
        await call("/v2/{name}/tags/list", "HEAD", f"/v2/{name}/tags/list", 200)
        await call(blobs, "GET", f"/v2/{name}/blobs/{digest_of(b'absent')}", 404)
        await call("/v2/", "GET", "/v2/", 200)
        await call("/v2/{name}/tags/list", "GET", f"/v2/{name}/tags/list", 200)
        await call("/v2/_catalog", "GET", "/v2/_catalog", 200)
        await call(
            "/v2/{name}/referrers/{digest}",
            "GET",
            f"/v2/{name}/referrers/{digest_of(manifest)}",
            200,
        )
        await call("other", "GET", "/nowhere", 404)
        last = await call.scrape()
    assert value(last, "registry_upload_sessions_open") == 0
    put = {"route": manifests, "method": "PUT", "status": "201"}
    assert value(last, "registry_http_requests_total", **put) == 1
    assert (
        value(last, "registry_http_requests_total", route=manifests, method="GET", status="404")
        == 1
    )
    assert (
        value(last, "registry_http_request_duration_seconds_count", route=blobs, method="GET") == 3
    )
    # Events are off here: no sink is labelled and the queue never committed.
    assert not [labels for _, labels in last if dict(labels).get("sink")]
    assert value(last, "registry_events_commit_batch_size_count") == 0
    assert value(last, "registry_events_commit_seconds_count") == 0


async def test_sink_metrics_follow_deliveries_an_outage_and_dead_letters(nursery, tmp_path, sink):
    # Credentials in the address: the sink is named, and labelled, by its address without them.
    address = sink.url.replace("http://", "http://hook-user:hook-pass-3141@")
    config = events_config(
        tmp_path,
        {
            "type": "http",
            "address": address,
            "retry": {"initialBackoff": "50ms", "maxBackoff": "200ms"},
        },
    )
    assert config.extensions.events.sinks[0].name == sink.url
    registry = await start_registry(nursery, config)
    label = {"sink": sink.url}
    texts: list[str] = []

    def figures(samples) -> dict[str, float]:
        return {
            "pending": value(samples, "registry_events_pending", **label),
            "delivered": value(samples, "registry_events_delivered_total", **label),
            "failed": value(samples, "registry_events_failed_attempts_total", **label),
            "dead": value(samples, "registry_events_dead", **label),
            "oldest": value(samples, "registry_events_oldest_pending_age_seconds", **label),
            "latencies": value(samples, "registry_events_delivery_latency_seconds_count", **label),
        }

    async with httpx.AsyncClient(base_url=registry.url) as http:

        async def scrape_texts():
            response = await http.get("/metrics")
            assert response.status_code == 200
            texts.append(response.text)
            return parse(response.text)

        async def until(predicate):
            return await eventually(scrape_texts, lambda s: predicate(figures(s)))

        client = RegistryClient(registry.url, client=http)
        start = await scrape_texts()
        assert figures(start) == dict.fromkeys(figures(start), 0.0)
        assert ("registry_events_pending", (("sink", sink.url),)) in start  # present at 0

        # Delivered: 2 blobs, the repository and the manifest.
        pushed_at = time.time()
        await client.push_image("metrics/sink", "v1", make_image((500,)))
        await sink.wait_for(lambda evs: len(evs) == 4)
        # The receiver has them before the worker records its 2xx: wait on the metric.
        done = await until(lambda f: f["delivered"] == 4 and f["latencies"] == 4)
        took = time.time() - pushed_at
        assert figures(done) == {
            "pending": 0,
            "delivered": 4,
            "failed": 0,
            "dead": 0,
            "oldest": 0,
            "latencies": 4,
        }
        assert (
            value(done, "registry_events_delivery_latency_seconds_bucket", le="+Inf", **label) == 4
        )
        assert 0 < value(done, "registry_events_delivery_latency_seconds_sum", **label) <= 4 * took
        # The password was used (basic auth), so its absence from the metrics below means something.
        credentials = base64.b64encode(b"hook-user:hook-pass-3141").decode()
        assert sink.received[0].headers["authorization"] == f"Basic {credentials}"

        # Outage: the events wait, attempts fail, the oldest pending event ages.
        await sink.stop()
        before_push = time.time()
        await client.push_image("metrics/sink", "v2", make_image((500,)))
        waiting = await until(lambda f: f["failed"] >= 1)
        scraped = time.time()
        down = figures(waiting)
        assert down["pending"] == 3 and down["delivered"] == 4 and down["latencies"] == 4
        assert down["dead"] == 0
        # The oldest event was created during the push, its age read during the last scrape.
        assert 0 < down["oldest"] <= scraped - before_push
        older = await until(lambda f: f["oldest"] > down["oldest"])
        assert figures(older)["pending"] == 3 and figures(older)["delivered"] == 4

        # Back up: all delivered, nothing pending, no age; one latency per delivered event.
        await sink.start(nursery)
        await sink.wait_for(lambda evs: len(evs) == 7)
        recovered = figures(await until(lambda f: f["delivered"] == 7 and f["latencies"] == 7))
        assert recovered["pending"] == 0 and recovered["oldest"] == 0
        assert recovered["latencies"] == 7 and recovered["dead"] == 0
        assert recovered["failed"] >= down["failed"]
        (status,) = (await http.get("/_registry/events/sinks")).json()["sinks"]
        assert status["failedAttempts"] == recovered["failed"]
        assert status["delivered"] == 7

        # Dead letter: a permanent 400 buries the event; one more failed attempt, no delivery.
        sink.status = 400
        blob = random_blob(300)
        response = await http.post(
            "/v2/metrics/sink/blobs/uploads/", params={"digest": digest_of(blob)}, content=blob
        )
        assert response.status_code == 201
        dead = figures(await until(lambda f: f["dead"] == 1))
        assert dead == {
            "pending": 0,
            "delivered": 7,
            "failed": recovered["failed"] + 1,
            "dead": 1,
            "oldest": 0,
            "latencies": 7,
        }
        assert len(sink.requests) == len(sink.received) + 1  # the receiver did answer 400

    # No password anywhere in what was scraped; every sink label is the address without it.
    for text in texts:
        assert "hook-pass-3141" not in text and "hook-user" not in text
        for metric in text_string_to_metric_families(text):
            for sample in metric.samples:
                for key, labelled in sample.labels.items():
                    assert "@" not in labelled and "hook-pass" not in labelled
                    if key == "sink":
                        assert labelled == sink.url


async def test_commit_metrics_count_each_queue_transaction(nursery, tmp_path, sink):
    # The receiver refuses the first event with Retry-After past the test: after that one
    # failed attempt the (ordered) sink waits, so every later commit is a push's append.
    sink.status, sink.retry_after = 503, "3600"
    config = events_config(
        tmp_path,
        {
            "type": "http",
            "address": sink.url,
            "retry": {"initialBackoff": "1h", "maxBackoff": "1h"},
        },
    )
    registry = await start_registry(nursery, config)
    name = "metrics/commits"
    label = {"sink": sink.url}

    def commits(samples) -> dict[str, float]:
        return {
            "batches": value(samples, "registry_events_commit_batch_size_count"),
            "writes": value(samples, "registry_events_commit_batch_size_sum"),
            "alone": value(samples, "registry_events_commit_batch_size_bucket", le="1.0"),
            "timed": value(samples, "registry_events_commit_seconds_count"),
            "seconds": value(samples, "registry_events_commit_seconds_sum"),
            "pending": value(samples, "registry_events_pending", **label),
        }

    async def push_blob(http, data: bytes) -> None:
        response = await http.post(
            f"/v2/{name}/blobs/uploads/", params={"digest": digest_of(data)}, content=data
        )
        assert response.status_code == 201, response.text

    async with httpx.AsyncClient(base_url=registry.url) as http:
        start = commits(await scrape(http))
        assert start == dict.fromkeys(start, 0.0)
        assert value(await scrape(http), "registry_events_commit_batch_size_bucket", le="+Inf") == 0

        # One append, then the failed attempt recorded: two transactions of one write each.
        await push_blob(http, random_blob(100))
        first = await eventually(
            lambda: scrape(http),
            # The commit is read back (counts) after the histograms were collected: wait for
            # both to show it.
            lambda s: (
                value(s, "registry_events_failed_attempts_total", **label) == 1
                and value(s, "registry_events_commit_batch_size_count") >= 2
            ),
        )
        one = commits(first)
        assert one["batches"] == one["writes"] == one["alone"] == one["timed"] == 2
        assert one["seconds"] > 0 and one["pending"] == 1
        assert len(sink.requests) == 1

        # Sequential pushes commit alone: three transactions of one write.
        layers = [random_blob(200) for _ in range(3)]
        for layer in layers:
            await push_blob(http, layer)
        three = commits(await scrape(http))
        assert three["batches"] == three["writes"] == three["alone"] == three["timed"] == 5
        assert three["seconds"] > one["seconds"] and three["pending"] == 4

        # A manifest push records its events (repository created, manifest pushed) in one
        # transaction: one write, two events.
        config_blob = random_blob(50)
        await push_blob(http, config_blob)
        response = await http.put(
            f"/v2/{name}/manifests/v1",
            content=image_manifest(config_blob, layers),
            headers={"Content-Type": OCI_MANIFEST},
        )
        assert response.status_code == 201, response.text
        manifest = commits(await scrape(http))
        assert manifest["batches"] == manifest["writes"] == manifest["alone"] == 7
        assert manifest["timed"] == 7
        assert manifest["pending"] == 4 + 1 + 2

        # Concurrent pushes: every write committed once, however the writer grouped them.
        async with trio.open_nursery() as pushes:
            for _ in range(16):
                pushes.start_soon(push_blob, http, random_blob(100))
        grouped = commits(await scrape(http))
        assert grouped["writes"] == manifest["writes"] + 16
        assert manifest["batches"] < grouped["batches"] <= manifest["batches"] + 16
        assert grouped["timed"] == grouped["batches"]
        assert grouped["pending"] == 7 + 16
        assert len(sink.requests) == 1  # still waiting for the Retry-After


async def test_json_access_lines_carry_the_request_id_and_no_secrets(tmp_path):
    htpasswd = write_htpasswd(tmp_path / "htpasswd")
    config = write_config(
        tmp_path,
        log={"level": "info", "format": "json"},
        http={"address": "127.0.0.1", "port": 0, "auth": {"htpasswd": {"path": str(htpasswd)}}},
    )
    async with server_process(config) as server:
        async with httpx.AsyncClient(
            base_url=server.url, auth=("alice", PASSWORDS["alice"])
        ) as http:
            response = await RegistryClient(server.url, client=http).push_image(
                "logs/app", "v1", make_image((300,))
            )
            await http.get("/v2/", auth=("alice", "not-her-password-42"))
        rid = response.headers["X-Request-Id"]
        await server.wait_for_output(rid.encode())
        await server.terminate()
    lines = [
        json.loads(line) for line in server.current_output.splitlines() if line.startswith("{")
    ]
    (access,) = [line for line in lines if line.get("request_id") == rid]
    assert access["logger"] == "registry_trio.access"
    assert access["method"] == "PUT" and access["path"] == "/v2/logs/app/manifests/v1"
    assert access["status"] == 201 and access["actor"] == "alice"
    assert access["addr"].startswith("127.0.0.1:") and access["duration_ms"] > 0
    assert any(line["message"].startswith("authentication failed") for line in lines)
    output = server.current_output
    assert PASSWORDS["alice"] not in output and "not-her-password-42" not in output


async def test_log_output_goes_to_the_configured_file(tmp_path):
    log_file = tmp_path / "logs" / "registry.log"
    log_file.parent.mkdir()
    config = write_config(tmp_path, log={"level": "info", "output": str(log_file)})

    async def logged() -> str:
        return await trio.to_thread.run_sync(
            lambda: log_file.read_text() if log_file.exists() else ""
        )

    command = [sys.executable, "-m", "registry_trio", "serve", "-c", str(config)]
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        # The console is silent: even the address it listens on is in the file.
        text = await eventually(logged, lambda t: "listening on" in t)
        url = re.search(r"listening on (http://\S+)", text)[1]
        async with httpx.AsyncClient(base_url=url) as http:
            rid = (await http.get("/v2/")).headers["X-Request-Id"]
        text = await eventually(logged, lambda t: rid in t)
    finally:
        process.terminate()
        with trio.fail_after(20):
            await process.wait()
    console = await process.stdout.receive_some(1 << 16)
    (line,) = [line for line in text.splitlines() if rid in line]
    assert "registry_trio.access" in line and "GET /v2/ 200" in line
    assert rid.encode() not in console and b"listening on" not in console
