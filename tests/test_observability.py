"""Metrics and logs: what an operator scrapes and greps, checked by value."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from registry_trio.client import RegistryClient, make_image
from tests.conftest import events_config, start_registry
from tests.procs import server_process, write_config
from tests.test_auth import PASSWORDS, write_htpasswd
from tests.waiting import eventually


async def scrape(http: httpx.AsyncClient) -> dict[tuple[str, tuple], float]:
    response = await http.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


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
