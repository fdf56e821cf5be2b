"""htpasswd users with bcrypt hashes, re-read when the file changes.

bcrypt is slow by design (tens of milliseconds per check), so verification runs on a worker
thread, and a successful check is remembered for a short while under an HMAC of the
credentials with a per-process random key: the cache holds no password, and a busy client
does not pay bcrypt on every request.

An unknown user costs the same bcrypt check as a known one (against a hash of the file's
highest cost that no password matches), so the time a refusal takes does not tell which
user names exist.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from pathlib import Path

import bcrypt
import trio

__all__ = ["HtpasswdError", "HtpasswdFile"]

log = logging.getLogger("registry_trio.auth")

BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
_BCRYPT_HASH = re.compile(rb"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# bcrypt reads no more of a password; a longer one is refused rather than cut short.
MAX_PASSWORD_BYTES = 72
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
        if not _BCRYPT_HASH.fullmatch(hashed.encode()):
            raise HtpasswdError(f"{path}:{number}: user {user!r} has a malformed bcrypt hash")
        users[user] = hashed.encode()
    return users


def _unmatchable_hash(users: dict[str, bytes]) -> bytes:
    """A bcrypt hash of the highest cost in ``users`` that no password matches.

    Its digest is all dots, which bcrypt never outputs; checking it costs what checking a
    real hash of that cost does.
    """
    # parse_htpasswd lets in only hashes that _BCRYPT_HASH matches: "$2?$", then the cost.
    cost = max((int(h[4:6]) for h in users.values()), default=12)
    return bcrypt.gensalt(rounds=cost) + b"." * 31


def _checkpw(password: str, hashed: bytes) -> bool:
    """bcrypt's check, the same work whatever the password's length."""
    secret = password.encode()
    matches = bcrypt.checkpw(secret[:MAX_PASSWORD_BYTES], hashed)
    return matches and len(secret) <= MAX_PASSWORD_BYTES


class HtpasswdFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._mtime = self.path.stat().st_mtime_ns
        self._users = parse_htpasswd(self.path)
        self._unknown_user_hash = _unmatchable_hash(self._users)
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
        self._unknown_user_hash = _unmatchable_hash(users)
        self._verified.clear()
        log.info("reloaded %s: %d users", self.path, len(users))

    def _fingerprint(self, user: str, password: str) -> bytes:
        return hmac.new(self._cache_key, f"{user}\0{password}".encode(), hashlib.sha256).digest()

    def remembers(self, user: str, password: str) -> bool:
        """Whether these credentials were verified a short while ago (no bcrypt needed)."""
        self._maybe_reload()
        return self._verified.get(self._fingerprint(user, password), 0.0) > time.monotonic()

    async def verify(self, user: str, password: str) -> bool:
        self._maybe_reload()
        hashed = self._users.get(user)
        fingerprint = self._fingerprint(user, password)
        while (checking := self._checking.get(fingerprint)) is not None:
            await checking.wait()
        if self._verified.get(fingerprint, 0.0) > time.monotonic():
            return True
        self._checking[fingerprint] = done = trio.Event()
        try:
            ok = await trio.to_thread.run_sync(
                _checkpw, password, hashed or self._unknown_user_hash, limiter=self._limiter
            )
            ok = ok and hashed is not None
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
