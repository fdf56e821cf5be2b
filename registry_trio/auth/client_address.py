"""The client address events report: the TCP peer, unless that peer is a trusted proxy.

``X-Forwarded-For`` and ``Forwarded`` are just headers: anyone can send them. They are read
only when the connection comes from a configured proxy, and then from the right, skipping
trusted proxies, so a client cannot prepend a fake address of its own.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

__all__ = ["TrustedProxies", "address_host"]

# A ``for=`` parameter of RFC 7239 ``Forwarded``: a quoted string or a token.
_FORWARDED_FOR = re.compile(r'for=(?:"([^"]*)"|([^;,\s]*))', re.IGNORECASE)


def address_host(node: str) -> str:
    """The host in ``[v6]:port``, ``v4:port`` or a bare address (a ``Forwarded`` node too)."""
    node = node.strip()
    if node.startswith("["):
        return node[1:].partition("]")[0]
    if node.count(":") == 1:  # v4 (or a name) with a port; a bare v6 has several colons
        return node.partition(":")[0]
    return node


def _format(host: str, port: int | None) -> str:
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TrustedProxies:
    def __init__(self, cidrs: Sequence[str]) -> None:
        self._networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in network for network in self._networks)

    def client_address(
        self,
        peer: tuple[str, int] | None,
        forwarded_for: str | None,
        forwarded: str | None,
    ) -> str:
        if peer is None:
            return ""
        host, port = peer[0], peer[1]
        if not self._networks or not self._trusted(host):
            return _format(host, port)
        if forwarded:
            chain = [
                address_host(quoted or token) for quoted, token in _FORWARDED_FOR.findall(forwarded)
            ]
        elif forwarded_for:
            chain = [part.strip() for part in forwarded_for.split(",") if part.strip()]
        else:
            chain = []
        for address in reversed(chain):
            if not self._trusted(address):
                return address
        return chain[0] if chain else _format(host, port)
