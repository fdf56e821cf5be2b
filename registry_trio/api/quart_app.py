"""The Quart half of the API: JSON-sized routes, with OCI error rendering for all of them."""

from __future__ import annotations

import logging
from typing import cast

from quart import Response, current_app
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .context import Registry
from .errors import RegistryError, error_response, to_registry_error

__all__ = ["create_quart_app", "current_registry"]

log = logging.getLogger("registry_trio.api")

_EXTENSION_KEY = "registry_trio"

# The largest request body a Quart route takes: theirs are small JSON documents at most (a
# dead-letter replay). Quart buffers a body whole as it comes, so this is also what a client
# that stalls part-way can make it hold.
MAX_BODY = 64 * 1024


def current_registry() -> Registry:
    return cast(Registry, current_app.extensions[_EXTENSION_KEY])


def _http_error(exc: HTTPException) -> RegistryError:
    status = exc.code or 500
    if status == 413:
        return RegistryError(
            "UNSUPPORTED", 413, f"request body is larger than the {MAX_BODY}-byte limit"
        )
    if status == 404:
        return RegistryError("NOT_FOUND", 404, "no such endpoint in the registry API")
    if status == 405:
        return RegistryError("UNSUPPORTED", 405, "method not allowed on this endpoint")
    return RegistryError("UNSUPPORTED", status, exc.description or "request not supported")


def create_quart_app(registry: Registry) -> QuartTrio:
    from . import admin, listing, manifests

    app = QuartTrio("registry_trio")
    # Quart holds a request body whole, and refuses a larger one (up front when announced).
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.extensions[_EXTENSION_KEY] = registry
    app.register_blueprint(listing.blueprint)
    app.register_blueprint(manifests.blueprint)
    app.register_blueprint(admin.blueprint)

    @app.errorhandler(Exception)
    async def render_error(exc: Exception) -> Response:
        error = to_registry_error(exc)
        if error is None and isinstance(exc, HTTPException):
            error = _http_error(exc)
        if error is None:
            log.exception("unhandled error")
            error = RegistryError("UNKNOWN", 500, "internal server error; see the server log")
        status, headers, body = error_response(error)
        return Response(body, status, headers)

    return app
