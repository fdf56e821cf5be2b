"""A counting webhook receiver for the benchmarks, run as its own process.

``python bench/receiver.py [--delay SECONDS]`` prints ``listening on URL``; POSTs to any path
are answered 200 (after ``--delay``), and ``GET /count`` returns how many events and requests
arrived (a CloudEvents batch or a distribution envelope counts all its events). It runs in a
separate process so that its CPU is not taken from the registry's delivery loop.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve


def count_events(content_type: str, body: bytes) -> int:
    if content_type.startswith("application/cloudevents-batch+json"):
        return len(json.loads(body))
    if content_type.startswith("application/vnd.docker.distribution.events.v1+json"):
        return len(json.loads(body)["events"])
    return 1


async def main(delay: float) -> None:
    totals = {"events": 0, "requests": 0}

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
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] == "GET":
            payload = json.dumps(totals).encode()
        else:
            if delay:
                await trio.sleep(delay)  # the receiver's own processing time
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            totals["events"] += count_events(headers.get("content-type", ""), bytes(body))
            totals["requests"] += 1
            payload = b""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.keep_alive_timeout = 600
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(app, config, task_status=task_status))
        print(f"listening on {binds[0]}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per request")
    trio.run(main, parser.parse_args().delay)
