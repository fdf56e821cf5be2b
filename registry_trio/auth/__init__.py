"""Authentication (htpasswd, bearer tokens), access control and client addresses.

The API asks one object, :class:`Authenticator`, three questions: who is this (from the
``Authorization`` header only), may they do this to that repository, and what address did the
request come from. Nothing here knows about routes or events.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable

from ..config import Config, ConfigError, FailedLoginsConfig, HTTPConfig
from .client_address import TrustedProxies
from .htpasswd import HtpasswdError, HtpasswdFile
from .identity import ANONYMOUS, Identity, Unauthorized
from .login_limits import LoginLimits, TooManyFailedLogins
from .policy import AccessPolicy
from .tokens import TokenVerifier

__all__ = [
    "ANONYMOUS",
    "AccessPolicy",
    "Authenticator",
    "HtpasswdError",
    "Identity",
    "TooManyFailedLogins",
    "TrustedProxies",
    "Unauthorized",
    "check_files",
]

log = logging.getLogger("registry_trio.auth")

_SCOPE_ACTIONS = {"read": "pull", "create": "pull,push", "update": "pull,push", "delete": "delete"}
# Basic credentials of an empty user and password: what containers/image (skopeo, podman,
# buildah) answers a Basic challenge with when it has no credentials for the registry.
_NO_BASIC_CREDENTIALS = base64.b64encode(b":").decode()


class Authenticator:
    def __init__(self, config: HTTPConfig, clock: Callable[[], float] = time.monotonic) -> None:
        auth = config.auth
        self.htpasswd = HtpasswdFile(auth.htpasswd.path) if auth and auth.htpasswd else None
        self.tokens = TokenVerifier(auth.bearer) if auth and auth.bearer else None
        self.policy = AccessPolicy(config.access_control, self.enabled)
        self.proxies = TrustedProxies(config.trusted_proxies)
        limits = auth.failed_logins if auth else FailedLoginsConfig()
        self.logins = LoginLimits(limits.limit, float(limits.window), clock)

    @property
    def enabled(self) -> bool:
        return self.htpasswd is not None or self.tokens is not None

    async def authenticate(
        self, authorization: str | None, client: str = "", certificate: str | None = None
    ) -> Identity:
        """The identity the header proves; :class:`Unauthorized` if it proves nothing.

        ``client`` is the request's resolved address: failed basic logins are limited per
        client (:class:`TooManyFailedLogins` past the limit, see :mod:`.login_limits`).
        Without authentication configured, credentials are ignored: nothing was verified,
        so nobody is named. ``certificate`` is the name the connection's client certificate
        gives (verified at the TLS handshake): it names the request when no credentials
        apply, as zot does.
        """
        if not authorization or not self.enabled:
            return ANONYMOUS if certificate is None else Identity(certificate, "mtls")
        scheme, _, credentials = authorization.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "basic" and self.htpasswd is not None:
            return await self._basic(credentials, client)
        if scheme == "bearer" and self.tokens is not None:
            return self.tokens.verify(credentials.strip())
        raise Unauthorized(f"authorization scheme {scheme!r} is not accepted here")

    async def _basic(self, credentials: str, client: str) -> Identity:
        assert self.htpasswd is not None
        if credentials.strip() == _NO_BASIC_CREDENTIALS:
            # No credentials, so anonymous, as without the header: a public repository is
            # readable to those clients, and their requests are no failed logins (no user
            # name is empty, so none could have been proven).
            return ANONYMOUS
        self.logins.check(client)
        try:
            user, password = _user_and_password(credentials)
            if not self.htpasswd.remembers(user, password):
                async with self.logins.turn(client):
                    if not await self.htpasswd.verify(user, password):
                        raise Unauthorized(f"wrong username or password (user {user[:100]!r})")
        except Unauthorized:
            self.logins.failed(client)
            raise
        return Identity(user, "basic")

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


def check_files(config: Config) -> None:
    """Read what the config points at (htpasswd, token key) and report problems by key.

    Kept apart from parsing so that parsing stays free of I/O beyond readability checks;
    every ``registry-trio`` command runs it on its config before doing anything.
    """
    try:
        Authenticator(config.http)
    except HtpasswdError as exc:
        raise ConfigError("http.auth.htpasswd.path", str(exc)) from None
    except ValueError as exc:
        raise ConfigError("http.auth.bearer.cert", f"cannot load the key: {exc}") from None


def _user_and_password(credentials: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8
        raise Unauthorized("malformed basic credentials") from None
    user, sep, password = decoded.partition(":")
    if not sep:  # never quoted: without a ':' it may well be a password
        raise Unauthorized("malformed basic credentials: no ':' between user and password")
    return user, password
