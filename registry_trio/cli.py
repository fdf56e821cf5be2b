"""``registry-trio serve [-c FILE]`` and ``registry-trio verify -c FILE``."""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from .config import Config, ConfigError, load_config
from .logs import setup_logging

if TYPE_CHECKING:
    from .storage.gc import GCReport

__all__ = ["main"]

# What an events command answers: printed as JSON, or rendered for a person.
_Answer = TypeVar("_Answer")


async def _serve_until_signalled(config: Config) -> None:
    from .server import serve
    from .workers.supervisor import supervise

    shutdown = trio.Event()
    run = serve if config.http.workers == 1 else supervise
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(run, config, shutdown=shutdown))
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                logging.getLogger("registry_trio").info(
                    "%s received: shutting down", signal.Signals(signum).name
                )
                shutdown.set()
                break


def _load(path: str | None) -> Config:
    from . import tls
    from .auth import check_files

    try:
        config = load_config(path)
        check_files(config)
        if config.http.tls is not None:
            tls.check_files(config.http.tls)
        return config
    except ConfigError as exc:
        print(f"registry-trio: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _add_events_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    events = commands.add_parser(
        "events",
        help="inspect and repair event delivery",
        description=(
            "Ask the running server's admin API (credentials from REGISTRY_TRIO_USER="
            "user:password when it has authentication), or, when no server answers, "
            "work on the queue directory of the config directly."
        ),
    )
    verbs = events.add_subparsers(dest="verb", required=True)
    for name, help_text in (
        ("status", "per-sink pending, in flight, delivered, failed, dead, last error"),
        ("dead", "list dead letters of a sink"),
        ("replay", "move dead letters back to pending (they keep their event id)"),
        ("history", "delivery attempts, dead letters and replays, newest first"),
        ("trace", "the whole path of one event: its commit, every attempt at every sink"),
    ):
        verb = verbs.add_parser(name, help=help_text)
        verb.add_argument("-c", "--config", help="the config the server runs with")
        verb.add_argument("--json", action="store_true", help="machine-readable output")
        if name in ("dead", "replay"):
            verb.add_argument("--sink", help="sink name (needed when several are configured)")
        if name == "history":
            verb.add_argument("--sink", help="only this sink's records")
            verb.add_argument(
                "--failed", action="store_true", help="only failed attempts and dead letters"
            )
            verb.add_argument(
                "--limit", type=_history_size, default=50, help="records, 1 to 10000 (default 50)"
            )
            verb.add_argument("--before", type=_cursor, help="cursor from the last listing")
        if name == "trace":
            verb.add_argument("event_id", metavar="EVENT_ID", help="the event's id")
        if name == "dead":
            verb.add_argument(
                "--limit", type=_page_size, default=100, help="page size, 1 to 1000 (default 100)"
            )
            verb.add_argument("--after", type=int, default=0, help="cursor from the last page")
        if name == "replay":
            verb.add_argument("--id", action="append", dest="ids", help="event id (repeatable)")


def _page_size(text: str) -> int:
    from .events.status import DEAD_PAGE_MAX

    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= DEAD_PAGE_MAX:
        raise argparse.ArgumentTypeError(f"must be a number from 1 to {DEAD_PAGE_MAX}")
    return int(text)


def _history_size(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10_000:
        raise argparse.ArgumentTypeError("must be a number from 1 to 10000")
    return int(text)


def _cursor(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) < 2**63:
        raise argparse.ArgumentTypeError("must be the cursor a listing printed")
    return int(text)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _events_command(config: Config, args: argparse.Namespace) -> None:
    from . import events_cli

    try:
        if args.verb == "status":
            sinks, delivered_by = events_cli.status(config)
            _show(args.json, sinks, lambda rows: f"{_status_table(rows)}\n{delivered_by}")
        elif args.verb == "dead":
            page = events_cli.dead_letters(config, args.sink, args.limit, args.after)
            _show(args.json, page, _dead_letters_table)
        elif args.verb == "history":
            records = events_cli.history(config, args.sink, args.failed, args.limit, args.before)
            _show(args.json, records, _history_table)
        elif args.verb == "trace":
            _show(args.json, events_cli.event_trace(config, args.event_id), _trace_text)
        else:
            _show(args.json, events_cli.replay(config, args.sink, args.ids), _replayed_line)
    except events_cli.OperatorError as exc:
        print(f"registry-trio: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _show(as_json: bool, result: _Answer, render: Callable[[_Answer], str]) -> None:
    print(json.dumps(result, indent=2) if as_json else render(result))


def _replayed_line(answer: dict[str, Any]) -> str:
    return f"replayed {answer['replayed']} dead letter(s) of sink {answer['sink']}"


def _status_table(sinks: list[dict[str, Any]]) -> str:
    rows = [
        [
            "SINK",
            "TYPE",
            "PENDING",
            "IN FLIGHT",
            "DELIVERED",
            "FAILED",
            "DEAD",
            "OLDEST",
            "LAST ERROR",
        ]
    ]
    for s in sinks:
        age = s["oldestPendingAge"]
        rows.append(
            [
                str(s["name"]),
                s["type"],
                str(s["pending"]),
                "-" if s["inFlight"] is None else str(s["inFlight"]),
                str(s["delivered"]),
                str(s["failedAttempts"]),
                str(s["dead"]),
                "-" if age is None else f"{age:.0f}s",
                _last_error(s),
            ]
        )
    return _table(rows)


def _last_error(sink: dict[str, Any]) -> str:
    """``12s ago: <error>``, and whether a delivery was acknowledged since."""
    if not sink["lastError"]:
        return "-"
    text = str(sink["lastError"])
    if sink["lastErrorAt"]:
        at = datetime.datetime.fromisoformat(sink["lastErrorAt"])
        ago = datetime.datetime.now(datetime.UTC) - at
        text = f"{_age(ago.total_seconds())} ago: {text}"
    if sink["recovered"]:
        text += " (recovered since)"
    return text


def _age(seconds: float) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``: whole units, rounded down."""
    seconds = max(seconds, 0)  # another host's clock may be ahead
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _dead_letters_table(page: dict[str, Any]) -> str:
    rows = [["SEQ", "EVENT ID", "ACTION", "REPOSITORY", "ATTEMPTS", "LAST ERROR"]]
    for d in page["deadLetters"]:
        rows.append(
            [
                str(d["seq"]),
                d["id"],
                d["action"],
                d["repository"],
                str(d["attempts"]),
                d["lastError"],
            ]
        )
    text = _table(rows)
    if page["next"] is not None:
        text += f"\nmore: --after {page['next']}"
    return text


def _step_line(step: dict[str, Any]) -> list[str]:
    """One step of an event's path as table cells: when, where, what, and what came back."""
    if step["outcome"] == "committed":
        return [step["time"] or "-", "-", "committed", "-", f"seq {step['seq']}", "-", ""]
    detail = step["error"] or ""
    if step["retryAt"]:
        detail = f"{detail} (retry at {step['retryAt']})".strip()
    if step["by"]:
        detail = f"by {step['by']}"
    latency = "-" if step["latencyMs"] is None else f"{step['latencyMs']:.1f}ms"
    return [
        step["time"],
        step["sink"],
        step["outcome"],
        "-" if step["attempt"] is None else str(step["attempt"]),
        step["status"] or "-",
        latency,
        detail,
    ]


_STEP_HEADER = ["TIME", "SINK", "OUTCOME", "ATTEMPT", "STATUS", "LATENCY", "DETAIL"]


def _history_table(page: dict[str, Any]) -> str:
    rows = [["ID", *_STEP_HEADER[:3], "EVENT", "REPOSITORY", *_STEP_HEADER[3:]]]
    for r in page["records"]:
        time, sink, outcome, *rest = _step_line(r)
        rows.append([str(r["id"]), time, sink, outcome, r["event"], r["repository"] or "-", *rest])
    text = _table(rows)
    if page["next"] is not None:
        text += f"\nmore: --before {page['next']}"
    return text


def _trace_text(trace: dict[str, Any]) -> str:
    """An event's path for a person: what it is, where it stands, every step, the payload."""
    what = f"{trace['action']} {trace['repository']}" if trace["action"] else "(event not held)"
    if trace["digest"]:
        what += f"@{trace['digest']}"
    lines = [f"event {trace['event']}: {what}, at {trace['eventTime'] or '-'}"]
    for sink in trace["sinks"]:
        lines.append(f"  {sink['sink']}: {sink['state']} after {sink['attempts']} attempt(s)")
    lines += ["", _table([_STEP_HEADER, *(_step_line(s) for s in trace["steps"])])]
    if trace["truncated"]:
        lines.append("(older steps left out)")
    if trace["payload"] is not None:
        lines += ["", "payload:", json.dumps(trace["payload"], indent=2)]
    return "\n".join(lines)


async def _maintain_once(config: Config, dry_run: bool) -> tuple[GCReport, list[str] | None]:
    from .maintenance import collect_once, purge_once

    purged = await purge_once(config, dry_run=dry_run)
    return await collect_once(config, dry_run=dry_run), purged


def _gc_command(config: Config, args: argparse.Namespace) -> None:
    root = Path(config.storage.root_directory)
    if not root.is_dir():
        # Collecting would create an empty store there: say that this is not the server's.
        print(
            f"registry-trio: storage.rootDirectory: no storage at {root} "
            "(is this the config the server runs with?)",
            file=sys.stderr,
        )
        raise SystemExit(1)
    report, purged = trio.run(_maintain_once, config, args.dry_run)
    if args.json:
        print(json.dumps({**report.to_json(), "purgedUploads": purged}, indent=2))
        return
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"{verb} {len(report.manifests)} manifest(s) and {len(report.blobs)} blob(s), "
        f"{report.bytes_freed} bytes"
    )
    for manifest in report.manifests:
        print(f"  manifest {manifest.repository}@{manifest.digest}")
    for blob in report.blobs:
        print(f"  blob {blob.digest} ({blob.size} bytes)")
    if report.held_back_manifests or report.held_back_blobs:
        print(
            f"kept {report.held_back_manifests} manifest(s) and {report.held_back_blobs} "
            f"blob(s) younger than storage.gcDelay ({config.storage.gc_delay:g}s)"
        )
    if report.skipped_repositories:
        print("skipped (changed during the run): " + ", ".join(report.skipped_repositories))
    if purged is not None:
        verb = "would purge" if args.dry_run else "purged"
        print(f"{verb} {len(purged)} idle upload session(s)")
        for upload_id in purged:
            print(f"  upload {upload_id}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="registry-trio",
        description="An OCI registry with crash-safe, enriched event notifications.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {importlib.metadata.version('registry-trio')}",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="serve the registry")
    serve_cmd.add_argument("-c", "--config", help="JSON config file (default: embedded)")
    verify_cmd = commands.add_parser("verify", help="check a config file without serving")
    verify_cmd.add_argument("-c", "--config", required=True, help="JSON config file")
    _add_events_parser(commands)
    gc_cmd = commands.add_parser(
        "gc",
        help="remove untagged manifests and unreferenced blobs older than storage.gcDelay, "
        "and upload sessions idle for storage.uploadPurging.age",
        description="Safe beside a running server; deletions are recorded as events "
        "(without actor and request) when the events extension is on. Upload sessions are "
        "purged only while storage.uploadPurging.enable is true (the default).",
    )
    gc_cmd.add_argument("-c", "--config", help="the config the server runs with")
    gc_cmd.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    gc_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    config = _load(args.config)
    if args.command == "verify":
        print(f"{args.config}: configuration is valid")
        return
    if args.command == "events":
        _events_command(config, args)
        return
    if args.command == "gc":
        _gc_command(config, args)
        return
    setup_logging(config.log, None if config.http.workers == 1 else "supervisor")
    from .events.queue import QueueError
    from .events.queue.instance_lock import InstanceLocked
    from .startup import StartupError, leaves
    from .workers.supervisor import WorkerFailedToStart

    try:
        trio.run(_serve_until_signalled, config)
    except* (QueueError, InstanceLocked, StartupError, WorkerFailedToStart) as group:
        # The address is taken, the store or the queue cannot open (unreachable JetStream,
        # unreadable SQLite file, another process serving it), or a worker could not start:
        # no point serving pushes that could not be acknowledged. One line each.
        # Workers that fail alike say the same: each reason once.
        for reason in dict.fromkeys(str(exc) for exc in leaves(group)):
            print(f"registry-trio: cannot start: {reason}", file=sys.stderr)
        raise SystemExit(1) from None
