"""Who made a request, as proven by authentication — never as claimed by a header."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ANONYMOUS", "Identity", "Unauthorized"]


@dataclass(frozen=True)
class Identity:
    # None for anonymous requests.
    name: str | None
    # "anonymous", "basic" (htpasswd), "bearer" (token) or "mtls" (client certificate).
    method: str = "anonymous"
    # For bearer tokens, what the token grants: repository -> actions. None otherwise.
    token_access: Mapping[str, frozenset[str]] | None = None

    @property
    def anonymous(self) -> bool:
        return self.name is None


ANONYMOUS = Identity(None)


class Unauthorized(Exception):
    """Credentials were presented and are wrong. The message never contains a secret."""
