"""Push and pull one big blob: streaming throughput and the server's memory while it streams.

What it measures
    One blob of --size bytes (default 1 GiB) of deterministic pseudo-random data is pushed to
    a freshly started registry-trio and pulled back. The data comes from a generator, chunk by
    chunk, and is never held in memory on the client: a first streaming pass computes its
    sha256, then the upload streams it, either as one monolithic POST ?digest= whose body
    is the generator (--upload post, the default) or as a session of PATCH chunks of
    --chunk-size closed by PUT ?digest= (--upload patch, what docker does). The pull
    streams the GET response and checks its digest as the bytes arrive.

    While each direction runs, the server's resident memory is sampled from
    /proc/<pid>/status every --sample-interval seconds (VmRSS), and the kernel's own peak
    (VmHWM, reset through /proc/<pid>/clear_refs before each phase) is read at its end. It
    prints the peak RSS during the push and during the pull, MB/s each way
    (1 MB = 10^6 bytes), and PASS/FAIL against the goal: peak RSS below --goal (150 MB) in
    both directions, i.e. memory stays flat whatever the blob size.

How to run
    .venv/bin/python bench/bigblob.py                    # 1 GiB, starts its own server
    .venv/bin/python bench/bigblob.py --size 4GiB --upload patch --chunk-size 64MiB
    .venv/bin/python bench/bigblob.py --data-dir /mnt/ssd --json
    .venv/bin/python bench/bigblob.py --url http://127.0.0.1:5000 --server-pid 1234

It needs --size of free disk under the storage directory. The exit status is 0 on PASS,
1 when a request fails or the digest does not match, 3 when the memory goal is missed.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
from common import (
    MB,
    MiB,
    ServerProcess,
    base_parser,
    cpu_times,
    emit_json,
    format_size,
    machine_info,
    parse_size,
    print_header,
    progress,
    read_memory,
    report_failure,
    reset_peak,
)
from registry_client import session_url

GOAL_MB = 150
GEN_CHUNK = MiB
EXIT_GOAL_MISSED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__ or "")
    blob = parser.add_argument_group("blob")
    blob.add_argument(
        "--size",
        type=parse_size,
        default=1 << 30,
        metavar="SIZE",
        help="blob size: bytes or with a unit, e.g. 2MiB, 512MiB, 1GiB, 100MB (default: 1GiB)",
    )
    blob.add_argument(
        "--upload",
        choices=("post", "patch"),
        default="post",
        help="post: one monolithic POST ?digest= streaming the whole blob; patch: POST to "
        "open a session, PATCH chunks, PUT ?digest= to close (default: %(default)s)",
    )
    blob.add_argument(
        "--chunk-size",
        type=parse_size,
        default=64 * MiB,
        metavar="SIZE",
        help="bytes per PATCH with --upload patch (default: 64MiB)",
    )
    blob.add_argument(
        "--seed", type=int, default=1, help="seed of the pseudo-random data (default: 1)"
    )
    blob.add_argument(
        "--repository", default="bench/bigblob", help="repository (default: %(default)s)"
    )
    memory = parser.add_argument_group("memory")
    memory.add_argument(
        "--goal",
        type=float,
        default=GOAL_MB,
        metavar="MB",
        help="peak server RSS goal in MB (10^6 bytes), each direction (default: %(default)s)",
    )
    memory.add_argument(
        "--sample-interval",
        type=float,
        default=0.02,
        metavar="SECONDS",
        help="how often VmRSS is sampled (default: %(default)s)",
    )
    memory.add_argument(
        "--server-pid",
        type=int,
        metavar="PID",
        help="with --url: the registry's process id, to sample its memory (same machine)",
    )
    return parser


# -- the data --------------------------------------------------------------------------------


def chunks(size: int, seed: int, chunk: int = GEN_CHUNK, start: int = 0) -> Iterator[bytes]:
    """Bytes [start, size) of the blob, as chunks that never cross a multiple of ``chunk``.

    Block i is a seeded pseudo-random MiB with i written over its first 8 bytes: every
    block differs, generating one costs a copy, and any range can be regenerated.
    """
    import random

    base = random.Random(seed).randbytes(GEN_CHUNK)
    tail = base[8:]
    position = start
    while position < size:
        index, offset = divmod(position, GEN_CHUNK)
        block = struct.pack(">Q", index) + tail
        end = min(GEN_CHUNK, size - index * GEN_CHUNK, offset + chunk)
        piece = block[offset:end] if (offset, end) != (0, GEN_CHUNK) else block
        position += len(piece)
        yield piece


def blob_digest(size: int, seed: int) -> str:
    hasher = hashlib.sha256()
    for piece in chunks(size, seed):
        hasher.update(piece)
    return "sha256:" + hasher.hexdigest()


# -- memory sampling -------------------------------------------------------------------------


@dataclass
class MemorySampler:
    pid: int | None
    interval: float
    samples: list[tuple[float, int]] = field(default_factory=list)
    hwm_reset: bool = False

    def start_phase(self) -> None:
        self.samples = []
        self.hwm_reset = self.pid is not None and reset_peak(self.pid)

    async def run(self) -> None:
        if self.pid is None:
            return
        while True:
            try:
                rss = read_memory(self.pid)["VmRSS"]
            except (OSError, KeyError):
                return
            self.samples.append((time.perf_counter(), rss))
            await trio.sleep(self.interval)

    def phase_result(self) -> dict[str, Any]:
        if self.pid is None:
            return {}
        now = read_memory(self.pid)
        sampled = max((rss for _, rss in self.samples), default=now["VmRSS"])
        # VmHWM covers the whole phase when it was reset at its start; else only the samples.
        peak = max(sampled, now["VmHWM"]) if self.hwm_reset else sampled
        return {
            "peak_rss_bytes": peak,
            "peak_rss_sampled_bytes": sampled,
            "vmhwm_bytes": now["VmHWM"] if self.hwm_reset else None,
            "rss_after_bytes": now["VmRSS"],
            "samples": len(self.samples),
        }


# -- the transfer ----------------------------------------------------------------------------


async def _body(args: argparse.Namespace, start: int, end: int, bar: Any) -> AsyncIterator[bytes]:
    """Bytes [start, end) of the blob, generated as the upload consumes them."""
    for piece in chunks(end, args.seed, start=start):
        yield piece
        bar.update(len(piece))


def _check(response: httpx.Response, expected: int, what: str) -> None:
    if response.status_code != expected:
        raise RuntimeError(
            f"{what}: HTTP {response.status_code} (wanted {expected}): {response.text[:300]}"
        )


async def push(args: argparse.Namespace, http: httpx.AsyncClient, digest: str) -> None:
    uploads = f"/v2/{args.repository}/blobs/uploads/"
    with progress(args, args.size, "push", unit="B", unit_scale=True) as bar:
        if args.upload == "post":
            response = await http.post(
                uploads,
                params={"digest": digest},
                content=_body(args, 0, args.size, bar),
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(args.size),
                },
            )
            if response.status_code == 202:
                # A registry without single-request uploads (distribution 2.8) opens a
                # session instead and drops the body, as the spec allows: the body goes again,
                # in the PUT that closes the session.
                bar.reset()
                response = await http.put(
                    session_url(response.headers["Location"], digest=digest),
                    content=_body(args, 0, args.size, bar),
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(args.size),
                    },
                )
            _check(response, 201, "monolithic POST")
            return
        response = await http.post(uploads)
        _check(response, 202, "POST (open session)")
        # Each answer's Location is where the next request goes: distribution's changes with
        # every chunk (its `_state`), and may be relative or absolute.
        location = response.headers["Location"]
        offset = 0
        while offset < args.size:
            end = min(offset + args.chunk_size, args.size)
            response = await http.patch(
                location,
                content=_body(args, offset, end, bar),
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(end - offset),
                    "Content-Range": f"{offset}-{end - 1}",
                },
            )
            _check(response, 202, f"PATCH {offset}-{end - 1}")
            location = response.headers["Location"]
            offset = end
        response = await http.put(session_url(location, digest=digest))
        _check(response, 201, "PUT (close session)")


async def pull(args: argparse.Namespace, http: httpx.AsyncClient, digest: str) -> None:
    hasher = hashlib.sha256()
    received = 0
    with progress(args, args.size, "pull", unit="B", unit_scale=True) as bar:
        async with http.stream("GET", f"/v2/{args.repository}/blobs/{digest}") as response:
            _check(response, 200, "GET blob")
            async for piece in response.aiter_raw():
                hasher.update(piece)
                received += len(piece)
                bar.update(len(piece))
    actual = "sha256:" + hasher.hexdigest()
    if received != args.size or actual != digest:
        raise ValueError(f"pulled {received} bytes with digest {actual}; pushed {digest}")


async def benchmark(args: argparse.Namespace, url: str, pid: int | None) -> dict[str, Any]:
    started = time.perf_counter()
    digest = await trio.to_thread.run_sync(blob_digest, args.size, args.seed)
    results: dict[str, Any] = {
        "digest": digest,
        "digest_pass_s": round(time.perf_counter() - started, 3),
    }
    sampler = MemorySampler(pid, args.sample_interval)
    if pid is not None:
        results["server_rss_before_bytes"] = read_memory(pid)["VmRSS"]
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for phase, run in (("push", push), ("pull", pull)):
            sampler.start_phase()
            server_cpu = sum(cpu_times(pid)) if pid is not None else None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sampler.run)
                client_cpu = time.process_time()
                t0 = time.perf_counter()
                await run(args, http, digest)
                seconds = time.perf_counter() - t0
                client_cpu = time.process_time() - client_cpu
                nursery.cancel_scope.cancel()
            entry: dict[str, Any] = {
                "seconds": round(seconds, 3),
                "mb_per_s": round(args.size / seconds / MB, 1),
                "client_cpu_s": round(client_cpu, 3),
            }
            if pid is not None and server_cpu is not None:
                entry["server_cpu_s"] = round(sum(cpu_times(pid)) - server_cpu, 3)
            results[phase] = {**entry, **sampler.phase_result()}
    return results


def verdict(args: argparse.Namespace, results: dict[str, Any]) -> str:
    peaks = [results[p].get("peak_rss_bytes") for p in ("push", "pull")]
    if None in peaks:
        return "SKIP"
    return "PASS" if max(peaks) < args.goal * MB else "FAIL"


def report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    print(
        f"blob {format_size(args.size)} ({args.size} bytes), upload={args.upload}"
        + (f" in {format_size(args.chunk_size)} chunks" if args.upload == "patch" else "")
        + f", {results['digest']}"
    )
    print(f"client digest pass: {results['digest_pass_s']:.2f} s")
    if "server_rss_before_bytes" in results:
        print(f"server RSS before: {results['server_rss_before_bytes'] / MB:.1f} MB")
    print()
    for phase in ("push", "pull"):
        r = results[phase]
        line = f"{phase:5} {r['mb_per_s']:8.1f} MB/s  {r['seconds']:7.2f} s"
        if "peak_rss_bytes" in r:
            line += f"   peak RSS {r['peak_rss_bytes'] / MB:6.1f} MB"
        print(line)
        cpu = f"client CPU {r['client_cpu_s']:.2f} s"
        if "server_cpu_s" in r:
            cpu = f"server CPU {r['server_cpu_s']:.2f} s, " + cpu
        detail = [cpu]
        if "peak_rss_bytes" in r:
            detail.append(
                f"RSS sampled max {r['peak_rss_sampled_bytes'] / MB:.1f} MB over "
                f"{r['samples']} samples, {r['rss_after_bytes'] / MB:.1f} MB after"
            )
        print("      " + "; ".join(detail))
    print()
    outcome = results["verdict"]
    if outcome == "SKIP":
        print("memory goal: SKIP (no server pid: pass --server-pid with --url)")
    else:
        peak = max(results[p]["peak_rss_bytes"] for p in ("push", "pull"))
        print(f"memory goal: {outcome} (peak RSS {peak / MB:.1f} MB, goal < {args.goal:g} MB)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.server_pid is not None and not args.url:
        build_parser().error("--server-pid goes with --url (a started server is sampled anyway)")
    machine = machine_info()
    settings = {
        "size": args.size,
        "upload": args.upload,
        "chunk_size": args.chunk_size if args.upload == "patch" else None,
        "goal_mb": args.goal,
        "sample_interval": args.sample_interval,
        "target": args.url or "started registry-trio subprocess",
    }
    if not args.json:
        print_header("registry-trio big blob benchmark (bench/bigblob.py)", machine, settings)
    server = None
    try:
        if args.url:
            results = trio.run(benchmark, args, args.url, args.server_pid)
        else:
            with ServerProcess(
                data_dir=args.data_dir,
                events=args.events,
                log_file=args.server_log,
                start_timeout=args.start_timeout,
            ) as server:
                results = trio.run(benchmark, args, server.url, server.pid)
    except Exception as exc:
        report_failure("bigblob.py", exc, server)
        return 1
    results["verdict"] = verdict(args, results)
    if args.json:
        emit_json({"benchmark": "bigblob", "machine": machine, "settings": settings, **results})
    else:
        report(args, results)
    return EXIT_GOAL_MISSED if results["verdict"] == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
