"""Failed basic logins per client: a limit per time window, and one bcrypt check at a time.

An unguarded htpasswd login gives an attacker two things: guesses at passwords as fast as
bcrypt runs, and bcrypt's CPU, which queues everyone else's first login behind theirs (a
burst of concurrent bad logins delays a real first login by seconds). So, per client:

- after ``limit`` failed logins within ``window``, every login attempt gets 429 with
  ``Retry-After``, without any bcrypt work, until the oldest of them leaves the window;
- one bcrypt check at a time: its other logins wait for their turn (and are refused then if
  the limit was reached meanwhile), so one client holds at most one bcrypt thread and other
  clients' logins go past its queue.

A client is the address the request is resolved to come from (the forwarded address only
behind a trusted proxy), without its port, and an IPv6 client by its /64, which one host
commonly holds whole. A successful login does not reset the count: whoever shares an
address with an attacker could otherwise reset it for them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

import trio

from .client_address import address_host

__all__ = ["LoginLimits", "TooManyFailedLogins", "client_key"]

log = logging.getLogger("registry_trio.auth")

# Clients with failures tracked at most (a few hundred bytes each). Past it, those with none
# left in the window are forgotten, then the longest-known ones: memory stays bounded against
# an attacker with very many addresses (an IPv6 /48 holds 65,536 /64s).
MAX_CLIENTS = 100_000


class TooManyFailedLogins(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed logins from this address; try again in {retry_after}s")
        self.retry_after = retry_after


def client_key(address: str) -> str:
    """The client an address stands for: its host without the port; IPv6 by its /64."""
    host = address_host(address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class _Turn:
    """One client's bcrypt turn, and how many of its logins hold or wait for it."""

    def __init__(self) -> None:
        self.lock = trio.Lock()
        self.users = 0


class LoginLimits:
    def __init__(
        self, limit: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        # client -> times of its failed logins within the window, oldest first
        self._failures: dict[str, deque[float]] = {}
        self._turns: dict[str, _Turn] = {}

    def _recent(self, key: str) -> deque[float] | None:
        failures = self._failures.get(key)
        if failures is not None:
            horizon = self._clock() - self.window
            while failures and failures[0] <= horizon:
                failures.popleft()
            if not failures:
                del self._failures[key]
                return None
        return failures

    def check(self, client: str) -> None:
        """Refuse a login from ``client`` (:class:`TooManyFailedLogins`) when over the limit."""
        failures = self._recent(client_key(client))
        if failures is not None and len(failures) >= self.limit:
            wait = failures[0] + self.window - self._clock()
            raise TooManyFailedLogins(max(math.ceil(wait), 1))

    @contextlib.asynccontextmanager
    async def turn(self, client: str) -> AsyncIterator[None]:
        """The client's one bcrypt turn; refused once it comes if the limit was reached."""
        key = client_key(client)
        turn = self._turns.setdefault(key, _Turn())
        turn.users += 1
        try:
            async with turn.lock:
                self.check(client)
                yield
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[key]

    def failed(self, client: str) -> None:
        """Count a failed login from ``client``."""
        key = client_key(client)
        failures = self._recent(key)
        if failures is None:
            if len(self._failures) >= MAX_CLIENTS:
                self._forget()
            # Only the last `limit` failures matter: the oldest of them says when to retry.
            failures = self._failures[key] = deque(maxlen=self.limit)
        failures.append(self._clock())
        if len(failures) == self.limit:
            log.warning(
                "%d failed logins from %s within %gs: its logins get 429 until the oldest "
                "is %gs old",
                self.limit,
                key,
                self.window,
                self.window,
            )

    def _forget(self) -> None:
        for key in list(self._failures):
            self._recent(key)
        while len(self._failures) >= MAX_CLIENTS:
            del self._failures[next(iter(self._failures))]
