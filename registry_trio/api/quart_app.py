"""The Quart half of the API: JSON-sized routes, with OCI error rendering for all of them."""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from typing import Any, cast

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException, NotFound

from .access import authorize
from .context import REGISTRY_EXTENSION, ROUTE_KEY, Registry
from .errors import RegistryError, error_response, to_registry_error
from .routes import ROUTES, Route

__all__ = ["create_quart_app"]

log = logging.getLogger("registry_trio.api")

# The largest request body a Quart route takes: theirs are small JSON documents at most (a
# dead-letter replay). Quart buffers a body whole as it comes, so this is also what a client
# that stalls part-way can make it hold.
MAX_BODY = 64 * 1024


def _http_error(exc: HTTPException) -> RegistryError:
    status = exc.code or 500
    if status == 413:
        return RegistryError(
            "UNSUPPORTED", 413, f"request body is larger than the {MAX_BODY}-byte limit"
        )
    if status == 404:
        # UNSUPPORTED: the OCI spec allows only its own codes on a 4xx (distribution's
        # NOT_FOUND is not one of them).
        return RegistryError("UNSUPPORTED", 404, "no such endpoint in the registry API")
    if status == 405:
        return RegistryError("UNSUPPORTED", 405, "method not allowed on this endpoint")
    return RegistryError("UNSUPPORTED", status, exc.description or "request not supported")


def create_quart_app(registry: Registry) -> QuartTrio:
    app = QuartTrio("registry_trio", static_folder=None)
    # One spelling per route: Werkzeug would otherwise redirect or route `/v2/a/tags//list`
    # as `/v2/a/tags/list`, a path the raw routes, the access log and the metrics never see.
    app.url_map.merge_slashes = False
    # Quart holds a request body whole, and refuses a larger one (up front when announced).
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.extensions[REGISTRY_EXTENSION] = registry
    # One rule per route and handler (a view serves every method it is given for).
    routed: dict[str, Route] = {}
    for route in ROUTES:
        if route.raw:
            continue
        by_view: dict[Callable[..., Any], list[str]] = {}
        for method, view in route.handlers.items():
            by_view.setdefault(view, []).append(method)
        for view, methods in by_view.items():
            endpoint = f"{route.template} {' '.join(methods)}"
            routed[endpoint] = route
            app.add_url_rule(
                route.quart_rule, endpoint, view, methods=methods, strict_slashes=False
            )

    @app.before_request
    async def authorize_route() -> None:
        """Authorise the rule Werkzeug matched, for the view arguments the view will get."""
        if request.scope["path"].startswith("//"):
            # Werkzeug strips leading slashes before matching; the raw routes do not, and
            # neither does anything else that reads the path. Such a path is routed nowhere.
            raise NotFound()
        rule = request.url_rule
        if rule is None:
            return  # not routed (404, 405): Quart answers it and no view runs
        route = routed[rule.endpoint]
        # A plain dict at run time: Quart's TypedDict cannot name the registry's own keys.
        scope = cast(MutableMapping[str, Any], request.scope)
        scope[ROUTE_KEY] = route.template
        name = (request.view_args or {}).get("name")
        await authorize(registry, scope, route.access, name)

    @app.errorhandler(Exception)
    async def render_error(exc: Exception) -> Response:
        error = to_registry_error(exc)
        if error is None and isinstance(exc, HTTPException):
            error = _http_error(exc)
        if error is None:
            log.exception("unhandled error")
            error = RegistryError("UNKNOWN", 500, "internal server error; see the server log")
        status, headers, body = error_response(error)
        return Response(body, status, Headers(headers))

    return app
