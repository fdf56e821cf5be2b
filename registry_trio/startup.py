"""What start-up tells a person: one line saying what serves, or one line saying why not.

A server logs one summary line once it serves (the supervisor for its workers): version,
URL, processes, where content and the queue live, events and sinks, auth, TLS. A failure to
start is one line on stderr and a non-zero exit, never a traceback: every nursery level
wraps an exception in a group, so the exceptions at the leaves are what is reported.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from .config import Config, redact_address

__all__ = ["StartupError", "leaves", "summary"]


class StartupError(Exception):
    """The server cannot start; the message says why and names the config key."""


def summary(config: Config, url: str) -> str:
    """``registry-trio VERSION listening on URL (...)``: the one line a start-up logs."""
    http, events = config.http, config.extensions.events
    parts = [
        f"{http.workers} workers" if http.workers > 1 else "one process",
        f"storage {Path(config.storage.root_directory).resolve()}",
    ]
    if events.enable:
        queue = events.queue
        where = (
            f"JetStream {redact_address(queue.address or '')} stream {queue.stream}"
            if queue.type == "jetstream"
            else str(Path(queue.directory).resolve())
        )
        sinks = ", ".join(redact_address(s.name) for s in events.sinks) or "none yet"
        parts.append(f"events on, queue {where}, sinks: {sinks}")
    else:
        parts.append("events off")
    auth = http.auth
    if auth is not None and auth.htpasswd is not None:
        parts.append(f"auth htpasswd {auth.htpasswd.path}")
    elif auth is not None and auth.bearer is not None:
        parts.append(f"auth bearer tokens from {auth.bearer.realm}")
    else:
        parts.append("no auth")
    if http.tls is None:
        parts.append("no TLS")
    else:
        clients = ", client certificates required" if http.tls.cacert else ""
        parts.append(f"TLS {http.tls.cert}{clients}")
    version = importlib.metadata.version("registry-trio")
    return f"registry-trio {version} listening on {url} ({'; '.join(parts)})"


def leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions in a (nested) group."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found
