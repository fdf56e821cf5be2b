"""When to give up on a request body that stalls or trickles.

A body's next bytes are waited for at most ``idle`` seconds, and the body must come at
``min_rate`` bytes/s or faster once past a first ``idle`` of grace: in all, the waits for it
may last ``idle + received / min_rate`` (Caddy's ``read_timeout`` with a minimum rate; Apache's
``mod_reqtimeout`` ``MinRate``). There is no cap on the total time: a 1 GiB upload on a slow
link that keeps going is never cut, while a client that stops, or sends a byte now and then
to dodge the idle timeout, is answered 408 and its connection closed.
"""

from __future__ import annotations

import trio

from ..config import HTTPConfig
from .errors import RegistryError

__all__ = ["BodyClock"]


class BodyClock:
    """How long the wait for the next bytes of one request body may last.

    Only the time spent waiting for the client counts, not the time the server spends
    writing what came (a slow disk is not the client's fault).
    """

    def __init__(self, http: HTTPConfig) -> None:
        self.idle = http.body_idle_timeout
        self.min_rate = http.body_min_rate
        self.received = 0
        self.waited = 0.0
        self._rate_bound = False

    def deadline(self) -> float:
        """When a wait for body bytes that starts now is given up."""
        allowance = float(self.idle)
        if self.min_rate:
            earned = self.idle + self.received / self.min_rate - self.waited
            self._rate_bound = earned < allowance
            allowance = min(allowance, earned)
        return trio.current_time() + allowance

    def progressed(self, size: int, waited: float) -> None:
        self.received += size
        self.waited += waited

    def timeout_error(self) -> RegistryError:
        """The 408 for a body past its deadline, saying which limit it broke."""
        if self._rate_bound:
            why = f"it arrived slower than {self.min_rate} bytes/s"
        else:
            why = f"nothing of it arrived for {self.idle:g}s"
        # The OCI spec allows only its own codes on a 4xx and has none for a body that never
        # came; almost every body is a blob upload's, which "can no longer proceed".
        return RegistryError(
            "BLOB_UPLOAD_INVALID",
            408,
            f"the request body was given up: {why}",
            headers=(("Connection", "close"),),
        )
