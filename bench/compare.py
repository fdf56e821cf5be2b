"""Push benchmark, registry-trio against Docker distribution, events off and on, in one run.

What it measures
    The same workload against four servers, each started by this script on 127.0.0.1 with a
    fresh temporary storage directory (all of them removed at the end of the run, not
    between servers: files freed just before a server starts cost it CPU on some disks):

      distribution            Docker distribution (the Debian package docker-registry,
                              /usr/bin/docker-registry) with filesystem storage, the
                              in-memory blob descriptor cache of the package's default
                              config, no auth, no notifications
      distribution + notify   the same with notifications.endpoints pointing at
                              bench/receiver.py ({name, url, timeout: 1s, threshold: 5,
                              backoff: 1s})
      registry-trio           events off
      registry-trio + events  durable event outbox on, one HTTP sink at bench/receiver.py

    The workload is bench/push.py's push phase (its TimingTransport and worker loop): N
    small unique images (one --layer-size layer + config + OCI manifest), over --repos
    repositories, C concurrent workers on one connection pool of C connections; per image
    2 blob HEADs, 2 monolithic blob uploads and 1 manifest PUT. A blob upload is a POST
    then a PUT of the body to the Location with ?digest= (--upload post-put): push.py's
    single POST ?digest= is not implemented by distribution 2.8, so the comparison uses the
    upload that both implement. C images are pushed first as a warm-up and not measured.
    With --rounds above 1 the four servers take turns, round after round, so that drift on
    a shared machine hits them alike; the figures are then over all rounds.

    It prints, per server: images/s, p50 and p99 manifest PUT latency (ms, sending the
    request to the last byte of the response), server CPU time (user + system from
    /proc/<pid>/stat) per image over the push phase, the same including the tail of event
    delivery after the last push, and the events the receiver got. Then the ratios
    registry-trio / distribution, for events off and for events on (images/s above 1 means
    registry-trio is faster; latency and CPU above 1 mean registry-trio costs more). The
    1-minute load average before and after each run is printed too: the machine may be
    shared.

    --pin puts each server on the first usable CPU and this script (the load generator)
    and the receiver on the others (taskset -c; on a 2-core machine, one core each): client
    and server take no CPU from each other, and the server's CPU per image is its own.
    --workers N starts registry-trio with http.workers N (a supervisor and N worker
    processes; the CPU counted is all of theirs). Each round records the CPUs the kernel
    allowed the server, the client and the receiver, and how many processes served.

    If the docker-registry binary is missing, the distribution rows are skipped with a note
    saying how to install it (apt-get install docker-registry), and the exit status is 0.

How to run
    .venv/bin/python bench/compare.py                     # N=300, C=8
    .venv/bin/python bench/compare.py -n 1000 -c 16 --rounds 3
    .venv/bin/python bench/compare.py --pin --rounds 3     # server alone on one core
    .venv/bin/python bench/compare.py --pin --workers 2
    .venv/bin/python bench/compare.py --distribution-binary /opt/registry/bin/registry --json

The servers are always started by the script; --url is not supported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from common import (
    ManagedProcess,
    ServerProcess,
    base_parser,
    emit_json,
    machine_info,
    percentiles,
    positive_int,
    print_header,
    report_failure,
)
from push import TimingTransport, latency_table, run_phase
from receiver import Receiver
from registry_client import Blob, Image, RegistryClient, make_image, session_url

from registry_trio.config import SINK_FORMATS

DEFAULT_BINARY = "/usr/bin/docker-registry"
INSTALL_HINT = "apt-get install docker-registry"
TARGETS = ("distribution", "distribution+notify", "registry-trio", "registry-trio+events")
LABELS = {
    "distribution": "distribution",
    "distribution+notify": "distribution + notify",
    "registry-trio": "registry-trio",
    "registry-trio+events": "registry-trio + events",
}
EVENTS_PER_IMAGE = 3  # two blob pushes and a manifest push, in both servers' event models


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(
        __doc__ or "",
        count=300,
        concurrency=8,
        count_help="images to push per server and round",
        no_url="the comparison starts every server itself",
    )
    group = parser.add_argument_group("comparison")
    group.add_argument(
        "--distribution-binary",
        default=DEFAULT_BINARY,
        metavar="PATH",
        help="Docker distribution's registry binary (default: %(default)s, from the Debian "
        f"package; '{INSTALL_HINT}'); when it does not exist the distribution rows are "
        "skipped",
    )
    group.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        metavar="R",
        help="run the four servers in turn R times (default: %(default)s)",
    )
    group.add_argument(
        "--layer-size",
        type=int,
        default=4096,
        metavar="BYTES",
        help="size of each image's one layer (default: %(default)s)",
    )
    group.add_argument(
        "--repos",
        type=positive_int,
        default=8,
        metavar="R",
        help="spread the images over R repositories (default: %(default)s)",
    )
    group.add_argument(
        "--upload",
        choices=("post-put", "single-post"),
        default="post-put",
        help="how blobs are uploaded: POST then PUT with the body (default; every registry "
        "implements it), or one POST ?digest= with the body, finished with a PUT where the "
        "server answers 202 (distribution 2.8 always does; registry-trio does not)",
    )
    group.add_argument(
        "--format",
        choices=SINK_FORMATS,
        default="cloudevents",
        help="registry-trio's sink format with events on (default: %(default)s, one event "
        "per POST)",
    )
    group.add_argument(
        "--pin",
        action="store_true",
        help="run each server on the first usable CPU and the load generator and receiver "
        "on the others (taskset -c); needs at least 2 usable CPUs",
    )
    group.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="start registry-trio with http.workers N (worker processes behind a "
        "supervisor); default: the key is left out of its config",
    )
    group.add_argument(
        "--delivery-deadline",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait after the pushes for the receiver to get every event "
        "(default: %(default)s)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.server_cpus, args.client_cpus = None, None
    if args.pin:
        usable = sorted(os.sched_getaffinity(0))
        if len(usable) < 2:
            parser.error(f"--pin needs at least 2 usable CPUs; this process may use {usable}")
        args.server_cpus, args.client_cpus = usable[:1], usable[1:]
    return args


def trio_http_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Keys added to registry-trio's ``http`` config section: only what was asked for."""
    return {} if args.workers is None else {"workers": args.workers}


def cpu_list(cpus: list[int] | None) -> str | None:
    """``[1, 2]`` -> ``"1,2"``, as ``taskset -c`` reads it."""
    return None if cpus is None else ",".join(map(str, cpus))


# -- Docker distribution ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def distribution_version(binary: str) -> str:
    result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    return (result.stdout or result.stderr).strip()


class DistributionProcess(ManagedProcess):
    """``docker-registry serve`` on 127.0.0.1, a free port and a temp dir; a context manager."""

    def __init__(
        self,
        binary: str,
        *,
        notify_url: str | None = None,
        data_dir: str | None = None,
        start_timeout: float = 30.0,
        cpus: str | None = None,
        keep_root: bool = False,
    ) -> None:
        super().__init__(
            root_prefix="distribution-bench-",
            data_dir=data_dir,
            start_timeout=start_timeout,
            cpus=cpus,
            keep_root=keep_root,
        )
        self._binary = binary
        self._notify_url = notify_url

    def config(self, port: int) -> dict[str, Any]:
        assert self.root is not None
        doc: dict[str, Any] = {
            "version": 0.1,
            "log": {"fields": {"service": "registry"}},
            "storage": {
                "cache": {"blobdescriptor": "inmemory"},
                "filesystem": {"rootdirectory": str(self.root / "data")},
                "delete": {"enabled": True},
            },
            "http": {"addr": f"127.0.0.1:{port}", "secret": "registry-trio-bench"},
        }
        if self._notify_url:
            doc["notifications"] = {
                "endpoints": [
                    {
                        "name": "bench-receiver",
                        "url": self._notify_url,
                        "timeout": "1s",
                        "threshold": 5,
                        "backoff": "1s",
                    }
                ]
            }
        return doc

    def _start(self) -> None:
        assert self.root is not None
        port = free_port()
        config = self.root / "config.yml"  # JSON is YAML
        config.write_text(json.dumps(self.config(port), indent=2))
        self._spawn_reader([self._binary, "serve", str(config)], "dist-log")
        self.url = f"http://127.0.0.1:{port}"
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Poll ``GET /v2/`` (with a deadline) until it answers; fail if the process exits."""
        assert self.proc is not None
        deadline = time.monotonic() + self._start_timeout
        pause = 0.01
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/v2/", timeout=2).status_code == 200:
                    return
            time.sleep(pause)  # polling interval while the binary starts, with the deadline
            pause = min(pause * 2, 0.2)
        raise self._not_ready(f"docker-registry did not answer on {self.url}")


# -- one measured run ---------------------------------------------------------------------------


class PortableClient(RegistryClient):
    """RegistryClient whose blob uploads every registry implements.

    ``RegistryClient.push_blob`` uploads with one ``POST ?digest=`` (the spec's optional
    single-request upload). Distribution 2.8 does not implement it: it answers 202, opens an
    upload session and ignores the body, so the manifest PUT then fails with "blob unknown".
    ``post-put`` (default) uploads every blob with ``POST`` then ``PUT <Location>?digest=``
    carrying the body, on every server; ``single-post`` tries the single POST and, on a 202,
    finishes with the PUT as the spec says a client must.
    """

    def __init__(self, base_url: str, *, client: httpx.AsyncClient, upload: str) -> None:
        super().__init__(base_url, client=client)
        self.upload = upload
        self.fallbacks = 0

    async def push_blob(self, repository: str, blob: Blob) -> httpx.Response | None:
        head = await self.http.head(f"/v2/{repository}/blobs/{blob.digest}")
        if head.status_code == 200:
            return None
        octets = {"Content-Type": "application/octet-stream"}
        if self.upload == "single-post":
            started = await self.http.post(
                f"/v2/{repository}/blobs/uploads/",
                params={"digest": blob.digest},
                content=blob.data,
                headers=octets,
            )
            started.raise_for_status()
            if started.status_code == 201:
                return started
            self.fallbacks += 1
        else:
            started = await self.http.post(f"/v2/{repository}/blobs/uploads/")
            started.raise_for_status()
        response = await self.http.put(
            session_url(started.headers["Location"], digest=blob.digest),
            content=blob.data,
            headers=octets,
        )
        response.raise_for_status()
        return response


async def push_images(
    args: argparse.Namespace,
    url: str,
    images: list[Image],
    prefix: str,
    transport: TimingTransport,
    desc: str,
) -> tuple[float, int]:
    """bench/push.py's push phase over ``images``; wall seconds, single-POST fallbacks."""
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=120) as http:
        client = PortableClient(url, client=http, upload=args.upload)

        async def push(i: int) -> None:
            await client.push_image(f"{prefix}-{i % args.repos}", f"img-{i}", images[i])

        return await run_phase(args, desc, push, len(images)), client.fallbacks


def wait_for_events(receiver: Receiver, at_least: int, deadline: float) -> tuple[int, bool]:
    """Poll the receiver's count until it reaches ``at_least``; (count, reached)."""
    end = time.monotonic() + deadline
    while True:
        count = receiver.count()["events"]
        if count >= at_least or time.monotonic() >= end:
            return count, count >= at_least
        time.sleep(0.1)  # polling interval, bounded by the deadline


def measure(
    args: argparse.Namespace,
    target: str,
    server: ManagedProcess,
    receiver: Receiver | None,
    round_: int,
) -> dict[str, Any]:
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    warm = [make_image((args.layer_size,)) for _ in range(args.concurrency)]
    images = [make_image((args.layer_size,)) for _ in range(args.count)]
    prefix = f"compare/r{round_}"
    events_before = receiver.count()["events"] if receiver else 0
    trio.run(
        push_images,
        args,
        server.url,
        warm,
        f"{prefix}-warm",
        TimingTransport(httpx.AsyncHTTPTransport(limits=limits)),
        f"{target} warm-up",
    )
    transport = TimingTransport(httpx.AsyncHTTPTransport(limits=limits))
    load_before = os.getloadavg()[0]
    cpu_before = sum(server.cpu_times())
    seconds, fallbacks = trio.run(
        push_images, args, server.url, images, prefix, transport, f"{target} push"
    )
    cpu_push = sum(server.cpu_times()) - cpu_before
    load_after = os.getloadavg()[0]
    entry: dict[str, Any] = {
        "target": target,
        "round": round_,
        "images": args.count,
        "seconds": seconds,
        "single_post_fallbacks": fallbacks,
        "latencies_ms": [v * 1000 for v in transport.latencies["manifest PUT"]],
        "latency_ms": latency_table(transport),
        "statuses": {k: dict(v) for k, v in transport.statuses.items()},
        "server_cpu_s": cpu_push,
        "server_cpu_with_delivery_s": cpu_push,
        "load_average_1m": [round(load_before, 2), round(load_after, 2)],
        # Read from the kernel while the server runs: what --pin and --workers asked for.
        "cpus": {"server": server.allowed_cpus(), "client": sorted(os.sched_getaffinity(0))},
        "server_processes": server.process_count(),
    }
    if receiver is not None:
        entry["cpus"]["receiver"] = sorted(os.sched_getaffinity(receiver.pid))
    if receiver is not None:
        expected = EVENTS_PER_IMAGE * (len(warm) + len(images))
        started = time.perf_counter()
        count, complete = wait_for_events(
            receiver, events_before + expected, args.delivery_deadline
        )
        entry["server_cpu_with_delivery_s"] = sum(server.cpu_times()) - cpu_before
        entry["events_received"] = count - events_before
        entry["events_expected_at_least"] = expected
        entry["events_complete"] = complete
        entry["delivery_tail_s"] = round(time.perf_counter() - started, 3)
    return entry


def run_target(
    args: argparse.Namespace, target: str, receiver: Receiver, round_: int, run_dir: str
) -> dict[str, Any]:
    notify = target.endswith(("+notify", "+events"))
    if target.startswith("distribution"):
        server: ManagedProcess = DistributionProcess(
            args.distribution_binary,
            notify_url=receiver.url if notify else None,
            data_dir=run_dir,
            start_timeout=args.start_timeout,
            cpus=cpu_list(args.server_cpus),
            keep_root=True,
        )
    else:
        sinks = [{"type": "http", "address": receiver.url, "format": args.format}]
        server = ServerProcess(
            data_dir=run_dir,
            sinks=sinks if notify else (),
            http=trio_http_settings(args),
            log_file=args.server_log,
            start_timeout=args.start_timeout,
            cpus=cpu_list(args.server_cpus),
            keep_root=True,
        )
    with server:
        try:
            return measure(args, target, server, receiver if notify else None, round_)
        except Exception:
            print(f"{target} log (last lines):\n{server.log_tail(12)}", file=sys.stderr)
            print(receiver.status(), file=sys.stderr)
            raise


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """All rounds of one target together."""
    images = sum(r["images"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    latencies = sorted(v for r in runs for v in r["latencies_ms"])
    pct = percentiles(latencies, (50, 99))
    out: dict[str, Any] = {
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1),
        "manifest_put_p50_ms": round(pct["p50"], 3),
        "manifest_put_p99_ms": round(pct["p99"], 3),
        "server_cpu_ms_per_image": round(sum(r["server_cpu_s"] for r in runs) / images * 1000, 3),
        "server_cpu_ms_per_image_with_delivery": round(
            sum(r["server_cpu_with_delivery_s"] for r in runs) / images * 1000, 3
        ),
        "single_post_fallbacks": sum(r["single_post_fallbacks"] for r in runs),
        "load_average_1m": [la for r in runs for la in r["load_average_1m"]],
        "rounds": [
            {k: v for k, v in r.items() if k not in ("latencies_ms", "target")} for r in runs
        ],
    }
    if "events_received" in runs[0]:
        out["events_received"] = sum(r["events_received"] for r in runs)
        out["events_complete"] = all(r["events_complete"] for r in runs)
    return out


def ratios(trio_: dict[str, Any], dist: dict[str, Any]) -> dict[str, float]:
    keys = (
        "images_per_s",
        "manifest_put_p50_ms",
        "manifest_put_p99_ms",
        "server_cpu_ms_per_image",
        "server_cpu_ms_per_image_with_delivery",
    )
    return {k: round(trio_[k] / dist[k], 3) for k in keys if dist[k]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    binary = args.distribution_binary
    results: dict[str, Any] = {}
    have_distribution = Path(binary).is_file() and os.access(binary, os.X_OK)
    if have_distribution:
        results["distribution"] = {"binary": binary, "version": distribution_version(binary)}
        targets = TARGETS
    else:
        results["distribution"] = {
            "binary": binary,
            "skipped": True,
            "reason": f"{binary} not found (or not executable)",
            "install": INSTALL_HINT,
        }
        targets = tuple(t for t in TARGETS if not t.startswith("distribution"))
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
    if args.client_cpus is not None:
        # This thread, every thread it starts from now on and the receiver (a child
        # process) inherit it; each server is started on args.server_cpus instead.
        os.sched_setaffinity(0, args.client_cpus)
    # Every server's data stays until the end of the run. Removing one server's files just
    # before the next starts made the next pay for it: ext4 without a journal checks each
    # recently freed inode it passes when creating a file (measured here: 94-233 us of
    # kernel CPU per file created after a removal, 7.5 us otherwise), and the servers take
    # turns.
    run_dir = tempfile.mkdtemp(prefix="compare-", dir=args.data_dir)
    try:
        with Receiver() as receiver:
            for round_ in range(args.rounds):
                for target in targets:
                    runs[target].append(run_target(args, target, receiver, round_, run_dir))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    results["targets"] = {t: summarise(r) for t, r in runs.items()}
    if have_distribution:
        t = results["targets"]
        results["ratios"] = {
            "events_off": ratios(t["registry-trio"], t["distribution"]),
            "events_on": ratios(t["registry-trio+events"], t["distribution+notify"]),
        }
    return results


def report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    dist = results["distribution"]
    if dist.get("skipped"):
        print(
            f"distribution: SKIPPED -- {dist['reason']}; install it with "
            f"'{dist['install']}' (Debian/Ubuntu, distribution 2.8) or pass "
            "--distribution-binary PATH"
        )
    else:
        print(f"distribution: {dist['version']}")
    print(
        f"workload: {args.count} images x {args.rounds} round(s) per server "
        f"({args.layer_size} B layer + config + manifest), {args.repos} repos, "
        f"concurrency {args.concurrency}"
    )
    if args.pin:
        print(
            f"pinned: servers on CPU {cpu_list(args.server_cpus)}, load generator and receiver "
            f"on CPU {cpu_list(args.client_cpus)}"
        )
    print()
    header = (
        f"{'server':24} {'images/s':>9} {'PUT p50':>8} {'PUT p99':>8} "
        f"{'CPU ms/img':>10} {'+delivery':>10} {'events':>8} {'load 1m':>12}"
    )
    print(header)
    print(f"{'':24} {'':9} {'(ms)':>8} {'(ms)':>8}")
    for target, row in results["targets"].items():
        events = str(row["events_received"]) if "events_received" in row else "-"
        if "events_complete" in row and not row["events_complete"]:
            events += "!"
        loads = row["load_average_1m"]
        print(
            f"{LABELS[target]:24} {row['images_per_s']:9.1f} {row['manifest_put_p50_ms']:8.2f} "
            f"{row['manifest_put_p99_ms']:8.2f} {row['server_cpu_ms_per_image']:10.2f} "
            f"{row['server_cpu_ms_per_image_with_delivery']:10.2f} {events:>8} "
            f"{min(loads):5.2f}-{max(loads):<5.2f}"
        )
    if "ratios" in results:
        print()
        print(
            "registry-trio / distribution "
            "(images/s above 1: faster; latency, CPU above 1: costlier)"
        )
        for mode, r in results["ratios"].items():
            print(
                f"  {mode.replace('_', ' '):11} images/s {r.get('images_per_s', 0):5.2f}   "
                f"PUT p50 {r.get('manifest_put_p50_ms', 0):5.2f}   "
                f"PUT p99 {r.get('manifest_put_p99_ms', 0):5.2f}   "
                f"CPU/img {r.get('server_cpu_ms_per_image', 0):5.2f}   "
                f"CPU/img incl. delivery {r.get('server_cpu_ms_per_image_with_delivery', 0):5.2f}"
            )
    incomplete = [t for t, row in results["targets"].items() if row.get("events_complete") is False]
    if incomplete:
        print()
        print(
            "! fewer events than expected arrived within --delivery-deadline for: "
            + ", ".join(incomplete)
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    settings = {
        "count": args.count,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "layer_size": args.layer_size,
        "repos": args.repos,
        "upload": args.upload,
        "trio_sink_format": args.format,
        "trio_http": trio_http_settings(args),
        "pin": {"server": args.server_cpus, "client": args.client_cpus} if args.pin else None,
        "distribution_binary": args.distribution_binary,
    }
    if not args.json:
        print_header(
            "registry-trio vs Docker distribution, push (bench/compare.py)", machine, settings
        )
    try:
        results = run(args)
    except Exception as exc:
        report_failure("compare.py", exc, None)
        return 1
    if args.json:
        emit_json({"benchmark": "compare", "machine": machine, "settings": settings, **results})
    else:
        report(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
