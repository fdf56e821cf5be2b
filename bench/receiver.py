"""A counting webhook receiver for the benchmarks, run as its own process.

``python bench/receiver.py [--delay SECONDS] [--record] [--port N] [--print]`` prints
``listening on URL``; POSTs to any path are answered 200 (after ``--delay``), and ``GET /count``
returns how many events and requests arrived (a CloudEvents batch or a distribution envelope
counts all its events). It runs in a separate process so that its CPU is not taken from the
registry's delivery loop. ``--port`` listens on a fixed port (default: a free one), and
``--print`` prints every POST as it arrives (path, content type, signature header, body): the
receiver the configs in examples/ send to.

With ``--record`` it also parses every event (CloudEvents structured, binary and batch, and
distribution envelopes) and ``GET /ids`` returns::

    {"events": N, "requests": N,
     "ids": {"<event id>": <copies received>, ...},
     "conflicting_ids": [ids whose copies were not byte-for-byte the same event],
     "manifests": [{"id", "repository", "reference", "digest", "request_id",
                    "received_at"}, ...]}

``manifests`` lists each manifest-push event once (by id). ``--record`` is off by default so
that the drain benchmarks do not pay for the parsing.

:class:`Receiver` runs this script as a subprocess (``from receiver import Receiver``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

BATCH = "application/cloudevents-batch+json"
DISTRIBUTION = "application/vnd.docker.distribution.events.v1+json"
STRUCTURED = "application/cloudevents+json"
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


def count_events(content_type: str, body: bytes) -> int:
    if content_type.startswith(BATCH):
        return len(json.loads(body))
    if content_type.startswith(DISTRIBUTION):
        return len(json.loads(body)["events"])
    return 1


def _fingerprint(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def parse_events(headers: dict[str, str], body: bytes) -> list[tuple[str, str, dict | None]]:
    """``(id, fingerprint, manifest record or None)`` for every event in one request."""
    content_type = headers.get("content-type", "")
    out: list[tuple[str, str, dict | None]] = []
    if content_type.startswith(DISTRIBUTION):
        for event in json.loads(body)["events"]:
            target = event.get("target", {})
            manifest = None
            if event.get("action") == "push" and target.get("mediaType") in MANIFEST_TYPES:
                manifest = {
                    "repository": target.get("repository"),
                    "reference": target.get("tag") or target.get("digest"),
                    "digest": target.get("digest"),
                    "request_id": event.get("request", {}).get("id"),
                }
            out.append((event["id"], _fingerprint(event), manifest))
        return out
    if "ce-id" in headers:  # CloudEvents binary mode: attributes in headers, data in the body
        attributes = {k: v for k, v in headers.items() if k.startswith("ce-")}
        data = json.loads(body) if body else {}
        events = [({"id": headers["ce-id"], "type": headers.get("ce-type", "")}, data, attributes)]
    else:
        parsed = json.loads(body)
        items = parsed if content_type.startswith(BATCH) else [parsed]
        events = [(item, item.get("data") or {}, item) for item in items]
    for attributes, data, whole in events:
        manifest = None
        if str(attributes.get("type", "")).endswith(".image.updated"):
            manifest = {
                "repository": data.get("name"),
                "reference": data.get("reference"),
                "digest": data.get("digest"),
                "request_id": (data.get("request") or {}).get("id"),
            }
        out.append((attributes["id"], _fingerprint([whole, data]), manifest))
    return out


class Record:
    """Every event id seen, how many copies, and the manifest pushes."""

    def __init__(self) -> None:
        self.copies: dict[str, int] = {}
        self.fingerprints: dict[str, str] = {}
        self.conflicting: set[str] = set()
        self.manifests: dict[str, dict] = {}

    def add(self, headers: dict[str, str], body: bytes) -> None:
        for event_id, fingerprint, manifest in parse_events(headers, body):
            self.copies[event_id] = self.copies.get(event_id, 0) + 1
            first = self.fingerprints.setdefault(event_id, fingerprint)
            if first != fingerprint:
                self.conflicting.add(event_id)
            if manifest is not None:
                # received_at (wall clock, first copy): for the end-to-end lag of bench/workers.py.
                self.manifests.setdefault(
                    event_id, {"id": event_id, **manifest, "received_at": time.time()}
                )

    def to_json(self) -> dict[str, Any]:
        return {
            "ids": self.copies,
            "conflicting_ids": sorted(self.conflicting),
            "manifests": list(self.manifests.values()),
        }


def show(path: str, headers: dict[str, str], body: bytes) -> None:
    """One POST as a person reads it: what came where, its signature, the body."""
    signature = {k: v for k, v in headers.items() if k.endswith("-signature")}
    print(f"POST {path} {headers.get('content-type', '')} {signature or ''}".rstrip(), flush=True)
    print(body.decode(errors="replace"), flush=True)


async def main(delay: float, record: bool = False, port: int = 0, show_posts: bool = False) -> None:
    totals = {"events": 0, "requests": 0}
    recorded = Record() if record else None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the sender died mid-request: nothing was delivered
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status = 200
        if scope["method"] == "GET":
            if scope["path"] == "/ids":
                if recorded is None:
                    status, payload = 404, b'{"error": "start the receiver with --record"}'
                else:
                    payload = json.dumps({**totals, **recorded.to_json()}).encode()
            else:
                payload = json.dumps(totals).encode()
        else:
            if delay:
                await trio.sleep(delay)  # the receiver's own processing time
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            totals["events"] += count_events(headers.get("content-type", ""), bytes(body))
            totals["requests"] += 1
            if recorded is not None:
                recorded.add(headers, bytes(body))
            if show_posts:
                show(scope["path"], headers, bytes(body))
            payload = b""
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.keep_alive_timeout = 600
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(app, config, task_status=task_status))
        print(f"listening on {binds[0]}", flush=True)


class Receiver:
    """This script as a subprocess; ``url`` is where to POST events (``<base>/events``)."""

    def __init__(self, delay: float = 0.0, record: bool = False) -> None:
        self._args = ["--delay", str(delay), *(["--record"] if record else [])]
        self.url = ""
        self.base = ""
        self.proc: subprocess.Popen[str] | None = None
        # Its stderr (a traceback if it dies), kept out of the benchmark's own output.
        self._errors = tempfile.TemporaryFile()  # noqa: SIM115

    def __enter__(self) -> Receiver:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *self._args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._errors,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until the receiver listens (or dies)
        match = re.search(r"listening on (\S+)", line)
        if match is None:
            self.__exit__()
            raise RuntimeError(f"the receiver did not start: {line!r}")
        self.base = match[1]
        self.url = self.base + "/events"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def status(self) -> str:
        """Whether it still runs, and what it wrote on stderr: for failure reports."""
        assert self.proc is not None
        code = self.proc.poll()
        self._errors.seek(0)
        errors = self._errors.read().decode(errors="replace").strip()
        state = "running" if code is None else f"exited with code {code}"
        return f"receiver (pid {self.proc.pid}) {state}" + (
            f"; stderr:\n{errors}" if errors else ""
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def count(self) -> dict[str, int]:
        """``GET /count``: ``{"events": N, "requests": N}``."""
        return httpx.get(self.base + "/count", timeout=30).json()

    def ids(self) -> dict[str, Any]:
        """``GET /ids`` (needs ``record=True``): every id, copies, the manifest pushes."""
        response = httpx.get(self.base + "/ids", timeout=60)
        response.raise_for_status()
        return response.json()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per request")
    parser.add_argument(
        "--record", action="store_true", help="keep every event id; GET /ids returns them"
    )
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: free)")
    parser.add_argument(
        "--print", action="store_true", dest="show", help="print every POST as it arrives"
    )
    options = parser.parse_args()
    trio.run(main, options.delay, options.record, options.port, options.show)
