"""HTTP webhook transport on one keep-alive connection pool per sink.

The pool is httpcore's, the HTTP layer under httpx, used directly: a sink sends the same
POST to one address over and over, and httpx's client layer around it (URL merging, cookie
jar, auth and redirect flows, response models) cost more CPU than the request itself.
Measured on one pinned core: 580 us of client CPU per POST through ``httpx.AsyncClient``,
390 us through the pool; with one POST per event, that was ~0.5 ms of server CPU per
pushed image. What httpx gave us is kept: its default certificate store and
``SSL_CERT_FILE``/``SSL_CERT_DIR`` (:func:`httpx.create_ssl_context`), a proxy from
``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` unless ``NO_PROXY`` exempts the host, the
timeout on connect, write, read and pool waits, and no redirects followed.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import importlib.metadata
import time
import urllib.request
from collections.abc import Sequence
from urllib.parse import SplitResult, unquote, urlsplit

import httpcore
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


def _basic(username: str, password: str) -> str:
    """An ``Authorization: Basic`` value (RFC 7617, UTF-8 as httpx sends it)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def _environment_proxy(address: SplitResult) -> httpcore.Proxy | None:
    """The proxy the environment names for ``address`` (as httpx's ``trust_env`` picked it),
    with the credentials its URL carries as ``Proxy-Authorization``."""
    proxies = urllib.request.getproxies()
    url = proxies.get(address.scheme) or proxies.get("all")
    if not url or urllib.request.proxy_bypass(address.hostname or ""):
        return None
    proxy = urlsplit(url if "://" in url else f"http://{url}")
    auth = None
    if proxy.username is not None:
        auth = (unquote(proxy.username), unquote(proxy.password or ""))
    return httpcore.Proxy(proxy._replace(netloc=proxy.netloc.rpartition("@")[2]).geturl(), auth)


class HTTPSink:
    per_hop = 1
    # Unused: every outcome names its status (one request per hop).
    acknowledgement = "HTTP 2xx"

    def __init__(self, config: SinkConfig) -> None:
        # Credentials in the address become Basic auth; the URL requested (and any error
        # that names it) is the address without them.
        address = urlsplit(config.address)
        self._url = redact_address(config.address).encode()
        self._hmac = config.hmac
        self._hidden = sensitive_values(
            config.address, config.credentials, config.hmac.secret if config.hmac else ""
        )
        # Lower-case names, so that a message's header replaces a configured one.
        headers = {
            "host": address.netloc.rpartition("@")[2],
            # Some receivers (and the firewalls before them) refuse a request without one.
            "user-agent": f"registry-trio/{importlib.metadata.version('registry-trio')}",
        }
        headers.update((name.lower(), value) for name, value in config.headers.items())
        if address.username is not None:
            headers["authorization"] = _basic(
                unquote(address.username), unquote(address.password or "")
            )
        if config.credentials is not None:
            if config.credentials.token:
                headers["authorization"] = f"Bearer {config.credentials.token}"
            elif config.credentials.username is not None:
                headers["authorization"] = _basic(
                    config.credentials.username, config.credentials.password or ""
                )
        self._headers = headers
        timeout = float(config.timeout)
        self._extensions = {
            "timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        }
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=(
                config.tls.ssl_context() if config.tls is not None else httpx.create_ssl_context()
            ),
            proxy=_environment_proxy(address),
            max_connections=config.concurrency,
            keepalive_expiry=30,
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
        headers = self._headers.copy()
        headers.update((name.lower(), value) for name, value in message.headers.items())
        headers["content-length"] = str(len(message.body))
        if self._hmac is not None:
            digest = hmac.new(self._hmac.secret.encode(), message.body, hashlib.sha256)
            headers[self._hmac.header.lower()] = digest.hexdigest()
        try:
            # request() reads the whole response and gives the connection back to the pool.
            response = await self._pool.request(
                b"POST",
                self._url,
                headers=list(headers.items()),
                content=message.body,
                extensions=self._extensions,
            )
        except httpcore.TimeoutException as exc:
            return Outcome(Result.RETRY, f"timed out: {type(exc).__name__}")
        except (
            httpcore.NetworkError,
            httpcore.ProtocolError,
            httpcore.ProxyError,
            httpcore.UnsupportedProtocol,
        ) as exc:
            # The words name the failure (refused, reset, a certificate), never our headers
            # or body; a password in the address is blanked out all the same.
            return Outcome(Result.RETRY, describe_failure(exc, self._hidden))
        status = response.status
        answer = f"HTTP {status}"
        if 200 <= status < 300:
            return Outcome(Result.DELIVERED, status=answer)
        error = f"{answer} from the sink"
        if status in (408, 429) or status >= 500:
            retry_after = next(
                (v.decode("latin-1") for k, v in response.headers if k.lower() == b"retry-after"),
                None,
            )
            return Outcome(Result.RETRY, error, _retry_after(retry_after), answer)
        return Outcome(Result.REJECTED, error, status=answer)

    async def aclose(self) -> None:
        await self._pool.aclose()
