"""Drain a big event backlog through the real server: its memory and its delivery rate.

What it measures
    The scenario of a webhook that was down for hours: the outbox holds --count events
    (default 1,000,000) owed to one HTTP sink, and the server must deliver them all without
    its memory growing with the backlog.

    1. Fill. With no server and no delivery running, the script appends --count manifest-push
       events (about 1.2 KB of JSON each, with their manifest) for the sink named
       "backlog" to a fresh SQLite outbox, through registry_trio.events.queue.Outbox, the
       server's own writer, in transactions of --fill-chunk events; --fill-tasks appenders
       keep the writer busy. It prints the fill rate (events/s) and the outbox's size.
    2. Drain. It starts bench/receiver.py (a counting webhook, its own process), then the real
       registry-trio server as a subprocess on that queue directory, with events on and one
       HTTP sink named "backlog" pointing at the receiver, format cloudevents-batch,
       batch {maxEvents: --batch, maxWait: "0s"}. Delivery starts on its own. The script
       polls the receiver's count and samples the server's VmRSS from /proc/<pid>/status
       every --sample-interval seconds until the receiver has counted every event, then
       reads the kernel's peak (VmHWM, since the process started) and waits until the
       server's admin API reports nothing pending for the sink (acknowledged, pruned).

    It prints: fill rate, drain rate (events the receiver counted after the server logged
    "listening on", divided by the time from then until the last one; startup takes ~1 s
    and is reported on its own), peak server RSS in MB (10^6 bytes; max of VmHWM and the
    samples) against --goal (250 MB), the server's CPU time per 1,000 events, elapsed
    times, and the 1-minute load average before and after (the machine may be shared).

How to run
    .venv/bin/python bench/backlog.py                   # 1,000,000 events, ~2 minutes
    .venv/bin/python bench/backlog.py -n 100000 --batch 100
    .venv/bin/python bench/backlog.py --data-dir /mnt/ssd --json

It needs ~1.5 KB of free disk per event under the temporary directory (--data-dir). It
always starts its own server on the queue it filled; --url is refused. The exit status is
0 on PASS, 1 when something fails or the drain stalls, 3 when the memory goal is missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from common import (
    MB,
    ServerProcess,
    base_parser,
    cpu_times,
    emit_json,
    machine_info,
    positive_int,
    print_header,
    progress,
    read_memory,
    report_failure,
)
from events import sample_event
from receiver import Receiver

from registry_trio.events import Event
from registry_trio.events.queue import Outbox

SINK = "backlog"
GOAL_MB = 250
EXIT_GOAL_MISSED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(
        __doc__ or "",
        count=1_000_000,
        count_help="events in the backlog, all owed to the one HTTP sink",
        no_url="the backlog is written into the outbox of a server this script starts "
        "itself (and whose memory it samples)",
    )
    knobs = parser.add_argument_group("backlog")
    knobs.add_argument(
        "--batch",
        type=positive_int,
        default=1000,
        metavar="N",
        help="the sink's batch.maxEvents: events per cloudevents-batch POST (default: %(default)s)",
    )
    knobs.add_argument(
        "--fill-chunk",
        type=positive_int,
        default=5000,
        metavar="N",
        help="events per Outbox.append (one transaction) while filling (default: %(default)s)",
    )
    knobs.add_argument(
        "--fill-tasks",
        type=positive_int,
        default=2,
        metavar="T",
        help="concurrent appenders while filling (default: %(default)s)",
    )
    knobs.add_argument(
        "--goal",
        type=float,
        default=GOAL_MB,
        metavar="MB",
        help="peak server RSS goal in MB (10^6 bytes) (default: %(default)s)",
    )
    knobs.add_argument(
        "--sample-interval",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="how often VmRSS and the receiver's count are read (default: %(default)s)",
    )
    knobs.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up when the receiver's count has not moved for this long (default: %(default)s)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sample_interval <= 0:
        parser.error("--sample-interval must be positive")
    return args


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# -- 1. fill ---------------------------------------------------------------------------------


async def fill(args: argparse.Namespace, directory: Path) -> float:
    """Append ``args.count`` events for :data:`SINK`; the seconds it took."""
    outbox = Outbox(directory)
    # One realistic event; each appended copy gets its own id and time (Event's defaults).
    template = sample_event(0)
    starts = iter(range(0, args.count, args.fill_chunk))
    bar = progress(args, args.count, "fill", unit="ev", unit_scale=True)

    async def appender() -> None:
        for start in starts:
            n = min(args.fill_chunk, args.count - start)
            chunk = [
                (
                    Event(
                        template.action,
                        template.target,
                        template.source,
                        template.actor,
                        template.request,
                    ),
                    (SINK,),
                )
                for _ in range(n)
            ]
            await outbox.append(chunk)
            bar.update(n)

    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        started = time.perf_counter()
        async with trio.open_nursery() as appenders:
            for _ in range(args.fill_tasks):
                appenders.start_soon(appender)
        seconds = time.perf_counter() - started
        outbox.close()
    bar.close()
    return seconds


def directory_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


# -- 2. drain --------------------------------------------------------------------------------


def sink_pending(url: str) -> int | None:
    """Events the server still owes the sink (pending + in flight), from its admin API."""
    try:
        response = httpx.get(url + "/_registry/events/sinks", timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    for status in response.json()["sinks"]:
        if status.get("name") == SINK:
            return int(status["pending"]) + int(status.get("inFlight", 0))
    return None


def drain(args: argparse.Namespace, server: ServerProcess, receiver: Receiver) -> dict[str, Any]:
    """Start ``server`` on the filled queue and follow the delivery to the end."""
    spawned = time.perf_counter()
    with server:
        listening = time.perf_counter()
        pid = server.pid
        cpu_start = sum(cpu_times(pid))
        at_listen = receiver.count()["events"]
        samples: list[int] = []
        bar = progress(args, args.count, "drain", unit="ev", unit_scale=True)
        bar.update(at_listen)
        counted, last_change, last_count = at_listen, listening, at_listen
        while counted < args.count:
            time.sleep(args.sample_interval)
            samples.append(read_memory(pid)["VmRSS"])
            counted = receiver.count()["events"]
            now = time.perf_counter()
            if counted != last_count:
                bar.update(counted - last_count)
                last_change, last_count = now, counted
            elif now - last_change > args.stall_timeout:
                raise RuntimeError(
                    f"the drain stalled: {counted:,} of {args.count:,} events counted, "
                    f"none for {args.stall_timeout:g} s"
                )
            if server.proc is not None and server.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {server.proc.returncode}")
        done = time.perf_counter()
        bar.close()
        memory = read_memory(pid)
        cpu = sum(cpu_times(pid)) - cpu_start
        # The receiver has everything; the server acknowledges (and prunes) the last batch
        # just after. Wait for its own word that nothing is owed any more.
        pending = sink_pending(server.url)
        deadline = time.perf_counter() + 30
        while pending and time.perf_counter() < deadline:
            time.sleep(0.1)
            pending = sink_pending(server.url)
        rss_after = read_memory(pid)["VmRSS"]
    drained = args.count - at_listen
    seconds = done - listening
    peak = max(memory["VmHWM"], *samples) if samples else memory["VmHWM"]
    return {
        "server_start_seconds": round(listening - spawned, 3),
        "delivered_before_listening": at_listen,
        "seconds": round(seconds, 3),
        # Normally ~all of the drain follows "listening on"; if a tiny backlog went out
        # before it, time it from the spawn instead.
        "events_per_s": round(drained / seconds if drained else args.count / (done - spawned)),
        "events_per_s_from_spawn": round(args.count / (done - spawned)),
        "receiver_counted": counted,
        "receiver_requests": receiver.count()["requests"],
        "server_pending_after": pending,
        "peak_rss_bytes": peak,
        "peak_rss_sampled_bytes": max(samples, default=None),
        "vmhwm_bytes": memory["VmHWM"],
        "rss_at_end_bytes": memory["VmRSS"],
        "rss_after_ack_bytes": rss_after,
        "samples": len(samples),
        "server_cpu_s": round(cpu, 3),
        "server_cpu_ms_per_1000_events": round(1000 * cpu / max(drained, 1) * 1000, 2),
    }


# -- main ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="registry-trio-backlog-bench-", dir=args.data_dir))
    queue_dir = base / "queue_data"
    results: dict[str, Any] = {"load_average_1m_before": load_average()}
    started = time.perf_counter()
    server: ServerProcess | None = None
    receiver = Receiver()
    try:
        seconds = trio.run(fill, args, queue_dir)
        results["fill"] = {
            "events": args.count,
            "seconds": round(seconds, 3),
            "events_per_s": round(args.count / seconds),
            "outbox_bytes": directory_size(queue_dir),
        }
        with receiver:
            sink = {
                "type": "http",
                "name": SINK,
                "address": receiver.url,
                "format": "cloudevents-batch",
                "batch": {"maxEvents": args.batch, "maxWait": "0s"},
            }
            server = ServerProcess(
                data_dir=args.data_dir,
                sinks=[sink],
                queue_dir=queue_dir,
                log_file=args.server_log,
                start_timeout=args.start_timeout,
            )
            results["drain"] = drain(args, server, receiver)
    except Exception as exc:
        report_failure("backlog.py", exc, server)
        if receiver.proc is not None:
            print(receiver.status(), file=sys.stderr)
        raise
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    results["load_average_1m_after"] = load_average()
    d = results["drain"]
    results["all_drained"] = d["receiver_counted"] >= args.count and d["server_pending_after"] == 0
    results["verdict"] = "PASS" if d["peak_rss_bytes"] < args.goal * MB else "FAIL"
    return results


def report(args: argparse.Namespace, r: dict[str, Any]) -> None:
    f, d = r["fill"], r["drain"]
    print(
        f"fill   {f['events_per_s']:>8,} events/s   {f['events']:,} events in "
        f"{f['seconds']:.1f} s (outbox {f['outbox_bytes'] / MB:,.0f} MB on disk)"
    )
    print(
        f"drain  {d['events_per_s']:>8,} events/s   {d['receiver_counted']:,} events counted "
        f"by the receiver in {d['receiver_requests']:,} requests, {d['seconds']:.1f} s "
        f"after listening (server start {d['server_start_seconds']:.1f} s, "
        f"{d['delivered_before_listening']:,} delivered before)"
    )
    print(
        f"       server CPU {d['server_cpu_s']:.1f} s ({d['server_cpu_ms_per_1000_events']} ms "
        f"per 1,000 events); still owed afterwards: {d['server_pending_after']}"
    )
    print(
        f"memory peak server RSS {d['peak_rss_bytes'] / MB:.1f} MB (VmHWM "
        f"{d['vmhwm_bytes'] / MB:.1f} MB, sampled max "
        f"{(d['peak_rss_sampled_bytes'] or 0) / MB:.1f} MB over {d['samples']} samples; "
        f"{d['rss_after_ack_bytes'] / MB:.1f} MB at the end)"
    )
    print(
        f"elapsed {r['elapsed_seconds']:.1f} s; 1-minute load average "
        f"{r['load_average_1m_before']} before, {r['load_average_1m_after']} after"
    )
    print()
    print(
        f"memory goal: {r['verdict']} (peak RSS {d['peak_rss_bytes'] / MB:.1f} MB, "
        f"goal < {args.goal:g} MB); all drained: {'yes' if r['all_drained'] else 'NO'}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    settings = {
        "count": args.count,
        "batch": args.batch,
        "format": "cloudevents-batch",
        "fill_chunk": args.fill_chunk,
        "fill_tasks": args.fill_tasks,
        "goal_mb": args.goal,
        "sample_interval": args.sample_interval,
    }
    if not args.json:
        print_header("registry-trio backlog drain (bench/backlog.py)", machine, settings)
    try:
        results = run(args)
    except Exception:
        return 1  # run() reported it, with the server's log
    if args.json:
        emit_json({"benchmark": "backlog", "machine": machine, "settings": settings, **results})
    else:
        report(args, results)
    if not results["all_drained"]:
        return 1
    return EXIT_GOAL_MISSED if results["verdict"] == "FAIL" else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
