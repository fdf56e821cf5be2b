"""The client address events report: the TCP peer, unless that peer is a trusted proxy; and
the origin (scheme and host) the client addressed, which absolute URLs are built from.

``X-Forwarded-For`` and ``Forwarded`` are just headers: anyone can send them. They are read
only when the connection comes from a configured proxy, and then from the right, skipping
trusted proxies, so a client cannot prepend a fake address of its own. The forwarded host
and scheme are likewise read only from a trusted proxy, and from the value it added (the
last); a ``Host`` that is not a plain host[:port] is not believed at all.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

__all__ = ["TrustedProxies", "address_host", "sane_host"]

# A ``for=`` parameter of RFC 7239 ``Forwarded``: a quoted string or a token.
_FORWARDED_FOR = re.compile(r'for=(?:"([^"]*)"|([^;,\s]*))', re.IGNORECASE)
# ``host=`` and ``proto=`` of one ``Forwarded`` element.
_FORWARDED_PARAM = re.compile(r'\b(host|proto)=(?:"([^"]*)"|([^;,\s]*))', re.IGNORECASE)
# A DNS name or IPv4 address (underscores too: container service names have them), or a
# bracketed IPv6 address, with an optional port: nothing that could end a URL's authority.
_HOST = re.compile(
    r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])(?::(\d{1,5}))?"
)


def address_host(node: str) -> str:
    """The host in ``[v6]:port``, ``v4:port`` or a bare address (a ``Forwarded`` node too)."""
    node = node.strip()
    if node.startswith("["):
        return node[1:].partition("]")[0]
    if node.count(":") == 1:  # v4 (or a name) with a port; a bare v6 has several colons
        return node.partition(":")[0]
    return node


def sane_host(host: str) -> bool:
    """Whether ``host`` is a plain ``name[:port]``, ``v4[:port]`` or ``[v6][:port]``."""
    match = _HOST.fullmatch(host)
    if match is None or len(host) > 261 or ".." in host:
        return False
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:].partition("]")[0])
        except ValueError:
            return False
    return match[1] is None or int(match[1]) <= 65535


def _last_forwarded(forwarded: str, name: str) -> str | None:
    """The ``name`` parameter of the last ``Forwarded`` element that has one."""
    values = [
        quoted or token
        for key, quoted, token in _FORWARDED_PARAM.findall(forwarded)
        if key.lower() == name
    ]
    return values[-1] if values else None


def _last_listed(value: str) -> str | None:
    items = [item.strip() for item in value.split(",") if item.strip()]
    return items[-1] if items else None


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

    def forwarded_origin(
        self,
        peer: tuple[str, int] | None,
        forwarded: str | None,
        forwarded_host: str | None,
        forwarded_proto: str | None,
    ) -> tuple[str | None, str | None]:
        """(scheme, host) a trusted proxy says the client used; (None, None) from anyone else.

        ``Forwarded`` wins over the ``X-Forwarded-*`` pair, as for the address. Neither value
        is checked here: the caller keeps only a sane host and http or https.
        """
        if peer is None or not self._networks or not self._trusted(peer[0]):
            return None, None
        if forwarded:
            return _last_forwarded(forwarded, "proto"), _last_forwarded(forwarded, "host")
        return (
            _last_listed(forwarded_proto) if forwarded_proto else None,
            _last_listed(forwarded_host) if forwarded_host else None,
        )
