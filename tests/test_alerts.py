"""deploy/prometheus/alerts.yml: valid rules (``promtool check rules``), each alert firing on
synthetic series and not on its neighbour (``promtool test rules``), and every metric it
names served by a real registry's ``/metrics``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import trio

from bench.registry_client import RegistryClient, make_image
from tests.client_tools import require
from tests.conftest import events_config, start_registry

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
# A metric name in a rule's expression; a histogram's series by its family's name.
METRIC = re.compile(r"\bregistry_[a-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


async def promtool(*args: str) -> subprocess.CompletedProcess[bytes]:
    binary = require("promtool", "prometheus")
    with trio.fail_after(60):
        return await trio.run_process(
            [binary, *args], cwd=RULES, capture_stdout=True, capture_stderr=True, check=False
        )


async def test_the_rules_are_valid():
    result = await promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert b"SUCCESS: 5 rules found" in result.stdout


async def test_each_alert_fires_on_its_synthetic_series():
    result = await promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    tested = set(re.findall(r"alertname: (\w+)", (RULES / "alerts_test.yml").read_text()))
    defined = set(re.findall(r"- alert: (\w+)", (RULES / "alerts.yml").read_text()))
    assert tested == defined


async def test_every_metric_the_rules_name_is_served(nursery, tmp_path, sink):
    registry = await start_registry(
        nursery, events_config(tmp_path, {"type": "http", "address": sink.url, "name": "audit"})
    )
    async with httpx.AsyncClient(base_url=registry.url) as http:
        # A push, so that every family has a sample: requests, commits, deliveries.
        await RegistryClient(registry.url, client=http).push_image("a/b", "v1", make_image())
        await sink.wait_for(bool)
        scrape = (await http.get("/metrics")).text
    served = {line.split("{")[0].split(" ")[0] for line in scrape.splitlines() if line[:1] != "#"}
    named = set(METRIC.findall((RULES / "alerts.yml").read_text()))
    assert len(named) == 6
    for name in named:
        family = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), name)
        assert name in served or f"{family}_bucket" in served, name
