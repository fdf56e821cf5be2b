"""Crash soak: ``kill -9`` registry-trio again and again under push load; lose no event.

What it measures
    registry-trio runs as a subprocess with the durable event outbox on and one HTTP sink:
    bench/receiver.py in its own process, which records every event id it receives. C
    concurrent workers push small unique images (one layer + config + OCI manifest, each
    image to its own tag) while the server is killed with SIGKILL --kills times, at random
    moments: after each (re)start the next kill comes after a delay drawn uniformly from
    [--min-delay, --max-delay] seconds. After each kill the server is restarted on the same
    storage and queue directories (it listens on a new ephemeral port; the workers switch to
    the URL it logs). A push that fails with a connection error (the kill) is retried in
    full once the server is back, and is not counted as acknowledged; only a 2xx manifest
    PUT is. After the last restart the load runs for one more random delay, then stops, and
    the script waits (up to --deadline seconds) until every acknowledged push's event has
    reached the receiver and the server reports its outbox drained.

    It reports:
      acknowledged    manifest PUTs answered 2xx (the pushes whose events must arrive)
      delivered       unique event ids the receiver got (all actions: manifest pushed,
                      blob pushed, repository created), and of those, manifest pushes
      lost            acknowledged pushes whose manifest event never arrived, matched on
                      the request id the 2xx carried (X-Request-Id) -- must be 0
      duplicates      copies received beyond the first of an id (at-least-once: expected
                      around kills); every copy must be the same event under the same id,
                      and no push may arrive twice under two ids ("conflicting" and
                      "split" count those violations -- must be 0)
      committed, unacknowledged
                      manifest events for pushes whose response the kill swallowed (the
                      event was durable before the 2xx that never left): allowed
      kills, restart time, wall time, and the 1-minute load average (the machine may be
      shared with other work)

    The exit status is 1 if anything acknowledged was lost, a duplicate broke the same-id
    rule, nothing was acknowledged at all, or the script failed; 0 otherwise.

How to run
    .venv/bin/python bench/crash_soak.py                    # 20 kills, concurrency 8
    .venv/bin/python bench/crash_soak.py --kills 50 -c 16 --min-delay 0.05 --max-delay 1
    .venv/bin/python bench/crash_soak.py --format cloudevents-batch --json

It always starts (and kills) its own server; --url is not supported.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time
from dataclasses import dataclass, field
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
    progress,
    report_failure,
)
from receiver import Receiver
from registry_client import RegistryClient, make_image

from registry_trio.config import SINK_FORMATS

# Errors while the server is up and not being killed: a few are tolerated (and reported),
# more mean the server is broken and the soak stops.
MAX_UNEXPECTED_ERRORS = 50


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(
        __doc__ or "",
        concurrency=8,
        no_url="the crash soak starts and kills its own server",
    )
    soak = parser.add_argument_group("crash soak")
    soak.add_argument(
        "--kills",
        type=positive_int,
        default=20,
        metavar="N",
        help="how many times to kill -9 and restart the server (default: %(default)s)",
    )
    soak.add_argument(
        "--min-delay",
        type=non_negative_float,
        default=0.2,
        metavar="SECONDS",
        help="shortest load time between a (re)start and the next kill (default: %(default)s)",
    )
    soak.add_argument(
        "--max-delay",
        type=non_negative_float,
        default=2.0,
        metavar="SECONDS",
        help="longest load time between a (re)start and the next kill; each delay is uniform "
        "in [min, max] (default: %(default)s)",
    )
    soak.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the random kill moments (default: random; the seed used is reported)",
    )
    soak.add_argument(
        "--deadline",
        type=non_negative_float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait, after the load stops, for every event to arrive "
        "(default: %(default)s)",
    )
    soak.add_argument(
        "--layer-size",
        type=int,
        default=4096,
        metavar="BYTES",
        help="size of each image's one layer (default: %(default)s)",
    )
    soak.add_argument(
        "--repos",
        type=positive_int,
        default=8,
        metavar="R",
        help="spread the pushes over R repositories (default: %(default)s)",
    )
    soak.add_argument(
        "--format",
        choices=SINK_FORMATS,
        default="cloudevents",
        help="the HTTP sink's event format (default: %(default)s)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_delay < args.min_delay:
        parser.error("--max-delay must be at least --min-delay")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    return args


@dataclass
class Generation:
    """One server process: its URL and the connection pool the workers use with it."""

    number: int
    url: str
    http: httpx.AsyncClient


@dataclass
class Soak:
    args: argparse.Namespace
    server: ServerProcess
    acknowledged: dict[str, dict[str, str]] = field(default_factory=dict)  # request id -> push
    attempts: int = 0
    retried: int = 0  # push attempts that failed because of a kill, and were retried
    unexpected: collections.Counter = field(default_factory=collections.Counter)
    restart_seconds: list[float] = field(default_factory=list)
    load_averages: list[float] = field(default_factory=list)
    kills: int = 0

    def __post_init__(self) -> None:
        self.generations: list[Generation] = []
        self.up = trio.Event()
        self.stop = trio.Event()
        self.rng = random.Random(self.args.seed)

    @property
    def current(self) -> Generation:
        return self.generations[-1]

    def _open(self, url: str) -> None:
        limits = httpx.Limits(
            max_connections=self.args.concurrency, max_keepalive_connections=self.args.concurrency
        )
        http = httpx.AsyncClient(base_url=url, limits=limits, timeout=30)
        self.generations.append(Generation(len(self.generations), url, http))
        self.up.set()

    async def worker(self, worker: int) -> None:
        n = 0
        while not self.stop.is_set():
            repository = f"soak/app-{(worker + n) % self.args.repos}"
            tag = f"w{worker}-{n}"
            image = make_image((self.args.layer_size,))
            while True:  # until this image is acknowledged
                await self.up.wait()
                generation = self.current
                self.attempts += 1
                try:
                    client = RegistryClient(generation.url, client=generation.http)
                    response = await client.push_image(repository, tag, image)
                except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                    if generation is self.current and self.up.is_set():
                        # Not the kill: the server is up and this is its process.
                        self.unexpected[_describe(exc)] += 1
                        if sum(self.unexpected.values()) > MAX_UNEXPECTED_ERRORS:
                            raise RuntimeError(
                                f"more than {MAX_UNEXPECTED_ERRORS} errors while the server "
                                f"was up: {dict(self.unexpected)}"
                            ) from exc
                    else:
                        self.retried += 1
                    continue
                self.acknowledged[response.headers["X-Request-Id"]] = {
                    "repository": repository,
                    "reference": tag,
                    "digest": response.headers["Docker-Content-Digest"],
                }
                break
            n += 1

    async def killer(self, bar: Any) -> None:
        for _ in range(self.args.kills):
            # A random moment under load: the load pattern, not synchronisation.
            await trio.sleep(self.rng.uniform(self.args.min_delay, self.args.max_delay))
            self.load_averages.append(os.getloadavg()[0])
            self.up = trio.Event()  # workers whose push fails now wait for the restart
            await trio.to_thread.run_sync(self.server.kill)
            self.kills += 1
            started = time.perf_counter()
            url = await trio.to_thread.run_sync(self.server.restart)
            self.restart_seconds.append(time.perf_counter() - started)
            self._open(url)
            bar.update(1)
            bar.set_postfix(acknowledged=len(self.acknowledged), refresh=False)
        await trio.sleep(self.rng.uniform(self.args.min_delay, self.args.max_delay))
        self.load_averages.append(os.getloadavg()[0])
        self.stop.set()

    async def run(self) -> float:
        self._open(self.server.url)
        started = time.perf_counter()
        try:
            with progress(self.args, self.args.kills, "kills", unit="kill") as bar:
                async with trio.open_nursery() as nursery:
                    for worker in range(self.args.concurrency):
                        nursery.start_soon(self.worker, worker)
                    nursery.start_soon(self.killer, bar)
        finally:
            for generation in self.generations:
                await generation.http.aclose()
        return time.perf_counter() - started


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        request = exc.request
        return f"{request.method} {exc.response.status_code}"
    return type(exc).__name__


async def sink_status(url: str) -> dict[str, Any] | None:
    """The server's view of its one sink (pending, in flight, delivered, dead)."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        response = await http.get("/_registry/events/sinks")
    if response.status_code != 200:
        return None
    (status,) = response.json()["sinks"]
    return status


async def wait_for_delivery(
    soak: Soak, receiver: Receiver, deadline: float
) -> tuple[dict[str, Any], dict[str, Any] | None, float, bool]:
    """Poll until every acknowledged push's event arrived and the outbox is drained."""
    wanted = set(soak.acknowledged)
    started = time.perf_counter()
    with trio.move_on_after(deadline) as scope:
        while True:
            received = await trio.to_thread.run_sync(receiver.ids)
            arrived = {m["request_id"] for m in received["manifests"]}
            status = await sink_status(soak.server.url)
            drained = status is None or (status["pending"] == 0 and status["inFlight"] == 0)
            if wanted <= arrived and drained:
                break
            await trio.sleep(0.5)  # polling interval, with the deadline above
    waited = time.perf_counter() - started
    if scope.cancelled_caught:
        received = await trio.to_thread.run_sync(receiver.ids)
        status = await sink_status(soak.server.url)
    return received, status, waited, scope.cancelled_caught


def analyse(soak: Soak, received: dict[str, Any]) -> dict[str, Any]:
    copies: dict[str, int] = received["ids"]
    manifests: list[dict[str, Any]] = received["manifests"]
    by_request: dict[str, set[str]] = collections.defaultdict(set)
    for m in manifests:
        by_request[m["request_id"]].add(m["id"])
    lost = []
    wrong = []
    arrived = {m["request_id"]: m for m in manifests}
    for request_id, push in soak.acknowledged.items():
        event = arrived.get(request_id)
        if event is None:
            lost.append({"request_id": request_id, **push})
        elif (event["repository"], event["reference"], event["digest"]) != (
            push["repository"],
            push["reference"],
            push["digest"],
        ):
            wrong.append({"request_id": request_id, "pushed": push, "event": event})
    split = {r: sorted(ids) for r, ids in by_request.items() if len(ids) > 1}
    return {
        "acknowledged": len(soak.acknowledged),
        "delivered_unique_ids": len(copies),
        "delivered_copies": sum(copies.values()),
        "delivered_manifest_events": len(manifests),
        "lost": len(lost),
        "lost_examples": lost[:10],
        "wrong_target": len(wrong),
        "wrong_target_examples": wrong[:10],
        "duplicates": sum(c - 1 for c in copies.values()),
        "duplicated_ids": sum(1 for c in copies.values() if c > 1),
        "conflicting_duplicates": len(received["conflicting_ids"]),
        "split_ids": len(split),
        "committed_unacknowledged": len(set(arrived) - set(soak.acknowledged)),
    }


async def soak_run(
    args: argparse.Namespace, server: ServerProcess, receiver: Receiver
) -> dict[str, Any]:
    soak = Soak(args, server)
    load_seconds = await soak.run()
    received, status, waited, timed_out = await wait_for_delivery(soak, receiver, args.deadline)
    results = analyse(soak, received)
    restart = {k: round(v, 3) for k, v in percentiles(soak.restart_seconds, (50, 100)).items()}
    results.update(
        {
            "kills": soak.kills,
            "push_attempts": soak.attempts,
            "retried_after_kill": soak.retried,
            "unexpected_errors": dict(soak.unexpected),
            "load_seconds": round(load_seconds, 3),
            "delivery_wait_seconds": round(waited, 3),
            "delivery_deadline_hit": timed_out,
            "restart_seconds": {"p50": restart.get("p50"), "max": restart.get("p100")},
            "sink_status": status,
            "load_average_1m": {
                "min": round(min(soak.load_averages), 2) if soak.load_averages else None,
                "max": round(max(soak.load_averages), 2) if soak.load_averages else None,
            },
        }
    )
    return results


def failed(results: dict[str, Any]) -> list[str]:
    reasons = []
    if results["lost"]:
        reasons.append(f"{results['lost']} acknowledged push(es) lost")
    if results["wrong_target"]:
        reasons.append(f"{results['wrong_target']} event(s) name the wrong manifest")
    if results["conflicting_duplicates"]:
        reasons.append(f"{results['conflicting_duplicates']} id(s) with differing copies")
    if results["split_ids"]:
        reasons.append(f"{results['split_ids']} push(es) delivered under several ids")
    if not results["acknowledged"]:
        reasons.append("no push was acknowledged: the soak proves nothing")
    return reasons


def report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    r = results
    status = r["sink_status"] or {}
    restart = r["restart_seconds"]
    load = r["load_average_1m"]
    rows = [
        (
            "kills",
            f"{r['kills']} (SIGKILL; restart p50 {restart['p50']} s, max {restart['max']} s)",
        ),
        (
            "acknowledged",
            f"{r['acknowledged']} manifest PUTs answered 2xx ({r['push_attempts']} push "
            f"attempts, {r['retried_after_kill']} retried after a kill)",
        ),
        (
            "delivered",
            f"{r['delivered_unique_ids']} unique event ids ({r['delivered_manifest_events']} "
            f"manifest pushes), {r['delivered_copies']} copies received",
        ),
        ("lost", f"{r['lost']}   (must be 0)"),
        (
            "duplicates",
            f"{r['duplicates']} extra copies of {r['duplicated_ids']} ids; "
            f"{r['conflicting_duplicates']} with differing content, {r['split_ids']} pushes "
            "under several ids   (both must be 0)",
        ),
        (
            "unacknowledged",
            f"{r['committed_unacknowledged']} pushes committed but their 2xx lost to a kill",
        ),
        ("unexpected", str(r["unexpected_errors"] or "none")),
        (
            "outbox",
            f"pending {status.get('pending')}, delivered {status.get('delivered')}, "
            f"dead {status.get('dead')}, failed attempts {status.get('failedAttempts')}",
        ),
        (
            "wall time",
            f"{r['load_seconds'] + r['delivery_wait_seconds']:.1f} s (load "
            f"{r['load_seconds']:.1f} s, then {r['delivery_wait_seconds']:.1f} s until "
            f"delivered{', DEADLINE HIT' if r['delivery_deadline_hit'] else ''})",
        ),
        ("load average", f"1-min {load['min']}..{load['max']} during the run"),
    ]
    for label, text in rows:
        print(f"{label:15} {text}")
    for example in r["lost_examples"]:
        print(f"lost: {example}")
    reasons = failed(r)
    print()
    print("FAIL: " + "; ".join(reasons) if reasons else "PASS: no acknowledged event was lost")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    settings = {
        "kills": args.kills,
        "concurrency": args.concurrency,
        "delay": f"uniform({args.min_delay}, {args.max_delay}) s",
        "seed": args.seed,
        "layer_size": args.layer_size,
        "repos": args.repos,
        "format": args.format,
        "deadline": args.deadline,
    }
    if not args.json:
        print_header("registry-trio crash soak (bench/crash_soak.py)", machine, settings)
    server = None
    receiver = Receiver(record=True)
    try:
        with receiver:
            sink = {
                "type": "http",
                "address": receiver.url,
                "format": args.format,
                "timeout": "5s",
                "retry": {"initialBackoff": "10ms", "maxBackoff": "500ms"},
            }
            with ServerProcess(
                data_dir=args.data_dir,
                sinks=[sink],
                log_file=args.server_log,
                start_timeout=args.start_timeout,
            ) as server:
                results = trio.run(soak_run, args, server, receiver)
    except Exception as exc:
        report_failure("crash_soak.py", exc, server)
        if receiver.proc is not None:
            print(receiver.status(), file=sys.stderr)
        return 1
    reasons = failed(results)
    if args.json:
        emit_json(
            {
                "benchmark": "crash_soak",
                "machine": machine,
                "settings": settings,
                **results,
                "passed": not reasons,
                "failures": reasons,
            }
        )
    else:
        report(args, results)
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main())
