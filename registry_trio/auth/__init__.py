"""Authentication (htpasswd, bearer tokens), access control and client addresses.

The API asks one object, :class:`Authenticator`, three questions: who is this (from the
``Authorization`` header only), may they do this to that repository, and what address did the
request come from. Nothing here knows about routes or events.
"""

from __future__ import annotations

import base64
import binascii
import logging

from ..config import HTTPConfig
from .client_address import TrustedProxies
from .htpasswd import HtpasswdError, HtpasswdFile
from .identity import ANONYMOUS, Identity, Unauthorized
from .policy import AccessPolicy
from .tokens import TokenVerifier

__all__ = [
    "ANONYMOUS",
    "AccessPolicy",
    "Authenticator",
    "HtpasswdError",
    "Identity",
    "TrustedProxies",
    "Unauthorized",
]

log = logging.getLogger("registry_trio.auth")

_SCOPE_ACTIONS = {"read": "pull", "create": "pull,push", "update": "pull,push", "delete": "delete"}


class Authenticator:
    def __init__(self, config: HTTPConfig) -> None:
        auth = config.auth
        self.htpasswd = HtpasswdFile(auth.htpasswd.path) if auth and auth.htpasswd else None
        self.tokens = TokenVerifier(auth.bearer) if auth and auth.bearer else None
        self.policy = AccessPolicy(config.access_control, self.enabled)
        self.proxies = TrustedProxies(config.trusted_proxies)

    @property
    def enabled(self) -> bool:
        return self.htpasswd is not None or self.tokens is not None

    async def authenticate(self, authorization: str | None) -> Identity:
        """The identity the header proves; :class:`Unauthorized` if it proves nothing.

        Without authentication configured, credentials are ignored: nothing was verified,
        so nobody is named.
        """
        if not authorization or not self.enabled:
            return ANONYMOUS
        scheme, _, credentials = authorization.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "basic" and self.htpasswd is not None:
            try:
                user, sep, password = (
                    base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
                )
            except (binascii.Error, UnicodeDecodeError):
                raise Unauthorized("malformed basic credentials") from None
            if not sep or not await self.htpasswd.verify(user, password):
                raise Unauthorized(f"wrong username or password (user {user!r})")
            return Identity(user, "basic")
        if scheme == "bearer" and self.tokens is not None:
            return self.tokens.verify(credentials.strip())
        raise Unauthorized(f"authorization scheme {scheme!r} is not accepted here")

    def challenge(self, repository: str | None, action: str | None) -> str:
        """The ``WWW-Authenticate`` value, with the scope this request needs."""
        if self.tokens is not None:
            bearer = self.tokens.config
            if repository and action:
                scope = f"repository:{repository}:{_SCOPE_ACTIONS[action]}"
            else:
                scope = "registry:catalog:*"
            return f'Bearer realm="{bearer.realm}",service="{bearer.service}",scope="{scope}"'
        return 'Basic realm="registry-trio"'
