"""A delivery or queue failure in words, fit for a log line and a sink's last error.

Network libraries wrap the failure that explains anything: under Trio, httpx raises a
``ConnectError`` with no message whose cause is a ``BrokenResourceError`` whose cause is the
``SSLCertVerificationError`` an operator needs to see. So the words come from the first
exception in the chain that has any, under the name of the outermost one.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from ..config import CredentialsConfig

__all__ = ["describe_failure", "sensitive_values"]


def sensitive_values(
    address: str | None, credentials: CredentialsConfig | None, *more: str
) -> list[str]:
    """Everything of a sink's or queue's config that must never appear in an error or a log."""
    out = list(more)
    if credentials is not None:
        out += [credentials.password or "", credentials.token or ""]
    parts = urlsplit(address or "")
    out += [parts.password or "", parts.username or ""]
    return [s for s in out if s]


def describe_failure(exc: BaseException, hidden: Sequence[str] = ()) -> str:
    """``exc`` in words, with every string in ``hidden`` (secrets) blanked out."""
    # asyncio's timeout has no message and nats-py's says only "nats: timeout"; both are
    # TimeoutErrors.
    if isinstance(exc, TimeoutError):
        text = f"timed out ({type(exc).__name__})"
    else:
        text = type(exc).__name__
        if detail := _first_detail(exc):
            text = f"{text}: {detail}"
    for secret in hidden:
        text = text.replace(secret, "***")
    return text


def _first_detail(exc: BaseException) -> str:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if detail := str(current).strip():
            return detail
        current = current.__cause__ or current.__context__
    return ""
