"""Who may call a route: each route declares the access it needs, and this module decides.

Authorisation runs on what was routed, never on a re-parsed spelling of the path: the raw
routes are authorised by the dispatcher with the parameters their pattern matched, the Quart
routes by a ``before_request`` hook with the rule and the view arguments Werkzeug matched. So a
path spelled differently (``//v2/...``, ``/v2/a//b/...``) is either routed, and then checked
for the repository the handler will serve, or not routed at all.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import urlsplit

from ..auth import Identity, Unauthorized
from .context import CERTIFICATE_NAME_KEY, CLIENT_ADDR_KEY, IDENTITY_KEY, Registry, header
from .errors import RegistryError

__all__ = ["KNOWN_METHODS", "Access", "authorize", "method_label", "repository_action"]

log = logging.getLogger("registry_trio.api")

# Methods the API serves; any other method is counted under one metrics label.
KNOWN_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"})


class Access(enum.Enum):
    """What a route needs from its caller."""

    #: Anyone (``/metrics``; the catalog, which filters repositories by read access itself).
    PUBLIC = "public"
    #: The API root: where clients discover how to log in, so anonymous callers are challenged.
    LOGIN = "login"
    #: The route's ``name`` parameter, with the action its method takes.
    REPOSITORY = "repository"
    #: ``adminPolicy`` users; without authentication, loopback clients only.
    ADMIN = "admin"
    #: The operator console in the browser: :attr:`ADMIN`'s callers, challenged so that a
    #: browser prompts for a login (Basic, whenever htpasswd can check it).
    CONSOLE = "console"


def repository_action(method: str) -> str:
    """The access action a repository request takes.

    Pushing content needs ``create``; replacing an existing tag additionally needs
    ``update``, which the manifest handler checks once it knows the tag exists.
    """
    if method in ("GET", "HEAD"):
        return "read"
    if method == "DELETE":
        return "delete"
    return "create"


def method_label(method: str) -> str:
    """``method`` as a metrics label: a client cannot invent new label values."""
    return method if method in KNOWN_METHODS else "OTHER"


async def authorize(
    registry: Registry,
    scope: MutableMapping[str, Any],
    access: Access,
    repository: str | None = None,
) -> None:
    """Authenticate the caller and refuse what ``access`` does not let them do.

    Anonymous callers that need to log in get 401 with a challenge naming the scope; known
    callers without the right get 403. The identity is stored in ``scope`` for the handler,
    events and the access log.
    """
    auth = registry.auth
    action = repository_action(scope["method"]) if access is Access.REPOSITORY else None
    try:
        who = await auth.authenticate(
            header(scope, b"authorization"), scope[CLIENT_ADDR_KEY], scope[CERTIFICATE_NAME_KEY]
        )
    except Unauthorized as exc:
        log.warning("authentication failed from %s: %s", scope[CLIENT_ADDR_KEY], exc)
        if access is Access.CONSOLE:
            raise _console_login(registry, str(exc)) from None
        raise _unauthorized(registry, repository, action, str(exc)) from None
    scope[IDENTITY_KEY] = who
    if access is Access.ADMIN or access is Access.CONSOLE:
        _authorize_admin(registry, scope, who, access)
    elif not auth.enabled or access is Access.PUBLIC:
        return
    elif access is Access.LOGIN:
        # `docker login` checks credentials here; anonymous pulls still work where
        # anonymousPolicy allows them, as in distribution.
        if who.anonymous:
            raise _unauthorized(registry, None, None, "authentication required")
    else:
        assert repository is not None and action is not None
        if action in auth.policy.allowed(who, repository):
            return
        if who.anonymous:
            raise _unauthorized(registry, repository, action, "authentication required")
        raise RegistryError(
            "DENIED", 403, f"{who.name} may not {action} in repository {repository}"
        )


def _authorize_admin(
    registry: Registry, scope: MutableMapping[str, Any], who: Identity, access: Access
) -> None:
    auth = registry.auth
    if auth.enabled:
        if who.anonymous:
            why = "the admin API needs an admin login"
            if access is Access.CONSOLE:
                raise _console_login(registry, why)
            raise _unauthorized(registry, None, None, why)
        if not auth.policy.is_admin(who):
            raise RegistryError("DENIED", 403, f"{who.name} is not an administrator")
    else:
        # No authentication configured: the admin API answers the local machine only, as
        # that machine names itself: a page whose name an attacker rebinds to 127.0.0.1
        # (DNS rebinding) reaches the loopback address, but under the attacker's Host.
        client = scope.get("client")
        if client is None or not ipaddress.ip_address(client[0]).is_loopback:
            raise RegistryError("DENIED", 403, "the admin API is only served on loopback")
        if not _loopback_host(header(scope, b"host")):
            raise RegistryError(
                "DENIED",
                403,
                "without authentication, the admin API answers only requests "
                "addressed to localhost or a loopback address",
            )
    if scope["method"] not in SAFE_METHODS:
        _refuse_cross_site(scope)


# Methods that change nothing: a browser may send them across sites (links, images).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _refuse_cross_site(scope: MutableMapping[str, Any]) -> None:
    """Refuse a change that another site's page made the browser send.

    A browser that holds an administrator's Basic login (the console's) attaches it to any
    request for this origin, a form another site posts included. Such a request says where
    it comes from: ``Sec-Fetch-Site`` (every current browser), or else ``Origin``. Clients
    that are no browser (curl, the CLI) send neither, and are not concerned.
    """
    site = header(scope, b"sec-fetch-site")
    origin = header(scope, b"origin")
    if site:
        foreign = site not in ("same-origin", "none")
    else:
        # An origin is scheme://host[:port]; "null" (a sandboxed page) is nobody's.
        foreign = (
            bool(origin) and origin.partition("://")[2].lower() != header(scope, b"host").lower()
        )
    if foreign:
        raise RegistryError(
            "DENIED",
            403,
            "a page of another site may not change the registry through your browser "
            f"(Sec-Fetch-Site: {site[:40] or '-'}, Origin: {origin[:200] or '-'})",
        )


def _loopback_host(host: str) -> bool:
    """Whether a ``Host`` header names this machine: localhost, or a loopback address."""
    try:
        name = urlsplit(f"//{host}").hostname or ""
    except ValueError:  # "[::1", an unclosed IPv6 literal
        return False
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _unauthorized(
    registry: Registry, repository: str | None, action: str | None, why: str
) -> RegistryError:
    challenge = registry.auth.challenge(repository, action)
    return RegistryError("UNAUTHORIZED", 401, why, headers=(("WWW-Authenticate", challenge),))


def _console_login(registry: Registry, why: str) -> RegistryError:
    """The 401 for the console: a Basic challenge, on which a browser asks for a login, when
    htpasswd can check one (a bearer challenge, which no browser answers, otherwise)."""
    if registry.auth.htpasswd is None:
        return _unauthorized(registry, None, None, why)
    challenge = 'Basic realm="registry-trio", charset="UTF-8"'
    return RegistryError("UNAUTHORIZED", 401, why, headers=(("WWW-Authenticate", challenge),))
