"""One process against several: push rate, CPU, queue commits and event lag, in one run.

What it measures
    registry-trio started by this script with events on (the SQLite outbox, one HTTP sink at
    bench/receiver.py --record), once with ``http.workers: 1`` and once with each count in
    --workers, round after round (--rounds) so that drift on a shared machine hits them
    alike. Per configuration, over all rounds:

      images/s          N small images (one 4 KiB layer) at C concurrent connections
      CPU ms/image      user + system CPU of the server's processes (supervisor and workers)
      commit ms         mean outbox transaction, fsync included, from /metrics
                        (registry_events_commit_seconds): what several writers' waiting for
                        SQLite's write lock adds
      lag p50/p99 ms    then --lag-count images started at --lag-rate per second (below
                        saturation, so no backlog builds): from the manifest PUT's 2xx at
                        the client to the event's arrival at the receiver (wall clock, first
                        copy): the wake of the delivering process across processes
      spread            the share of requests each worker served (access log), the most
                        loaded first: how evenly the shared listening socket spreads load
      errors            pushes answered other than 201 (a commit refused as "database is
                        locked" would show here)

How to run
    .venv/bin/python bench/workers.py                    # N=300, C=8, workers 1 vs 2
    .venv/bin/python bench/workers.py -n 1000 -c 16 --workers 2 4 --rounds 3

It always starts its own servers: --url is not supported.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from common import (
    ServerProcess,
    base_parser,
    emit_json,
    machine_info,
    percentiles,
    positive_int,
    print_header,
)
from receiver import Receiver
from registry_client import Image, RegistryClient, make_image

_COMMIT = re.compile(r"^registry_events_commit_seconds_(sum|count) (\S+)$", re.MULTILINE)
_ACCESS = re.compile(r"\[(worker \d+)\] registry_trio\.access ")


@dataclass
class _Acknowledged:
    """The 2xx wall time of each push by request id, and how many were answered otherwise."""

    at: dict[str, float] = field(default_factory=dict)
    errors: int = 0

    async def push(self, client: RegistryClient, repository: str, tag: str, image: Image) -> None:
        response = await client.push_image(repository, tag, image)
        if response.status_code == 201:
            self.at[response.headers["X-Request-Id"]] = time.time()
        else:
            self.errors += 1


async def _push(url: str, count: int, concurrency: int) -> tuple[float, _Acknowledged]:
    """Push ``count`` images on ``concurrency`` connections as fast as they are answered."""
    images = [make_image((4096,)) for _ in range(count)]
    acknowledged = _Acknowledged()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        client = RegistryClient(url, client=http)
        indexes = iter(range(count))

        async def worker() -> None:
            for i in indexes:
                await acknowledged.push(client, f"bench-{i % 8}", f"v{i}", images[i])

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        return time.perf_counter() - started, acknowledged


async def _push_paced(url: str, count: int, rate: float) -> _Acknowledged:
    """``count`` images started at ``rate`` per second whatever the answers' pace: the lag
    then measures the wake and the send, not a backlog of a saturated sink."""
    images = [make_image((4096,)) for _ in range(count)]
    acknowledged = _Acknowledged()
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        client = RegistryClient(url, client=http)
        async with trio.open_nursery() as nursery:
            for i in range(count):
                await trio.sleep(1 / rate)  # ok-sleep: pacing the load, not synchronising
                nursery.start_soon(acknowledged.push, client, f"paced-{i % 8}", f"v{i}", images[i])
    return acknowledged


async def _received(receiver: Receiver, wanted: set[str]) -> dict[str, float]:
    """Arrival time by request id, once every one of ``wanted`` has arrived (within 60 s)."""
    async with httpx.AsyncClient(base_url=receiver.base, timeout=10) as http:
        with trio.fail_after(60):
            while True:
                manifests = (await http.get("/ids")).json()["manifests"]
                arrived = {m["request_id"]: m["received_at"] for m in manifests}
                if wanted <= arrived.keys():
                    return arrived
                await trio.sleep(0.1)  # ok-sleep: polling the receiver under a deadline


def _commit_mean_ms(url: str) -> float:
    scrape = httpx.get(f"{url}/metrics", timeout=30).text
    figures = {kind: float(value) for kind, value in _COMMIT.findall(scrape)}
    return 1000 * figures["sum"] / figures["count"] if figures.get("count") else 0.0


def run_one(
    workers: int,
    count: int,
    concurrency: int,
    lag_count: int,
    lag_rate: float,
    data_dir: str | None,
) -> dict[str, Any]:
    log = Path(tempfile.mkstemp(prefix="registry-trio-workers-", suffix=".log")[1])
    with (
        Receiver(record=True) as receiver,
        ServerProcess(
            data_dir=data_dir,
            events=True,
            sinks=[{"type": "http", "address": receiver.url, "timeout": "5s"}],
            http={"workers": workers},
            log_file=str(log),
        ) as server,
    ):
        # Warm-up: every worker imports, opens the queue, and the sink's connection is made.
        trio.run(_push, server.url, concurrency, concurrency)
        cpu_before = server.cpu_seconds()
        seconds, pushed = trio.run(_push, server.url, count, concurrency)
        cpu = server.cpu_seconds() - cpu_before
        trio.run(_received, receiver, set(pushed.at))
        paced = trio.run(_push_paced, server.url, lag_count, lag_rate)
        errors = pushed.errors + paced.errors
        arrived = trio.run(_received, receiver, set(paced.at))
        lags = [1000 * (arrived[rid] - at) for rid, at in paced.at.items()]
        spread = Counter(_ACCESS.findall(log.read_text()))
        log.unlink()
        total = sum(spread.values()) or 1
        return {
            "workers": workers,
            "images_per_s": count / seconds,
            "cpu_ms_per_image": 1000 * cpu / count,
            "commit_ms": _commit_mean_ms(server.url),
            "lag_ms": percentiles(lags, (50, 99)),
            "spread": sorted((n / total for n in spread.values()), reverse=True),
            "errors": errors,
        }


def main() -> None:
    parser = base_parser(
        __doc__.split("\n\n")[0],
        count=300,
        concurrency=8,
        no_url="it starts registry-trio itself, once per worker count",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        nargs="+",
        default=[2],
        metavar="N",
        help="worker counts to compare with one process (default: 2)",
    )
    parser.add_argument("--rounds", type=positive_int, default=2, metavar="R")
    parser.add_argument(
        "--lag-rate",
        type=float,
        default=20.0,
        metavar="PER_S",
        help="images per second of the paced push whose event lag is measured (default 20)",
    )
    parser.add_argument(
        "--lag-count",
        type=positive_int,
        default=200,
        metavar="N",
        help="images of the paced push (default 200)",
    )
    args = parser.parse_args()
    counts = [1, *(w for w in args.workers if w != 1)]
    settings = {
        "count": args.count,
        "concurrency": args.concurrency,
        "lag_rate": args.lag_rate,
        "lag_count": args.lag_count,
        "workers": counts,
        "rounds": args.rounds,
    }
    machine = machine_info()
    results: dict[int, list[dict[str, Any]]] = {w: [] for w in counts}
    for _ in range(args.rounds):
        for workers in counts:
            results[workers].append(
                run_one(
                    workers,
                    args.count,
                    args.concurrency,
                    args.lag_count,
                    args.lag_rate,
                    args.data_dir,
                )
            )
    summary = {w: _summarise(runs) for w, runs in results.items()}
    if args.json:
        emit_json({"machine": machine, "settings": settings, "results": summary})
        return
    print_header("registry-trio: one process against several workers", machine, settings)
    for workers, s in summary.items():
        print(
            f"workers={workers}: {s['images_per_s']:.1f} images/s, "
            f"CPU {s['cpu_ms_per_image']:.1f} ms/image, commit {s['commit_ms']:.2f} ms, "
            f"lag p50 {s['lag_ms']['p50']:.1f} ms p99 {s['lag_ms']['p99']:.1f} ms, "
            f"spread {' / '.join(f'{x:.0%}' for x in s['spread'])}, errors {s['errors']}"
        )
    base = summary[1]["images_per_s"]
    for workers in counts[1:]:
        print(f"workers={workers} / 1: {summary[workers]['images_per_s'] / base:.2f}x images/s")


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the rounds (rates, CPU, commit), the rounds' worst percentile for the lag."""
    return {
        "images_per_s": statistics.mean(r["images_per_s"] for r in runs),
        "cpu_ms_per_image": statistics.mean(r["cpu_ms_per_image"] for r in runs),
        "commit_ms": statistics.mean(r["commit_ms"] for r in runs),
        "lag_ms": {
            "p50": statistics.mean(r["lag_ms"]["p50"] for r in runs),
            "p99": max(r["lag_ms"]["p99"] for r in runs),
        },
        "spread": runs[-1]["spread"],
        "errors": sum(r["errors"] for r in runs),
        "rounds": runs,
    }


if __name__ == "__main__":
    main()
