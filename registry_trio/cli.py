"""``registry-trio serve [-c FILE]`` and ``registry-trio verify -c FILE``."""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
from collections.abc import Sequence

import trio

from .config import Config, ConfigError, load_config

__all__ = ["main"]


def _setup_logging(config: Config) -> None:
    level = config.log.level.upper()
    handler: logging.Handler = (
        logging.FileHandler(config.log.output) if config.log.output else logging.StreamHandler()
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel("WARNING" if level == "WARN" else level)


async def _serve_until_signalled(config: Config) -> None:
    from .server import serve

    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(serve, config, shutdown=shutdown))
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                logging.getLogger("registry_trio").info(
                    "%s received: shutting down", signal.Signals(signum).name
                )
                shutdown.set()
                break


def _load(path: str | None) -> Config:
    from .config import check_files

    try:
        config = load_config(path)
        check_files(config)
        return config
    except ConfigError as exc:
        print(f"registry-trio: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="registry-trio",
        description="An OCI registry with crash-safe, enriched event notifications.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="serve the registry")
    serve_cmd.add_argument("-c", "--config", help="JSON config file (default: embedded)")
    verify_cmd = commands.add_parser("verify", help="check a config file without serving")
    verify_cmd.add_argument("-c", "--config", required=True, help="JSON config file")
    args = parser.parse_args(argv)

    config = _load(args.config)
    if args.command == "verify":
        print(f"{args.config}: configuration is valid")
        return
    _setup_logging(config)
    trio.run(_serve_until_signalled, config)
