"""Pages from templates, with the headers every console response carries.

Autoescaping is on for every template: repository names, tags, annotations, error texts and
event payloads come from whoever pushed or whatever a sink answered. Undefined names fail
the render (a typo in a template is a test failure, not an empty cell).
"""

from __future__ import annotations

import functools
import importlib.resources
from typing import Any

import jinja2
from quart import Response

from ..events.status import iso_time

__all__ = ["STATIC_FILES", "page", "static_file"]

# Scripts and styles from this origin only and never inline, so text that slipped through
# into a page could not run; no framing (clickjacking of the replay buttons); forms post
# here only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # Console URLs name repositories and events: they are nobody else's business.
    "Referrer-Policy": "no-referrer",
}

# Shown for a figure that has no value (no error yet, nothing pending).
NOTHING = "\N{EN DASH}"

# What static/ may serve, by name: nothing else under it is reachable.
STATIC_FILES = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}


def _age(seconds: float | None) -> str:
    """A duration as a person reads it: ``4.2 s``, ``3 min``, ``5.1 h``."""
    if seconds is None:
        return NOTHING
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"


def _size(size: int | None) -> str:
    if size is None:
        return NOTHING
    value, unit = float(size), "B"
    for larger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("registry_trio.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(age=_age, when=iso_time, size=_size)
    return env


def page(template: str, status: int = 200, **context: Any) -> Response:
    """``template`` rendered: it shows the registry's data, so no cache may keep it."""
    body = _environment().get_template(template).render(**context)
    headers = {
        **SECURITY_HEADERS,
        "Content-Type": "text/html; charset=utf-8",
        "Cache-Control": "no-store",
    }
    return Response(body, status, headers)


@functools.cache
def _static_body(name: str) -> bytes:
    return importlib.resources.files(__package__).joinpath("static", name).read_bytes()


def static_file(name: str) -> Response | None:
    """One of :data:`STATIC_FILES`, or None for any other name."""
    content_type = STATIC_FILES.get(name)
    if content_type is None:
        return None
    headers = {**SECURITY_HEADERS, "Content-Type": content_type, "Cache-Control": "no-cache"}
    return Response(_static_body(name), 200, headers)
