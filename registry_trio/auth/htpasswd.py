"""htpasswd users with bcrypt hashes, re-read when the file changes.

bcrypt is slow by design (tens of milliseconds per check), so verification runs on a worker
thread, and a successful check is remembered for a short while under an HMAC of the
credentials with a per-process random key: the cache holds no password, and a busy client
does not pay bcrypt on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from pathlib import Path

import bcrypt
import trio

__all__ = ["HtpasswdError", "HtpasswdFile"]

log = logging.getLogger("registry_trio.auth")

BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
# How long a successful verification is remembered.
CACHE_TTL = 60.0
# How often, at most, the file's modification time is checked.
RELOAD_CHECK_INTERVAL = 1.0


class HtpasswdError(ValueError):
    pass


def parse_htpasswd(path: Path) -> dict[str, bytes]:
    """``user -> bcrypt hash``; any other hash scheme is refused, naming the line."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise HtpasswdError(f"{path}:{number}: expected 'user:hash'")
        if not hashed.startswith(BCRYPT_PREFIXES):
            raise HtpasswdError(
                f"{path}:{number}: user {user!r} does not have a bcrypt hash; "
                "only bcrypt is accepted (create one with 'htpasswd -B')"
            )
        users[user] = hashed.encode()
    return users


class HtpasswdFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._mtime = self.path.stat().st_mtime_ns
        self._users = parse_htpasswd(self.path)
        self._checked_at = time.monotonic()
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[bytes, float] = {}
        # Checks under way, by fingerprint: concurrent requests with the same credentials
        # (a client opening several connections at once) share one bcrypt run.
        self._checking: dict[bytes, trio.Event] = {}
        # bcrypt is CPU-bound; more threads than cores would only queue inside the GIL-free C.
        self._limiter = trio.CapacityLimiter(os.cpu_count() or 2)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < RELOAD_CHECK_INTERVAL:
            return
        self._checked_at = now
        try:
            mtime = self.path.stat().st_mtime_ns
            if mtime == self._mtime:
                return
            users = parse_htpasswd(self.path)
        except (OSError, HtpasswdError) as exc:
            log.error("keeping the previous htpasswd users: %s", exc)
            return
        self._mtime, self._users = mtime, users
        self._verified.clear()
        log.info("reloaded %s: %d users", self.path, len(users))

    def _fingerprint(self, user: str, password: str) -> bytes:
        return hmac.new(self._cache_key, f"{user}\0{password}".encode(), hashlib.sha256).digest()

    async def verify(self, user: str, password: str) -> bool:
        self._maybe_reload()
        hashed = self._users.get(user)
        if hashed is None:
            return False
        fingerprint = self._fingerprint(user, password)
        while (checking := self._checking.get(fingerprint)) is not None:
            await checking.wait()
        if self._verified.get(fingerprint, 0.0) > time.monotonic():
            return True
        self._checking[fingerprint] = done = trio.Event()
        try:
            ok = await trio.to_thread.run_sync(
                bcrypt.checkpw, password.encode(), hashed, limiter=self._limiter
            )
            if ok and self._users.get(user) == hashed:
                now = time.monotonic()
                if len(self._verified) > 10_000:
                    self._verified = {k: t for k, t in self._verified.items() if t > now}
                self._verified[fingerprint] = now + CACHE_TTL
            return ok
        finally:
            # Waiters re-check the cache: a failure is not cached, so each learns it alone.
            del self._checking[fingerprint]
            done.set()
