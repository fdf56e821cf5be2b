"""Logging set-up: readable lines by default, JSON lines when ``log.format`` is ``json``.

The access logger passes its fields as ``extra`` (request id, actor, address, method, path,
status, bytes, duration); the JSON formatter emits them as keys, so a log pipeline can join
an access line to an event by ``request_id``. Nothing here ever logs a header or a body.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from .config import LogConfig

__all__ = ["ACCESS_FIELDS", "JSONFormatter", "setup_logging"]

ACCESS_FIELDS = (
    "request_id",
    "actor",
    "addr",
    "method",
    "path",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
)


class JSONFormatter(logging.Formatter):
    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._process is not None:
            doc["process"] = self._process
        for field in ACCESS_FIELDS:
            if field in record.__dict__:
                doc[field] = record.__dict__[field]
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class _HideRunningOn(logging.Filter):
    """Drops Hypercorn's "Running on ..." line: the start-up summary says it, once per server,
    where Hypercorn says it once per worker, from a logger named ``hypercorn.error``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Running on ")


def setup_logging(config: LogConfig, process: str | None = None) -> None:
    """Log as ``config`` says; ``process`` ("supervisor", "worker 2") names the process of a
    server that runs several, in every line (the ``process`` key in JSON)."""
    handler: logging.Handler = (
        logging.FileHandler(config.output) if config.output else logging.StreamHandler()
    )
    if config.format == "json":
        handler.setFormatter(JSONFormatter(process))
    else:
        tag = "" if process is None else f"[{process}] "
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = config.level.upper()
    root.setLevel("WARNING" if level == "WARN" else level)
    # httpx logs every webhook POST at INFO, with its URL: a line per delivered event that
    # says less than our own delivery logs, and would show a password in the address.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    hypercorn = logging.getLogger("hypercorn.error")
    hypercorn.filters[:] = [_HideRunningOn()]
