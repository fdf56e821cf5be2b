"""Every route of the API, described once.

A route is a path template, a handler per method, the access it needs, and which half of the
API serves it. The dispatcher matches the raw routes from this table, Quart's URL map is built
from it, authorisation reads the route's access, and the metrics label a request with its
route's template. Adding a route here is the whole of adding a route.

Templates: ``{name}`` is a repository name (it may hold slashes), any other ``{param}`` is one
path segment, and a trailing slash is optional (clients differ on ``/v2`` and
``.../blobs/uploads``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..console import pages
from . import admin, blobs, listing, manifests
from .access import Access
from .errors import RegistryError

__all__ = ["ROUTES", "Route", "match_raw"]


@dataclass(frozen=True)
class Route:
    template: str
    # The handler per method: a raw handler takes a RawRequest, a Quart view its path
    # parameters.
    handlers: Mapping[str, Callable[..., Any]]
    access: Access
    # Served as raw ASGI (streamed bodies, see raw.py) rather than by Quart.
    raw: bool = False
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pattern = re.escape(self.template).replace(r"\{name\}", "(?P<name>.+)")
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", pattern)
        optional_slash = f"^{pattern}?$" if pattern.endswith("/") else f"^{pattern}$"
        object.__setattr__(self, "pattern", re.compile(optional_slash))

    @property
    def quart_rule(self) -> str:
        """The template in Werkzeug's syntax: ``/v2/<path:name>/tags/list``."""
        rule = self.template.replace("{name}", "<path:name>")
        return re.sub(r"\{(\w+)\}", r"<\1>", rule)


ROUTES: list[Route] = [
    # Raw first: their bodies are streamed, and they are matched before Quart sees a request.
    Route("/v2/{name}/blobs/uploads/", {"POST": blobs.start_upload}, Access.REPOSITORY, raw=True),
    Route(
        "/v2/{name}/blobs/uploads/{id}",
        {
            "PATCH": blobs.patch_upload,
            "PUT": blobs.put_upload,
            "GET": blobs.upload_status,
            "DELETE": blobs.cancel_upload,
        },
        Access.REPOSITORY,
        raw=True,
    ),
    Route(
        "/v2/{name}/blobs/{digest}",
        {"GET": blobs.get_blob, "HEAD": blobs.get_blob, "DELETE": blobs.delete_blob},
        Access.REPOSITORY,
        raw=True,
    ),
    Route(
        "/v2/{name}/manifests/{reference}",
        {
            "GET": manifests.get_manifest,
            "HEAD": manifests.get_manifest,
            "PUT": manifests.put_manifest,
            "DELETE": manifests.delete_manifest,
        },
        Access.REPOSITORY,
        raw=True,
    ),
    Route("/v2/", {"GET": listing.base, "HEAD": listing.base}, Access.LOGIN),
    # The catalog filters repositories by read access itself.
    Route("/v2/_catalog", {"GET": listing.catalog}, Access.PUBLIC),
    Route("/v2/{name}/tags/list", {"GET": listing.tags}, Access.REPOSITORY),
    Route("/v2/{name}/referrers/{digest}", {"GET": manifests.referrers}, Access.REPOSITORY),
    Route("/metrics", {"GET": listing.metrics}, Access.PUBLIC),
    Route("/_registry/events/sinks", {"GET": admin.sinks}, Access.ADMIN),
    Route("/_registry/events/dead", {"GET": admin.dead}, Access.ADMIN),
    Route("/_registry/events/dead/replay", {"POST": admin.replay}, Access.ADMIN),
    Route("/_registry/events/history", {"GET": admin.history}, Access.ADMIN),
    Route("/_registry/events/trace/{event}", {"GET": admin.event_trace}, Access.ADMIN),
    # The operator console (HTML for a browser; see registry_trio/console).
    Route("/_registry/ui/", {"GET": pages.overview}, Access.CONSOLE),
    Route("/_registry/ui/sinks", {"GET": pages.sinks_fragment}, Access.CONSOLE),
    Route("/_registry/ui/sink", {"GET": pages.sink}, Access.CONSOLE),
    Route("/_registry/ui/sink/replay", {"POST": pages.replay}, Access.CONSOLE),
    Route("/_registry/ui/event", {"GET": pages.event}, Access.CONSOLE),
    Route("/_registry/ui/repositories", {"GET": pages.repositories}, Access.CONSOLE),
    Route("/_registry/ui/repository", {"GET": pages.repository}, Access.CONSOLE),
    Route("/_registry/ui/manifest", {"GET": pages.manifest}, Access.CONSOLE),
    Route("/_registry/ui/static/{file}", {"GET": pages.static}, Access.CONSOLE),
]


def match_raw(path: str, method: str) -> tuple[Route, dict[str, str]] | None:
    """The raw route for ``path`` and its parameters, or None to let Quart serve the request.

    A known path with a method it does not take answers 405 rather than falling through.
    """
    for route in ROUTES:
        if not route.raw or (match := route.pattern.match(path)) is None:
            continue
        if method not in route.handlers:
            methods = ", ".join(route.handlers)
            raise RegistryError(
                "UNSUPPORTED", 405, f"this endpoint takes {methods}", headers=(("Allow", methods),)
            )
        return route, match.groupdict()
    return None
