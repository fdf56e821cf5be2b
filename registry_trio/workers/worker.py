"""One worker process: the whole server, on the socket and directory its supervisor gives.

Started by :mod:`.supervisor` as ``python -m registry_trio.workers.worker``, never by hand.
It reads the supervisor's config from the private directory, serves until SIGTERM or SIGINT,
and tells the supervisor over its control socket when it serves (one line, ``ready``).
The same socket tells it when the supervisor is gone (end of file): it then shuts down as on
SIGTERM, so no worker outlives its supervisor for longer than a graceful shutdown.
"""

from __future__ import annotations

import argparse
import functools
import logging
import pickle
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

import trio

from ..config import Config
from ..events.queue import QueueError
from ..logs import setup_logging
from ..server import WorkerPlace, serve
from ..startup import StartupError, leaves

__all__ = ["CONFIG_FILE", "EXPLAINED", "FAILED", "READY", "main"]

# In the supervisor's private directory: the parsed config, as every worker must run it.
CONFIG_FILE = "config.pickle"
READY = b"ready\n"
# "failed REASON\n" on the control socket, and this exit status: a worker that could not
# start, and why.
FAILED = b"failed "
EXPLAINED = 3

log = logging.getLogger("registry_trio")


async def _serve_worker(config: Config, place: WorkerPlace, control_fd: int) -> None:
    shutdown = trio.Event()
    control = trio.socket.from_stdlib_socket(socket.socket(fileno=control_fd))

    async def until_signalled() -> None:
        # The receiver stays open for the whole run: a second signal (SIGINT from a terminal
        # reaches the supervisor and every worker, and the supervisor then sends SIGTERM)
        # must not find the default handler back and kill a worker that is draining.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if not shutdown.is_set():
                    log.info("%s received: shutting down", signal.Signals(signum).name)
                shutdown.set()

    async def until_orphaned() -> None:
        while await control.recv(64):
            pass
        if not shutdown.is_set():
            log.warning("the supervisor is gone: shutting down")
        shutdown.set()

    failure = None
    with control:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(until_signalled)
                nursery.start_soon(until_orphaned)
                async with trio.open_nursery() as serving:
                    await serving.start(
                        functools.partial(serve, config, shutdown=shutdown, worker=place)
                    )
                    log.info("worker %d serving", place.number)
                    await control.send(READY)
                nursery.cancel_scope.cancel()
        except* (QueueError, StartupError) as group:
            failure = "; ".join(dict.fromkeys(str(exc) for exc in leaves(group)))
        if failure is not None:
            # The supervisor says it, once for all the workers that fail alike.
            await control.send(FAILED + failure.encode(errors="replace") + b"\n")
            raise SystemExit(EXPLAINED)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="registry_trio.workers.worker")
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--runtime", type=Path, required=True)
    args = parser.parse_args(argv)
    # Written by our own supervisor into its private (0700) directory just before.
    config: Config = pickle.loads((args.runtime / CONFIG_FILE).read_bytes())
    setup_logging(config.log, f"worker {args.number}")
    place = WorkerPlace(args.number, args.listen_fd, args.runtime)
    trio.run(_serve_worker, config, place, args.control_fd)


if __name__ == "__main__":
    main()
