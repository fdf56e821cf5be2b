"""Blob and upload routes, served as raw ASGI (:mod:`.raw`) in front of Quart.

Quart would drain a request body into an unbounded buffer (no backpressure: a slow disk lets
a 1 GiB upload sit in memory) and cut any response at ``RESPONSE_TIMEOUT`` (a long blob
download would be truncated). Reading ``receive()`` ourselves bounds memory to one hypercorn
queue plus one write buffer, and streams downloads for as long as they take
(``bench/bigblob.py`` measures the peak memory of a 1 GiB push and pull).

Every route validates the repository name and digest through :mod:`registry_trio.oci` before
touching storage, and renders every failure through :mod:`registry_trio.api.errors`.
"""

from __future__ import annotations

import os
import re
import secrets
from typing import Any, BinaryIO

import trio

from .. import oci
from ..events import Action, Target
from ..storage import FilesystemStorage, UploadWriter
from .context import identity
from .errors import RegistryError
from .raw import RawRequest

__all__ = [
    "IMMUTABLE",
    "IO_CHUNK",
    "cancel_upload",
    "delete_blob",
    "get_blob",
    "not_modified",
    "patch_upload",
    "put_upload",
    "start_upload",
    "upload_status",
]

# Disk writes and reads are batched to this size: big enough that a thread hop per batch
# is negligible, small enough that memory per request stays flat.
IO_CHUNK = 1 << 20

# What distribution sends on content addressed by digest: it never changes, so caches may
# keep it for a year.
IMMUTABLE = ("Cache-Control", "max-age=31536000")

_CONTENT_RANGE = re.compile(r"^(?:bytes )?(\d+)-(\d+)(?:/(?:\d+|\*))?$")
# One range-spec of a ``Range: bytes=`` list.
_RANGE = re.compile(r"(\d*)-(\d*)")
# Ranges served in one multipart/byteranges answer (podman's zstd:chunked pull asks for a
# handful); more is refused rather than answered with thousands of tiny parts.
MAX_RANGES = 64


def not_modified(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` field matches ``etag``: ``*``, or one of its list by weak
    comparison (RFC 9110 13.1.2: ``W/"x"`` matches ``"x"``)."""
    if not if_none_match:
        return False
    tags = (tag.strip() for tag in if_none_match.split(","))
    return any(tag == "*" or tag.removeprefix("W/") == etag for tag in tags)


def _digest_param(value: str | None, what: str = "digest") -> oci.Digest:
    if not value:
        raise RegistryError("DIGEST_INVALID", 400, f"the '{what}' query parameter is required")
    return oci.parse_digest(value)


def _upload_location(req: RawRequest, upload_id: str) -> str:
    # Absolute, as distribution answers: some clients take the scheme and host from it.
    return req.registry.url(req.scope, f"/v2/{req.name}/blobs/uploads/{upload_id}")


def _upload_headers(location: str, upload_id: str, offset: int) -> list[tuple[str, str]]:
    # Docker's convention: an empty upload reports "0-0", not "0--1".
    return [
        ("Location", location),
        ("Range", f"0-{max(offset - 1, 0)}"),
        ("Docker-Upload-UUID", upload_id),
    ]


def _session_headers(req: RawRequest, upload_id: str, offset: int) -> list[tuple[str, str]]:
    """The headers of a POST or PATCH that leaves a session open: where to send the next chunk,
    and (when configured) how small a chunk may be (OCI ``OCI-Chunk-Min-Length``)."""
    headers = _upload_headers(_upload_location(req, upload_id), upload_id, offset)
    if min_length := req.registry.config.http.chunk_min_length:
        headers.append(("OCI-Chunk-Min-Length", str(min_length)))
    return headers


async def _write_body(req: RawRequest, writer: UploadWriter) -> None:
    """Write the rest of the body to ``writer``; on failure undo this request's bytes.

    The rollback runs shielded: a cancelled or disconnected request must still leave the
    session exactly as it was before this request, or the next chunk's offset would lie.
    """
    registry = req.registry
    try:
        await req.write_rest(writer.write, IO_CHUNK)
    except BaseException:
        with trio.CancelScope(shield=True):
            await registry.io(writer.rollback)
        raise


def _expected_length(
    content_range: str | None, start: int, location: str, upload_id: str
) -> int | None:
    """The body length ``Content-Range`` announces, checked to continue the session at ``start``."""
    if not content_range:
        return None
    match = _CONTENT_RANGE.match(content_range.strip())
    first, last = (int(match[1]), int(match[2])) if match else (-1, -1)
    if not match or first != start or last < first:
        raise RegistryError(
            "BLOB_UPLOAD_INVALID",
            416,
            f"Content-Range {content_range!r} does not continue the upload, "
            f"which holds {start} bytes",
            headers=tuple(_upload_headers(location, upload_id, start)),
        )
    return last - first + 1


def _size_invalid(expected: int, received: int) -> RegistryError:
    return RegistryError(
        "SIZE_INVALID", 400, f"Content-Range announced {expected} bytes but the body had {received}"
    )


def _append_whole(
    storage: FilesystemStorage,
    name: str,
    upload_id: str,
    location: str,
    content_range: str | None,
    data: bytes,
    digest: oci.Digest | None,
) -> int:
    """Claim a session, append a body held in memory (and with ``digest``, finish it): one
    call, on a worker thread.

    Returns the new offset, or the blob's size when finishing. Nothing is written when
    ``Content-Range`` does not match the body.
    """
    with storage.claim_upload(name, upload_id):
        writer = storage.open_upload(name, upload_id)
        try:
            expected = _expected_length(content_range, writer.start, location, upload_id)
            if expected is not None and len(data) != expected:
                raise _size_invalid(expected, len(data))
            try:
                writer.write(data)
            except BaseException:
                writer.rollback()
                raise
        finally:
            writer.close()
        if digest is None:
            return writer.offset
        return storage.finish_upload(name, upload_id, digest)


async def _append(
    req: RawRequest, upload_id: str, content_range: str | None, digest: oci.Digest | None = None
) -> int:
    """Append the body to an upload, honouring ``Content-Range``; returns the new offset.

    With ``digest`` the upload is then verified and published as a blob: returns its size.
    Everything from the first write to the publication happens holding the session's claim,
    so a second request for the session, from this process or another, is refused with 409
    meanwhile, and the purger leaves the session alone, however long the body stalls.
    """
    registry = req.registry
    location = _upload_location(req, upload_id)
    body = await req.read_whole(IO_CHUNK)
    if body is not None:
        return await registry.io(
            _append_whole,
            registry.storage,
            req.name,
            upload_id,
            location,
            content_range,
            body,
            digest,
        )
    # Not abandoned on cancellation (registry.io): a claim taken is always handed back here.
    claim = await registry.io(registry.storage.claim_upload, req.name, upload_id)
    try:
        writer = await registry.io(registry.storage.open_upload, req.name, upload_id)
        try:
            expected = _expected_length(content_range, writer.start, location, upload_id)
            await _write_body(req, writer)
            received = writer.offset - writer.start
            if expected is not None and received != expected:
                with trio.CancelScope(shield=True):
                    await registry.io(writer.rollback)
                raise _size_invalid(expected, received)
            offset = writer.offset
        finally:
            with trio.CancelScope(shield=True):
                await registry.io(writer.close)
        if digest is None:
            return offset
        return await registry.io(registry.storage.finish_upload, req.name, upload_id, digest)
    finally:
        # On the event loop: a release does no disk I/O, and must not wait for a thread.
        claim.release()


def _blob_target(req: RawRequest, digest: oci.Digest, size: int, **extra: Any) -> Target:
    return Target(
        repository=req.name,
        digest=str(digest),
        media_type="application/octet-stream",
        size=size,
        url=req.registry.url(req.scope, f"/v2/{req.name}/blobs/{digest}"),
        **extra,
    )


async def _pushed(req: RawRequest, digest: oci.Digest, size: int) -> None:
    await _created(req, digest, Action.BLOB_PUSHED, _blob_target(req, digest, size))


async def _created(req: RawRequest, digest: oci.Digest, action: Action, target: Target) -> None:
    """Record the event (durably) and only then answer 201 with the blob's location."""
    location = req.registry.url(req.scope, f"/v2/{req.name}/blobs/{digest}")
    await req.registry.emit(req.scope, (action, target))
    await req.respond(201, [("Location", location), ("Docker-Content-Digest", str(digest))])


# -- uploads ---------------------------------------------------------------------------------


async def start_upload(req: RawRequest) -> None:
    registry = req.registry
    if mount := req.query("mount"):
        digest = _digest_param(mount, "mount")
        source = req.query("from")
        auth = registry.auth
        if source is not None:
            oci.validate_name(source)
        # Mounting reads the source: without read access there it is as if the blob were
        # absent. Without a source, any stored blob could be named, so that automatic mount
        # is only offered when the registry has no authentication at all.
        if source is not None:
            may_mount = "read" in auth.policy.allowed(identity(req.scope), source)
        else:
            may_mount = not auth.enabled
        size = None
        if may_mount:
            size = await registry.io(registry.storage.mount_blob, req.name, digest, source)
        if size is not None:
            target = _blob_target(req, digest, size, from_repository=source)
            await _created(req, digest, Action.BLOB_MOUNTED, target)
            return
        # Nothing to mount: fall through to an ordinary session, as the spec asks.

    monolithic = req.query("digest")
    if monolithic is None:
        upload_id = await registry.io(registry.storage.create_upload, req.name)
        await req.respond(202, _session_headers(req, upload_id, 0))
        return
    # Monolithic: the whole blob in this request, staged in one file rather than a session;
    # a blob small enough to buffer is verified and stored in one call.
    digest = _digest_param(monolithic)
    body = await req.read_whole(IO_CHUNK)
    if body is not None:
        size = await registry.io(registry.storage.put_blob, req.name, body, digest)
        await _pushed(req, digest, size)
        return
    writer = await registry.io(registry.storage.open_staged_upload)
    try:
        try:
            await _write_body(req, writer)
        finally:
            with trio.CancelScope(shield=True):
                await registry.io(writer.close)
        size = await registry.io(registry.storage.finish_staged_upload, req.name, writer, digest)
    except BaseException:
        with trio.CancelScope(shield=True):
            await registry.io(registry.storage.discard_staged_upload, writer)
        raise
    await _pushed(req, digest, size)


async def patch_upload(req: RawRequest) -> None:
    upload_id = req.params["id"]
    offset = await _append(req, upload_id, req.header("content-range"))
    await req.respond(202, _session_headers(req, upload_id, offset))


async def put_upload(req: RawRequest) -> None:
    upload_id = req.params["id"]
    digest = _digest_param(req.query("digest"))
    size = await _append(req, upload_id, req.header("content-range"), digest)
    await _pushed(req, digest, size)


async def upload_status(req: RawRequest) -> None:
    upload_id = req.params["id"]
    offset = await req.registry.io(req.registry.storage.upload_offset, req.name, upload_id)
    await req.respond(204, _upload_headers(_upload_location(req, upload_id), upload_id, offset))


async def cancel_upload(req: RawRequest) -> None:
    upload_id = req.params["id"]
    await req.registry.io(req.registry.storage.cancel_upload, req.name, upload_id)
    await req.respond(204)


# -- blobs -----------------------------------------------------------------------------------


def _unsatisfiable(header: str, size: int, why: str = "") -> RegistryError:
    # BLOB_UPLOAD_INVALID: the spec's codes have no range one (distribution's RANGE_INVALID
    # is not allowed on a 4xx); the status and Content-Range say what went wrong.
    return RegistryError(
        "BLOB_UPLOAD_INVALID",
        416,
        f"range {header[:200]!r} cannot be satisfied for a blob of {size} bytes{why}",
        headers=(("Content-Range", f"bytes */{size}"),),
    )


def _position(digits: str) -> int:
    """A byte position of a range; a number longer than any file size reads as 10**18
    (past the end), rather than converting thousands of digits (which Python refuses)."""
    return int(digits) if len(digits) <= 18 else 10**18


def _parse_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """``Range: bytes=a-b, c-d, -n, e-`` -> inclusive (start, end) pairs in the order asked,
    or None to serve the whole blob; 416 when nothing can be satisfied.

    As Go's ``http.ServeContent`` (and so distribution): ranges starting past the end are
    dropped, and ranges that together ask for more than the blob (overlaps: a broken client
    or an amplification attempt) get the blob whole. More than :data:`MAX_RANGES` is refused.
    """
    specs = [spec.strip() for spec in header.strip().removeprefix("bytes=").split(",")]
    specs = [spec for spec in specs if spec]  # RFC 9110 5.6.1: empty list elements
    if len(specs) > MAX_RANGES:
        raise _unsatisfiable(header, size, f": at most {MAX_RANGES} ranges are served at once")
    ranges = []
    for spec in specs:
        match = _RANGE.fullmatch(spec)
        if not match or not (match[1] or match[2]):
            raise _unsatisfiable(header, size)
        if not match[1]:  # suffix form: the last N bytes
            if suffix := _position(match[2]):
                ranges.append((max(size - suffix, 0), size - 1))
            continue
        start = _position(match[1])
        end = _position(match[2]) if match[2] else size - 1
        if end < start:
            raise _unsatisfiable(header, size)
        if start < size:
            ranges.append((start, min(end, size - 1)))
    if not ranges:
        raise _unsatisfiable(header, size)
    if sum(end - start + 1 for start, end in ranges) > size:
        return None
    return ranges


# What a response body is made of: literal bytes, or (offset, length) of the blob.
_Segment = bytes | tuple[int, int]


def _multipart(ranges: list[tuple[int, int]], size: int) -> tuple[str, list[_Segment]]:
    """The ``multipart/byteranges`` body (RFC 9110 14.6) of ``ranges``: boundary, segments."""
    boundary = secrets.token_hex(16)
    segments: list[_Segment] = []
    for i, (start, end) in enumerate(ranges):
        part_head = (
            ("\r\n" if i else "") + f"--{boundary}\r\n"
            "Content-Type: application/octet-stream\r\n"
            f"Content-Range: bytes {start}-{end}/{size}\r\n\r\n"
        )
        segments += [part_head.encode(), (start, end - start + 1)]
    segments.append(f"\r\n--{boundary}--\r\n".encode())
    return boundary, segments


async def _send_segments(req: RawRequest, f: BinaryIO, segments: list[_Segment]) -> None:
    """Send a response body, reading the blob's parts through the worker thread in batches."""
    registry = req.registry
    fd = f.fileno()
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if isinstance(segment, bytes):
            await req.send({"type": "http.response.body", "body": segment, "more_body": not last})
            continue
        offset, remaining = segment
        while remaining > 0:
            block = await registry.io(os.pread, fd, min(IO_CHUNK, remaining), offset)
            if not block:  # the file shrank under us; nothing sane left to send
                await req.send({"type": "http.response.body", "body": b""})
                return
            offset += len(block)
            remaining -= len(block)
            more = remaining > 0 or not last
            await req.send({"type": "http.response.body", "body": block, "more_body": more})
        if last and segment[1] == 0:  # an empty blob: nothing was sent
            await req.send({"type": "http.response.body", "body": b""})


async def get_blob(req: RawRequest) -> None:
    registry = req.registry
    digest = oci.parse_digest(req.params["digest"])
    if req.method == "HEAD":
        f, size = None, registry.io_inline(registry.storage.blob_size, req.name, digest)
    else:
        f, size = await registry.io(registry.storage.open_blob, req.name, digest)
    try:
        etag = f'"{digest}"'
        headers = [
            ("Docker-Content-Digest", str(digest)),
            ("Accept-Ranges", "bytes"),
            ("ETag", etag),
            IMMUTABLE,
        ]
        if not_modified(req.header("if-none-match"), etag):
            # The client has these bytes: no body, no Range, and no pull to report.
            await req.respond(304, [*headers, ("Content-Length", str(size))])
            return
        content_type, status = "application/octet-stream", 200
        segments: list[_Segment] = [(0, size)]
        range_header = req.header("range")
        # A Range in a unit other than bytes MUST be ignored (RFC 9110 14.2).
        ranges = None
        if range_header and range_header.strip().startswith("bytes=") and size > 0:
            ranges = _parse_ranges(range_header, size)
        if ranges is not None:
            status = 206
            if len(ranges) == 1:
                ((start, end),) = ranges
                headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
                segments = [(start, end - start + 1)]
            else:
                boundary, segments = _multipart(ranges, size)
                content_type = f"multipart/byteranges; boundary={boundary}"
        length = sum(len(s) if isinstance(s, bytes) else s[1] for s in segments)
        headers += [("Content-Type", content_type), ("Content-Length", str(length))]
        if f is None:  # HEAD
            await req.respond(status, headers)
            return
        await registry.emit(req.scope, (Action.BLOB_PULLED, _blob_target(req, digest, size)))
        await req.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers],
            }
        )
        await _send_segments(req, f, segments)
    finally:
        if f is not None:
            f.close()


async def delete_blob(req: RawRequest) -> None:
    registry = req.registry
    digest = oci.parse_digest(req.params["digest"])
    await registry.io(registry.storage.delete_blob, req.name, digest)
    await registry.emit(
        req.scope, (Action.BLOB_DELETED, Target(repository=req.name, digest=str(digest)))
    )
    await req.respond(202)
