"""What each request needs: the repository it touches and the access action it takes."""

from __future__ import annotations

import re

__all__ = ["required_access"]

_REPOSITORY_ROUTE = re.compile(
    r"^/v2/(?P<name>.+)/(?:manifests/[^/]+|blobs/uploads/?[^/]*|blobs/[^/]+|tags/list"
    r"|referrers/[^/]+)$"
)


_ROUTE_NAMES = [
    (re.compile(r"^/v2/?$"), "/v2/"),
    (re.compile(r"^/v2/_catalog$"), "/v2/_catalog"),
    (re.compile(r"^/v2/.+/blobs/uploads/?$"), "/v2/{name}/blobs/uploads/"),
    (re.compile(r"^/v2/.+/blobs/uploads/[^/]+$"), "/v2/{name}/blobs/uploads/{id}"),
    (re.compile(r"^/v2/.+/blobs/[^/]+$"), "/v2/{name}/blobs/{digest}"),
    (re.compile(r"^/v2/.+/manifests/[^/]+$"), "/v2/{name}/manifests/{reference}"),
    (re.compile(r"^/v2/.+/tags/list$"), "/v2/{name}/tags/list"),
    (re.compile(r"^/v2/.+/referrers/[^/]+$"), "/v2/{name}/referrers/{digest}"),
    (re.compile(r"^/_registry/"), "/_registry/"),
    (re.compile(r"^/metrics$"), "/metrics"),
]


def route_name(path: str) -> str:
    """The route template of ``path``: a metrics label that does not grow with repositories."""
    for pattern, name in _ROUTE_NAMES:
        if pattern.match(path):
            return name
    return "other"


def required_access(method: str, path: str) -> tuple[str | None, str | None]:
    """``(repository, action)`` for a repository route, ``(None, None)`` otherwise.

    Pushing content needs ``create``; replacing an existing tag additionally needs
    ``update``, which the manifest handler checks once it knows the tag exists.
    """
    match = _REPOSITORY_ROUTE.match(path)
    if match is None:
        return None, None
    if method in ("GET", "HEAD"):
        action = "read"
    elif method == "DELETE":
        action = "delete"
    else:
        action = "create"
    return match["name"], action
