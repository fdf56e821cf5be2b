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
        raise _unauthorized(registry, repository, action, str(exc)) from None
    scope[IDENTITY_KEY] = who
    if access is Access.ADMIN:
        _authorize_admin(registry, scope, who)
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


def _authorize_admin(registry: Registry, scope: MutableMapping[str, Any], who: Identity) -> None:
    auth = registry.auth
    if auth.enabled:
        if who.anonymous:
            raise _unauthorized(registry, None, None, "the admin API needs an admin login")
        if not auth.policy.is_admin(who):
            raise RegistryError("DENIED", 403, f"{who.name} is not an administrator")
        return
    # No authentication configured: the admin API answers the local machine only.
    client = scope.get("client")
    if client is None or not ipaddress.ip_address(client[0]).is_loopback:
        raise RegistryError("DENIED", 403, "the admin API is only served on loopback")


def _unauthorized(
    registry: Registry, repository: str | None, action: str | None, why: str
) -> RegistryError:
    challenge = registry.auth.challenge(repository, action)
    return RegistryError("UNAUTHORIZED", 401, why, headers=(("WWW-Authenticate", challenge),))
