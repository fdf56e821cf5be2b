"""The API root, tag listing and the catalog, with ``n``/``last`` pagination."""

from __future__ import annotations

import json
from urllib.parse import urlencode

from quart import Response, request

from .. import oci
from ..metrics import CONTENT_TYPE
from .context import current_registry, identity
from .errors import RegistryError

__all__ = ["base", "catalog", "metrics", "tags"]


async def metrics() -> Response:
    body = await current_registry().metrics.render()
    return Response(body, 200, {"Content-Type": CONTENT_TYPE})


async def base() -> Response:
    return Response(b"{}", 200, {"Content-Type": "application/json"})


def _paginate(items: list[str], path: str, key: str, extra: dict[str, str]) -> Response:
    """One page of a sorted list, per the spec: ``last`` excludes, ``n`` limits.

    ``Link`` is set only when more items follow, so a client can stop on its absence.
    """
    last = request.args.get("last")
    if last is not None:
        items = [item for item in items if item > last]
    raw_n = request.args.get("n")
    headers = {"Content-Type": "application/json"}
    if raw_n is not None:
        if not (raw_n.isascii() and raw_n.isdigit()):  # "²" is a digit int() refuses
            # UNSUPPORTED ("invalid set of parameters"): the spec's codes have no pagination one.
            raise RegistryError(
                "UNSUPPORTED", 400, f"n must be a non-negative integer, not {raw_n!r}"
            )
        n = int(raw_n)
        if n < len(items) and n > 0:
            query = urlencode({"n": n, "last": items[n - 1]})
            headers["Link"] = f'<{path}?{query}>; rel="next"'
        items = items[:n]
    return Response(json.dumps({**extra, key: items}), 200, headers)


async def tags(name: str) -> Response:
    registry = current_registry()
    oci.validate_name(name)
    names = await registry.io(registry.storage.list_tags, name)
    return _paginate(names, f"/v2/{name}/tags/list", "tags", {"name": name})


async def catalog() -> Response:
    registry = current_registry()
    names = await registry.io(registry.storage.list_repositories)
    who = identity(request.scope)
    names = [n for n in names if "read" in registry.auth.policy.allowed(who, n)]
    return _paginate(names, "/v2/_catalog", "repositories", {})
