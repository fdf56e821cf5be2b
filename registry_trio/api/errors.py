"""OCI error responses: one exception type, one mapping from domain errors, one body shape.

Both halves of the API (the raw ASGI blob routes and the Quart routes) render failures through
:func:`error_response`, so a client sees the same ``{"errors": [...]}`` body and status for
the same problem whichever path served it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from .. import oci, storage
from ..auth import TooManyFailedLogins
from ..events.queue import QueueError, QueueFull

__all__ = ["RegistryError", "error_response", "to_registry_error"]


@dataclass
class RegistryError(Exception):
    code: str
    status: int
    message: str
    detail: object = None
    headers: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


# Domain errors -> (OCI code, HTTP status). Messages come from the exception itself.
_MAPPING: dict[type[Exception], tuple[str, int]] = {
    oci.InvalidName: ("NAME_INVALID", 400),
    oci.InvalidTag: ("MANIFEST_INVALID", 400),
    oci.InvalidDigest: ("DIGEST_INVALID", 400),
    oci.InvalidManifest: ("MANIFEST_INVALID", 400),
    oci.UnsupportedMediaType: ("UNSUPPORTED", 415),
    storage.NameUnknown: ("NAME_UNKNOWN", 404),
    storage.BlobUnknown: ("BLOB_UNKNOWN", 404),
    storage.BlobUploadUnknown: ("BLOB_UPLOAD_UNKNOWN", 404),
    # One writer per session at a time; the client may retry once its other request is done.
    storage.UploadBusy: ("BLOB_UPLOAD_INVALID", 409),
    storage.DigestMismatch: ("DIGEST_INVALID", 400),
    storage.ManifestUnknown: ("MANIFEST_UNKNOWN", 404),
    storage.ManifestBlobUnknown: ("MANIFEST_BLOB_UNKNOWN", 400),
    # The change is stored but its event is not: the client must not see success.
    QueueError: ("UNAVAILABLE", 503),
}

_DEFAULT_MESSAGES = {
    "NAME_UNKNOWN": "repository name not known to registry",
    "BLOB_UNKNOWN": "blob unknown to registry",
    "BLOB_UPLOAD_UNKNOWN": "blob upload unknown to registry",
    "MANIFEST_UNKNOWN": "manifest unknown",
}


log = logging.getLogger("registry_trio.api")

# 507 Insufficient Storage (RFC 4918): the server cannot store what the request needs. Not a
# 500 (nothing is broken: freeing space fixes it), not 413 (the request is not too large)
# nor 503 (pulls still work): clients report it as a server-side error and may retry.
_STORAGE_FULL = (
    "the registry's storage is full: this request was not stored; push again once space is freed"
)
_QUEUE_FULL = (
    "the registry's event queue is out of disk space: the change was stored but its event "
    "was not, so it is not acknowledged; push again once space is freed"
)


def to_registry_error(exc: BaseException) -> RegistryError | None:
    """The OCI error for a domain exception, or None when it is not one we expect.

    A full disk is also logged here, in one line for the operator (which path, how much
    room is left): it is theirs to fix, and a traceback would tell them nothing more.
    """
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, TooManyFailedLogins):
        retry_after = (("Retry-After", str(exc.retry_after)),)
        return RegistryError("TOOMANYREQUESTS", 429, str(exc), headers=retry_after)
    if isinstance(exc, storage.StorageFull):
        log.error("storage full: %s; pushes fail with 507 until space is freed", exc)
        return RegistryError("UNAVAILABLE", 507, _STORAGE_FULL)
    if isinstance(exc, QueueFull):
        log.error("event queue full: %s; pushes fail with 507 until space is freed", exc)
        return RegistryError("UNAVAILABLE", 507, _QUEUE_FULL)
    for kind, (code, status) in _MAPPING.items():
        if isinstance(exc, kind):
            default = _DEFAULT_MESSAGES.get(code)
            detail = str(exc) or None
            if isinstance(exc, storage.ManifestBlobUnknown):
                return RegistryError(code, status, str(exc), {"digest": exc.digest})
            if default is not None:
                return RegistryError(code, status, default, detail)
            return RegistryError(code, status, str(exc))
    return None


def error_response(error: RegistryError) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body for ``error``."""
    entry: dict[str, object] = {"code": error.code, "message": error.message}
    if error.detail is not None:
        entry["detail"] = error.detail
    body = json.dumps({"errors": [entry]}).encode()
    headers = [("Content-Type", "application/json"), *error.headers]
    return error.status, headers, body
