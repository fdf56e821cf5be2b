"""Event pipeline benchmark: durable enqueue, backlog drain, push cost, slow receivers.

Measures, in one run:

1. **Durable enqueue**: events/s committed (fsync'd) by our SQLite outbox, with ``--appenders``
   concurrent tasks each awaiting its own commit (as concurrent requests do), against
   persist-queue's ``SQLiteAckQueue.put`` with the same event JSON (the baseline).
2. **Backlog drain**: a backlog of ``--backlog`` events delivered to a local HTTP receiver
   (a separate process), batched (``cloudevents-batch``), and a backlog of
   ``--unbatched-backlog`` events (10,000) unbatched (one event per POST).
3. **Push cost of events**: small-image pushes/s against a registry-trio server with events
   off, and with events on and an HTTP sink (the 2xx waits for the event's commit).
4. **Slow receiver**: delivery to a receiver that takes 50 ms per request, batched and not.
5. **Delivery history**: what recording every attempt costs. The writer's time per event to
   acknowledge events in runs of ``--history-ack`` (history on, off), the bytes a record
   keeps on disk, the batched drain rate and the push rate (batched sink) with the history
   on and off; rounds alternate the modes.

Run: ``python bench/events.py`` (``--json`` for machine-readable output, ``--help`` for the
knobs). It starts its own registry-trio and receivers on 127.0.0.1 and stops them; ``--url``
is refused, since every part measures registry-trio's own internals or servers configured
by the script.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import trio
from common import (
    ServerProcess,
    base_parser,
    emit_json,
    machine_info,
    print_header,
    progress,
    push_rate,
)

from registry_trio.config import HistoryConfig, parse_config
from registry_trio.events import Action, Actor, Event, RequestInfo, Source, Target
from registry_trio.events.delivery import DeliverySupervisor
from registry_trio.events.queue import Attempt, Outbox, OwedEvent

SINK = "bench-sink"


def sample_event(i: int) -> Event:
    """A manifest push as the API records it (about 1 KB of JSON with its manifest)."""
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + "c" * 64,
                "size": 512,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": "sha256:" + "a" * 64,
                    "size": 4096,
                }
            ],
        }
    )
    return Event(
        Action.MANIFEST_PUSHED,
        Target(
            repository=f"bench/app-{i % 16}",
            digest="sha256:" + f"{i:064x}",
            media_type="application/vnd.oci.image.manifest.v1+json",
            size=len(manifest),
            tag=f"v{i}",
            url=f"http://127.0.0.1:5000/v2/bench/app/manifests/v{i}",
            manifest=manifest,
        ),
        Source("127.0.0.1:5000", "bench-instance"),
        Actor("alice", "basic"),
        RequestInfo(f"req-{i}", "127.0.0.1:40000", "127.0.0.1:5000", "PUT", "bench/1.0"),
    )


# -- 1. durable enqueue ------------------------------------------------------------------------


async def enqueue_ours(directory: Path, count: int, appenders: int) -> dict[str, Any]:
    batches: list[int] = []
    outbox = Outbox(directory, on_commit=lambda writes, _s: batches.append(writes))
    events = [sample_event(i) for i in range(count)]
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        next_index = iter(range(count))

        async def appender() -> None:
            for i in next_index:
                await outbox.append([(events[i], [SINK])])

        started = time.perf_counter()
        async with trio.open_nursery() as workers:
            for _ in range(appenders):
                workers.start_soon(appender)
        seconds = time.perf_counter() - started
        outbox.close()
    return {
        "events": count,
        "appenders": appenders,
        "seconds": round(seconds, 3),
        "events_per_s": round(count / seconds),
        "mean_group_commit": round(sum(batches) / len(batches), 1),
    }


def enqueue_persist_queue(directory: Path, count: int, threads: int) -> dict[str, Any]:
    from persistqueue import SQLiteAckQueue

    queue = SQLiteAckQueue(str(directory), multithreading=True, auto_commit=True)
    body = json.dumps(sample_event(0).to_json())
    per_thread = count // threads

    def put_many() -> None:
        for _ in range(per_thread):
            queue.put(body)

    started = time.perf_counter()
    workers = [threading.Thread(target=put_many) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - started
    return {
        "events": per_thread * threads,
        "threads": threads,
        "seconds": round(seconds, 3),
        "events_per_s": round(per_thread * threads / seconds),
    }


# -- receivers and in-process delivery -------------------------------------------------------------


class Receiver:
    """``bench/receiver.py`` as a subprocess."""

    def __init__(self, delay: float = 0.0) -> None:
        self._delay = delay
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Receiver:
        script = Path(__file__).with_name("receiver.py")
        self._proc = subprocess.Popen(
            [sys.executable, str(script), "--delay", str(self._delay)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # blocks until the receiver listens (or dies)
        match = re.search(r"listening on (\S+)", line)
        if match is None:
            raise RuntimeError(f"receiver did not start: {line!r}")
        self.url = match[1] + "/events"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        self._proc.terminate()
        self._proc.wait(10)

    def count(self) -> int:
        return httpx.get(self.url.rsplit("/", 1)[0] + "/count").json()["events"]


async def drain(
    directory: Path,
    backlog: int,
    sink: dict[str, Any],
    args: argparse.Namespace,
    label: str,
    history: bool = True,
) -> dict[str, Any]:
    """Fill the outbox with ``backlog`` events for one sink, then time their delivery."""
    events_config = parse_config(
        {
            "extensions": {
                "events": {
                    "enable": True,
                    "queue": {"directory": str(directory)},
                    "sinks": [{"name": SINK, **sink}],
                }
            }
        }
    ).extensions.events
    outbox = Outbox(directory, history=HistoryConfig(enable=history))
    delivered = 0
    all_delivered = trio.Event()
    bar = progress(args, backlog, label, unit="ev")

    def on_delivered(_sink: str, latencies: Sequence[float]) -> None:
        nonlocal delivered
        delivered += len(latencies)
        bar.update(len(latencies))
        if delivered >= backlog:
            all_delivered.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        template = sample_event(0)
        for start in range(0, backlog, 1000):
            chunk = [
                (
                    Event(
                        template.action,
                        template.target,
                        template.source,
                        template.actor,
                        template.request,
                    ),
                    [SINK],
                )
                for _ in range(min(1000, backlog - start))
            ]
            await outbox.append(chunk)
        delivery = DeliverySupervisor(events_config, outbox, on_delivered=on_delivered)
        started = time.perf_counter()
        await nursery.start(delivery.run)
        await all_delivered.wait()
        seconds = time.perf_counter() - started
        delivery.stop()
        await delivery.stopped.wait()
        outbox.close()
    bar.close()
    return {
        "events": backlog,
        "seconds": round(seconds, 3),
        "events_per_s": round(backlog / seconds),
    }


# -- 3. push cost ----------------------------------------------------------------------------------


def push_comparison(args: argparse.Namespace) -> dict[str, Any]:
    """Push rate with events off, and on with a batched sink and a one-event-per-POST sink.

    Rounds alternate the modes so that drift on a shared machine hits all of them alike.
    """
    modes = ("off", "batched", "single")
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    with Receiver() as receiver:
        sinks = {
            "off": [],
            "batched": [
                {
                    "type": "http",
                    "address": receiver.url,
                    "format": "cloudevents-batch",
                    "batch": {"maxEvents": 500, "maxWait": "1s"},
                }
            ],
            "single": [{"type": "http", "address": receiver.url}],
        }
        for round_ in range(args.push_rounds):
            for mode in modes:
                with ServerProcess(sinks=sinks[mode], data_dir=args.data_dir) as server:
                    warm_up = f"w{round_}{mode}"
                    trio.run(push_rate, server.url, args.concurrency, args.concurrency, warm_up)
                    rate = trio.run(
                        push_rate, server.url, args.push_count, args.concurrency, f"r{round_}{mode}"
                    )
                rates[mode].append(rate)
    mean = {mode: sum(values) / len(values) for mode, values in rates.items()}
    return {
        "images": args.push_count,
        "concurrency": args.concurrency,
        "rounds": args.push_rounds,
        "events_off_images_per_s": round(mean["off"], 1),
        "events_on_images_per_s": round(mean["batched"], 1),
        "events_on_single_images_per_s": round(mean["single"], 1),
        "ratio_on_off": round(mean["batched"] / mean["off"], 3),
        "ratio_single_off": round(mean["single"] / mean["off"], 3),
    }


# -- 5. delivery history ------------------------------------------------------------------------


async def record_cost(
    directory: Path, count: int, per_ack: int, history: bool, label: str, args: argparse.Namespace
) -> dict[str, Any]:
    """The writer's time per event to acknowledge ``count`` events, ``per_ack`` at a time (as
    a delivery loop does after each batch), and then to prune their records (with the history
    on, a delivered event is deleted by the pruner, not by its acknowledgement); the bytes the
    file holds per event in between."""
    phase: str | None = None
    seconds = {"ack": 0.0, "prune": 0.0}

    def on_commit(_writes: int, elapsed: float) -> None:
        if phase is not None:
            seconds[phase] += elapsed

    # A budget of one record: the pruning phase removes all but the newest.
    limits = HistoryConfig(enable=history, max_rows=1)
    outbox = Outbox(directory, on_commit=on_commit, history=limits)
    events = [sample_event(i) for i in range(count)]
    bar = progress(args, count, label, unit="ev")
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        for start in range(0, count, 1000):
            await outbox.append([(e, [SINK]) for e in events[start : start + 1000]])
        owed = [OwedEvent(seq, e, 0, 0.0) for seq, e in enumerate(events, start=1)]
        attempt = Attempt(time.time(), 0.002, per_ack, "HTTP 200")
        phase = "ack"
        for start in range(0, count, per_ack):
            run = owed[start : start + per_ack]
            await outbox.ack(SINK, run, [attempt] * len(run))
            bar.update(len(run))
        phase = None
        in_use = await trio.to_thread.run_sync(bytes_in_use, outbox.path)
        phase = "prune"
        await outbox.prune_history()
        phase = None
        outbox.close()
    bar.close()
    return {
        "events": count,
        "ack_us_per_event": round(seconds["ack"] / count * 1e6, 2),
        "prune_us_per_event": round(seconds["prune"] / count * 1e6, 2),
        "bytes_in_use": in_use,
    }


def bytes_in_use(path: Path) -> int:
    """The pages of an SQLite file that hold data (free pages left out), WAL checkpointed."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size: int = conn.execute("PRAGMA page_size").fetchone()[0]
        return (pages - free) * size
    finally:
        conn.close()


def history_comparison(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """History off and on, alternating round by round, on the same workload each time."""
    modes = {"off": False, "on": True}
    cost: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    drains: dict[str, list[float]] = {mode: [] for mode in modes}
    pushes: dict[str, list[float]] = {mode: [] for mode in modes}
    with Receiver() as receiver:
        batched = {
            "type": "http",
            "address": receiver.url,
            "format": "cloudevents-batch",
            "batch": {"maxEvents": args.batch},
        }
        pushing = {**batched, "batch": {"maxEvents": 500, "maxWait": "1s"}}
        for round_ in range(args.history_rounds):
            for mode, on in modes.items():
                where = base / f"history-{mode}-{round_}"
                cost[mode].append(
                    trio.run(
                        record_cost,
                        where / "ack",
                        args.history_events,
                        args.history_ack,
                        on,
                        f"acks, history {mode}",
                        args,
                    )
                )
                drained = trio.run(
                    drain,
                    where / "drain",
                    args.history_events,
                    batched,
                    args,
                    f"drain, history {mode}",
                    on,
                )
                drains[mode].append(drained["events_per_s"])
                with ServerProcess(
                    sinks=[pushing], history={"enable": on}, data_dir=args.data_dir
                ) as server:
                    warm_up = f"hw{round_}{mode}"
                    trio.run(push_rate, server.url, args.concurrency, args.concurrency, warm_up)
                    pushes[mode].append(
                        trio.run(
                            push_rate,
                            server.url,
                            args.push_count,
                            args.concurrency,
                            f"h{round_}{mode}",
                        )
                    )

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    writer = {
        mode: mean([c["ack_us_per_event"] + c["prune_us_per_event"] for c in cost[mode]])
        for mode in modes
    }
    pruning = mean([c["prune_us_per_event"] for c in cost["on"]])
    disk = {mode: mean([c["bytes_in_use"] for c in cost[mode]]) for mode in modes}
    push = {mode: mean(pushes[mode]) for mode in modes}
    drained_per_s = {mode: mean(drains[mode]) for mode in modes}
    return {
        "rounds": args.history_rounds,
        "events": args.history_events,
        "events_per_ack": args.history_ack,
        # Writer time per event, acknowledgement and (history on) pruning together.
        "writer_us_per_event_off": round(writer["off"], 2),
        "writer_us_per_event_on": round(writer["on"], 2),
        "of_which_pruning_us_per_event": round(pruning, 2),
        "record_cost_us_per_event": round(writer["on"] - writer["off"], 2),
        # What a record keeps on disk: the record, its indexes and the event it keeps.
        "bytes_per_record": round((disk["on"] - disk["off"]) / args.history_events),
        "drain_off_events_per_s": round(drained_per_s["off"]),
        "drain_on_events_per_s": round(drained_per_s["on"]),
        "drain_ratio_on_off": round(drained_per_s["on"] / drained_per_s["off"], 3),
        "push_off_images_per_s": round(push["off"], 1),
        "push_on_images_per_s": round(push["on"], 1),
        "push_ratio_on_off": round(push["on"] / push["off"], 3),
    }


# -- main ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(
        __doc__ or "",
        concurrency=8,
        no_url="it measures registry-trio's own event pipeline (the outbox and the delivery "
        "loop in this process) and push rates of servers it starts with events off and on, "
        "which a registry running elsewhere cannot be switched between",
    )
    knobs = parser.add_argument_group("event pipeline")
    knobs.add_argument("--enqueue", type=int, default=50_000, help="events to enqueue (ours)")
    knobs.add_argument(
        "--appenders",
        type=int,
        default=256,
        help="concurrent appenders, each awaiting its own commit",
    )
    knobs.add_argument(
        "--baseline",
        type=int,
        default=5_000,
        help="events to put into persist-queue (the baseline)",
    )
    knobs.add_argument("--backlog", type=int, default=100_000, help="batched drain backlog")
    knobs.add_argument(
        "--unbatched-backlog",
        type=int,
        default=10_000,
        help="unbatched drain backlog (default %(default)s: one POST per event runs at a few "
        "hundred events/s, so 10,000 requests give a steady rate in well under a minute)",
    )
    knobs.add_argument("--batch", type=int, default=1000, help="events per batched request")
    knobs.add_argument(
        "--slow-events", type=int, default=3_000, help="events for the 50 ms receiver, batched"
    )
    knobs.add_argument("--push-count", type=int, default=300, help="images per push run")
    knobs.add_argument("--push-rounds", type=int, default=2, help="off/on rounds to average")
    knobs.add_argument(
        "--history-events", type=int, default=20_000, help="events per history cost run"
    )
    knobs.add_argument(
        "--history-ack", type=int, default=100, help="events per acknowledgement (cost run)"
    )
    knobs.add_argument(
        "--history-rounds", type=int, default=2, help="history off/on rounds to average"
    )
    knobs.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["enqueue", "drain", "push", "slow", "history"],
        help="leave a part out",
    )
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    base = Path(tempfile.mkdtemp(prefix="registry-trio-events-bench-", dir=args.data_dir))

    def part(name: str, fn: Callable[[], Any]) -> None:
        if name not in args.skip:
            results[name] = fn()

    part(
        "enqueue",
        lambda: {
            "ours": trio.run(enqueue_ours, base / "ours", args.enqueue, args.appenders),
            "persist_queue": enqueue_persist_queue(base / "pq", args.baseline, 1),
        },
    )

    def drains() -> dict[str, Any]:
        with Receiver() as receiver:
            batched = {
                "type": "http",
                "address": receiver.url,
                "format": "cloudevents-batch",
                "batch": {"maxEvents": args.batch},
            }
            single = {"type": "http", "address": receiver.url}
            out = {
                "batched": trio.run(
                    drain, base / "drain-batched", args.backlog, batched, args, "drain batched"
                ),
                "unbatched": trio.run(
                    drain,
                    base / "drain-single",
                    args.unbatched_backlog,
                    single,
                    args,
                    "drain unbatched",
                ),
            }
            out["receiver_counted"] = receiver.count()
        return out

    part("drain", drains)
    part("push", lambda: push_comparison(args))

    def slow() -> dict[str, Any]:
        with Receiver(delay=0.05) as receiver:
            batched = {
                "type": "http",
                "address": receiver.url,
                "format": "cloudevents-batch",
                "batch": {"maxEvents": 100, "maxWait": "20ms"},
            }
            single = {"type": "http", "address": receiver.url}
            return {
                "batched": trio.run(
                    drain,
                    base / "slow-batched",
                    args.slow_events,
                    batched,
                    args,
                    "50ms receiver, batched",
                ),
                "unbatched": trio.run(
                    drain, base / "slow-single", 100, single, args, "50ms receiver, one per request"
                ),
            }

    part("slow", slow)
    part("history", lambda: history_comparison(args, base))
    return results


def report(results: dict[str, Any]) -> None:
    if "enqueue" in results:
        ours, pq = results["enqueue"]["ours"], results["enqueue"]["persist_queue"]
        print(
            f"durable enqueue     ours {ours['events_per_s']:>8,} events/s "
            f"({ours['appenders']} appenders, mean group commit {ours['mean_group_commit']})"
        )
        print(
            f"                    persist-queue {pq['events_per_s']:>,} events/s "
            f"(SQLiteAckQueue.put, 1 thread) -> ratio "
            f"{ours['events_per_s'] / pq['events_per_s']:.1f}x   target >= 20,000/s"
        )
    if "drain" in results:
        d = results["drain"]
        print(
            f"backlog drain       batched {d['batched']['events_per_s']:>8,} events/s "
            f"({d['batched']['events']:,} events)   target >= 10,000/s"
        )
        print(
            f"                    unbatched {d['unbatched']['events_per_s']:>6,} events/s "
            f"({d['unbatched']['events']:,} events)"
        )
    if "push" in results:
        p = results["push"]
        print(f"push, events off    {p['events_off_images_per_s']:>8} images/s")
        print(
            f"push, events on     {p['events_on_images_per_s']:>8} images/s "
            f"(ratio {p['ratio_on_off']:.2f}; batched sink)   target >= 0.90"
        )
        print(
            f"push, events on     {p['events_on_single_images_per_s']:>8} images/s "
            f"(ratio {p['ratio_single_off']:.2f}; one event per POST)"
        )
    if "slow" in results:
        s = results["slow"]
        print(
            f"50 ms receiver      batched {s['batched']['events_per_s']:>6,} events/s   "
            f"target >= 360/s"
        )
        print(f"                    one per request {s['unbatched']['events_per_s']:>,} events/s")
    if "history" in results:
        h = results["history"]
        print(
            f"history records     {h['record_cost_us_per_event']:>8} us of writer time per event "
            f"({h['writer_us_per_event_on']} on, of which pruning "
            f"{h['of_which_pruning_us_per_event']}; {h['writer_us_per_event_off']} off; acks of "
            f"{h['events_per_ack']}), {h['bytes_per_record']:,} bytes on disk per record"
        )
        print(
            f"history drain       {h['drain_on_events_per_s']:>8,} / "
            f"{h['drain_off_events_per_s']:,} events/s on / off "
            f"(ratio {h['drain_ratio_on_off']:.2f})"
        )
        print(
            f"history push        {h['push_on_images_per_s']:>8} / {h['push_off_images_per_s']} "
            f"images/s on / off (ratio {h['push_ratio_on_off']:.2f})   target >= 0.95"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "no_progress")}
    machine = machine_info()
    if not args.json:
        print_header("registry-trio event pipeline benchmark", machine, settings)
    results = run(args)
    if args.json:
        emit_json({"machine": machine, "settings": settings, "results": results})
    else:
        report(results)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
