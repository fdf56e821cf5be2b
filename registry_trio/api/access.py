"""What each request needs: the repository it touches and the access action it takes."""

from __future__ import annotations

import re

__all__ = ["required_access"]

_REPOSITORY_ROUTE = re.compile(
    r"^/v2/(?P<name>.+)/(?:manifests/[^/]+|blobs/uploads/?[^/]*|blobs/[^/]+|tags/list"
    r"|referrers/[^/]+)$"
)


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
