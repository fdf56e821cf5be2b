"""HTTP webhook transport on one keep-alive ``httpx.AsyncClient`` per sink."""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import time
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

import httpx

from ...config import SinkConfig, redact_address
from ..failures import describe_failure, sensitive_values
from . import DELIVERED, Message, Outcome, Result

__all__ = ["HTTPSink"]


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    if value.strip().isascii() and value.strip().isdigit():  # not "²": float() refuses it
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


class HTTPSink:
    per_hop = 1
    # Unused: every outcome names its status (one request per hop).
    acknowledgement = "HTTP 2xx"

    def __init__(self, config: SinkConfig) -> None:
        # Credentials in the address become Basic auth, and the URL httpx sees (and logs)
        # is the address without them.
        self._address = redact_address(config.address)
        address = urlsplit(config.address)
        self._hmac = config.hmac
        self._hidden = sensitive_values(
            config.address, config.credentials, config.hmac.secret if config.hmac else ""
        )
        headers = dict(config.headers)
        auth: httpx.Auth | None = None
        if address.username is not None:
            auth = httpx.BasicAuth(unquote(address.username), unquote(address.password or ""))
        if config.credentials is not None:
            if config.credentials.token:
                headers["Authorization"] = f"Bearer {config.credentials.token}"
            elif config.credentials.username is not None:
                auth = httpx.BasicAuth(
                    config.credentials.username, config.credentials.password or ""
                )
        self._client = httpx.AsyncClient(
            headers=headers,
            auth=auth,
            timeout=config.timeout,
            verify=config.tls.ssl_context() if config.tls is not None else True,
            limits=httpx.Limits(max_connections=config.concurrency, keepalive_expiry=30),
        )

    async def send(self, messages: Sequence[Message]) -> tuple[int, Outcome]:
        # HTTP has no pipelining worth the name: one request per message, in order.
        outcome = DELIVERED
        for sent, message in enumerate(messages):
            outcome = await self._post(message)
            if outcome.result is not Result.DELIVERED:
                return sent, outcome
        return len(messages), outcome

    async def _post(self, message: Message) -> Outcome:
        headers, body = dict(message.headers), message.body
        if self._hmac is not None:
            digest = hmac.new(self._hmac.secret.encode(), body, hashlib.sha256).hexdigest()
            headers[self._hmac.header] = digest
        try:
            response = await self._client.post(self._address, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            return Outcome(Result.RETRY, f"timed out: {type(exc).__name__}")
        except httpx.TransportError as exc:
            # The words name the failure (refused, reset, a certificate), never our headers
            # or body; a password in the address is blanked out all the same.
            return Outcome(Result.RETRY, describe_failure(exc, self._hidden))
        status = response.status_code
        answer = f"HTTP {status}"
        if 200 <= status < 300:
            return Outcome(Result.DELIVERED, status=answer)
        error = f"{answer} from the sink"
        if status in (408, 429) or status >= 500:
            retry_after = _retry_after(response.headers.get("Retry-After"))
            return Outcome(Result.RETRY, error, retry_after, answer)
        return Outcome(Result.REJECTED, error, status=answer)

    async def aclose(self) -> None:
        await self._client.aclose()
