"""Push then pull many small images: the registry's request rate and per-request latency.

What it measures
    N small, unique images (one 4 KiB layer + a config blob + an OCI manifest), spread over
    several repositories, pushed by C concurrent workers with registry_client.py's
    RegistryClient over one httpx.AsyncClient whose connection pool holds C connections;
    then every image is pulled back (manifest GET, then each blob GET with its digest
    checked). Per image a push is 2 blob HEADs (both 404), 2 monolithic blob uploads
    (POST ?digest=) and 1 manifest PUT; a pull is 1 manifest GET and 2 blob GETs.

    It prints, for push and for pull: images/s, MB/s of content (blobs + manifests,
    1 MB = 10^6 bytes) and wall time; p50/p95/p99/max latency per request type (blob HEAD,
    blob upload, manifest PUT, manifest GET, blob GET; timed from sending the request to the
    last byte of the response body); and, when the script started the server itself, the
    server's CPU time (user + system, from /proc/<pid>/stat) per pushed and per pulled image.
    The client runs on the same machine and its own CPU time is printed too: on a small
    machine the two compete for cores.

How to run
    .venv/bin/python bench/push.py                      # N=500, C=8, starts its own server
    .venv/bin/python bench/push.py -n 2000 -c 32
    .venv/bin/python bench/push.py --events             # with the durable event outbox on
    .venv/bin/python bench/push.py --url http://127.0.0.1:5000 --json

The exit status is non-zero if any request fails or any pulled blob has the wrong digest.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import httpx
import trio
from common import (
    MB,
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
from registry_client import Image, RegistryClient, make_image

REQUEST_TYPES = ("blob HEAD", "blob upload", "manifest PUT", "manifest GET", "blob GET")


def request_type(request: httpx.Request) -> str:
    path, method = request.url.path, request.method
    if "/blobs/uploads" in path:
        return "blob upload"
    if "/blobs/" in path:
        return f"blob {method}"
    if "/manifests/" in path:
        return f"manifest {method}"
    return f"other {method}"


class _TimedStream(httpx.AsyncByteStream):
    """Wraps a response body; the request's latency ends when the body has been read."""

    def __init__(self, inner: httpx.AsyncByteStream, done: Any) -> None:
        self._inner = inner
        self._done = done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._done()


class TimingTransport(httpx.AsyncBaseTransport):
    """Records the latency of every request by type: send to last byte of the body."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.statuses: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        kind = request_type(request)
        started = time.perf_counter()
        response = await self.inner.handle_async_request(request)
        self.statuses[kind][response.status_code] += 1
        recorded = False

        def done() -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                self.latencies[kind].append(time.perf_counter() - started)

        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_TimedStream(response.stream, done),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()

    def reset(self) -> None:
        self.latencies.clear()
        self.statuses.clear()


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(
        __doc__ or "",
        count=500,
        concurrency=8,
        count_help="how many images to push and pull",
    )
    load = parser.add_argument_group("images")
    load.add_argument(
        "--repos",
        type=positive_int,
        default=8,
        metavar="R",
        help="spread the images over R repositories, bench/push-0 .. bench/push-<R-1> "
        "(default: %(default)s)",
    )
    load.add_argument(
        "--layer-size",
        type=int,
        default=4096,
        metavar="BYTES",
        help="size of each image's one layer (default: %(default)s)",
    )
    load.add_argument(
        "--prefix",
        default="bench/push",
        help="repository name prefix (default: %(default)s); use a fresh one when pointing "
        "--url at a registry that already ran this benchmark",
    )
    return parser


async def run_phase(
    args: argparse.Namespace,
    desc: str,
    work: Any,
    count: int,
) -> float:
    """Run ``work(i)`` for i in range(count) on ``args.concurrency`` workers; wall seconds."""
    next_index = iter(range(count))
    with progress(args, count, desc, unit="img") as bar:

        async def worker() -> None:
            for i in next_index:
                await work(i)
                bar.update(1)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(min(args.concurrency, count)):
                nursery.start_soon(worker)
        return time.perf_counter() - started


def latency_table(transport: TimingTransport) -> dict[str, dict[str, float]]:
    table = {}
    for kind in (*REQUEST_TYPES, *sorted(set(transport.latencies) - set(REQUEST_TYPES))):
        values = transport.latencies.get(kind)
        if not values:
            continue
        ms = [v * 1000 for v in values]
        table[kind] = {
            "count": len(ms),
            **{k: round(v, 3) for k, v in percentiles(ms).items()},
            "max": round(max(ms), 3),
        }
    return table


async def benchmark(args: argparse.Namespace, url: str, server: ServerProcess | None) -> dict:
    images: list[Image] = [make_image((args.layer_size,)) for _ in range(args.count)]
    repos = [f"{args.prefix}-{i % args.repos}" for i in range(args.count)]
    content_bytes = sum(
        len(im.manifest) + len(im.config.data) + sum(len(b.data) for b in im.layers)
        for im in images
    )
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    transport = TimingTransport(httpx.AsyncHTTPTransport(limits=limits))
    results: dict[str, Any] = {"content_bytes": content_bytes}
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=120) as http:
        client = RegistryClient(url, client=http)

        async def push(i: int) -> None:
            await client.push_image(repos[i], f"img-{i}", images[i])

        async def pull(i: int) -> None:
            manifest = await client.pull_image(repos[i], f"img-{i}")
            if hashlib.sha256(manifest).hexdigest() != images[i].digest.split(":", 1)[1]:
                raise ValueError(f"{repos[i]}:img-{i} came back as a different manifest")

        for phase, work in (("push", push), ("pull", pull)):
            transport.reset()
            cpu_before = server.cpu_times() if server else None
            client_cpu_before = time.process_time()
            seconds = await run_phase(args, phase, work, args.count)
            client_cpu = time.process_time() - client_cpu_before
            entry: dict[str, Any] = {
                "seconds": round(seconds, 3),
                "images_per_s": round(args.count / seconds, 1),
                "requests_per_s": round(
                    sum(len(v) for v in transport.latencies.values()) / seconds, 1
                ),
                "mb_per_s": round(content_bytes / seconds / MB, 3),
                "latency_ms": latency_table(transport),
                "statuses": {k: dict(v) for k, v in transport.statuses.items()},
                "client_cpu_ms_per_image": round(client_cpu / args.count * 1000, 3),
            }
            if server is not None and cpu_before is not None:
                user, system = (b - a for a, b in zip(cpu_before, server.cpu_times(), strict=True))
                cpu = user + system
                entry["server_cpu_s"] = round(cpu, 3)
                entry["server_cpu_user_s"] = round(user, 3)
                entry["server_cpu_system_s"] = round(system, 3)
                entry["server_cpu_ms_per_image"] = round(cpu / args.count * 1000, 3)
                entry["server_cpu_utilisation"] = round(cpu / seconds, 3)
            results[phase] = entry
    if server is not None:
        results["server_memory"] = server.memory()
    return results


def report(args: argparse.Namespace, results: dict) -> None:
    print(
        f"{args.count} images ({args.layer_size} B layer + config + manifest each, "
        f"{results['content_bytes'] / MB:.2f} MB in all) over {args.repos} repositories, "
        f"concurrency {args.concurrency}"
    )
    print()
    for phase in ("push", "pull"):
        r = results[phase]
        line = (
            f"{phase:5} {r['images_per_s']:8.1f} images/s  {r['requests_per_s']:8.1f} req/s  "
            f"{r['mb_per_s']:7.2f} MB/s  {r['seconds']:7.2f} s"
        )
        if "server_cpu_ms_per_image" in r:
            line += (
                f"   server CPU {r['server_cpu_ms_per_image']:.2f} ms/image "
                f"({r['server_cpu_user_s'] / max(r['server_cpu_s'], 1e-9) * 100:.0f}% user, "
                f"{r['server_cpu_utilisation'] * 100:.0f}% of a core)"
            )
        line += f"   client CPU {r['client_cpu_ms_per_image']:.2f} ms/image"
        print(line)
    print()
    print(f"{'latency (ms)':14} {'count':>7} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}")
    for phase in ("push", "pull"):
        for kind, row in results[phase]["latency_ms"].items():
            print(
                f"{kind:14} {row['count']:7d} {row['p50']:8.2f} {row['p95']:8.2f} "
                f"{row['p99']:8.2f} {row['max']:8.2f}"
            )
    if "server_memory" in results:
        mem = results["server_memory"]
        print()
        print(
            f"server memory after the run: RSS {mem['VmRSS'] / MB:.1f} MB, "
            f"peak {mem['VmHWM'] / MB:.1f} MB"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    machine = machine_info()
    settings = {
        "count": args.count,
        "concurrency": args.concurrency,
        "repos": args.repos,
        "layer_size": args.layer_size,
        "target": args.url or "started registry-trio subprocess",
        "events": args.events if not args.url else "n/a",
    }
    if not args.json:
        print_header("registry-trio push/pull benchmark (bench/push.py)", machine, settings)
    server = None
    try:
        if args.url:
            results = trio.run(benchmark, args, args.url, None)
        else:
            with ServerProcess(
                data_dir=args.data_dir,
                events=args.events,
                log_file=args.server_log,
                start_timeout=args.start_timeout,
            ) as server:
                results = trio.run(benchmark, args, server.url, server)
    except Exception as exc:
        report_failure("push.py", exc, server)
        return 1
    if args.json:
        emit_json({"benchmark": "push", "machine": machine, "settings": settings, **results})
    else:
        report(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
