"""Manifest routes (raw ASGI, on the push path) and referrers (Quart).

Manifests are small JSON bodies, capped at ``http.maxManifestSize``: the body is read whole,
refused with 413 once it passes the limit (declared or chunked).
"""

from __future__ import annotations

import json

import trio
from quart import Response, request

from .. import oci
from ..events import Action, Target
from ..storage import FilesystemStorage, ManifestRecord, ManifestUnknown
from .blobs import IMMUTABLE, IO_CHUNK, not_modified
from .context import Registry, current_registry, identity
from .errors import RegistryError
from .raw import RawRequest

__all__ = ["delete_manifest", "get_manifest", "put_manifest", "referrers"]


async def _read_body(req: RawRequest, limit: int) -> bytes:
    """The request body, refusing it once it passes ``limit`` (chunked bodies included)."""
    declared = req.header("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)  # refused before a byte is read
    body = await req.read_whole(limit + 1)
    if body is None:
        body = await _read_paused_body(req, limit)
    if len(body) > limit:
        raise _too_large(limit)
    return body


async def _read_paused_body(req: RawRequest, limit: int) -> bytes:
    """A body that paused, kept in a staged file rather than in memory until it ends:
    clients that stop part-way through a manifest hold no memory while they wait."""
    registry = req.registry
    writer = await registry.io(registry.storage.open_staged_upload)
    try:
        if await req.write_rest(writer.write, IO_CHUNK, limit) > limit:
            raise _too_large(limit)
        await registry.io(writer.close)
        return await registry.io(writer.path.read_bytes)
    finally:
        with trio.CancelScope(shield=True):
            await registry.io(writer.close)
            await registry.io(registry.storage.discard_staged_upload, writer)


def _too_large(limit: int) -> RegistryError:
    return RegistryError("MANIFEST_INVALID", 413, f"manifest is larger than the {limit}-byte limit")


def _reference(reference: str) -> tuple[str | None, oci.Digest | None]:
    """Split a manifest reference into (tag, None) or (None, digest), validating either."""
    if oci.is_digest_reference(reference):
        return None, oci.parse_digest(reference)
    return oci.validate_tag(reference), None


def _stored_reference(reference: str) -> tuple[str | None, oci.Digest | None]:
    """:func:`_reference` for a lookup (GET, HEAD, DELETE): an invalid tag names nothing.

    The spec's pull endpoints fail only with 404, and its DELETE keeps 400 for "deletion is
    disabled"; a tag no push could have created is simply not there.
    """
    try:
        return _reference(reference)
    except oci.InvalidTag as exc:
        raise RegistryError("MANIFEST_UNKNOWN", 404, "manifest unknown", str(exc)) from None


def _manifest_target(
    req: RawRequest, record: ManifestRecord, tag: str | None, manifest: oci.Manifest
) -> Target:
    references = tuple(d.to_json() for d in (*manifest.blobs, *manifest.manifests))
    return Target(
        repository=req.name,
        digest=str(record.digest),
        media_type=record.media_type,
        size=len(record.body),
        tag=tag,
        url=req.registry.url(req.scope, f"/v2/{req.name}/manifests/{record.digest}"),
        references=references,
        manifest=record.body.decode("utf-8", "replace"),
    )


def _tag_exists(registry: Registry, name: str, tag: str) -> bool:
    try:
        registry.storage.resolve_tag(name, tag)
    except ManifestUnknown:
        return False
    return True


def _lookup(
    storage: FilesystemStorage, name: str, tag: str | None, digest: oci.Digest | None
) -> ManifestRecord:
    """Resolve the tag (when given) and read the manifest: one call on a worker thread."""
    if digest is None:
        assert tag is not None
        digest = storage.resolve_tag(name, tag)
    return storage.get_manifest(name, digest)


def _delete_by_digest(
    storage: FilesystemStorage, name: str, digest: oci.Digest
) -> tuple[str, list[str]]:
    """Delete a manifest and the tags that point at it: (its media type, those tags)."""
    record = storage.get_manifest(name, digest)
    manifest = oci.parse_manifest(record.body, record.media_type)
    subject = manifest.subject.digest if manifest.subject else None
    return record.media_type, storage.delete_manifest(name, digest, subject)


async def put_manifest(req: RawRequest) -> None:
    registry = req.registry
    name = req.name
    tag, expected = _reference(req.params["reference"])
    body = await _read_body(req, registry.config.http.max_manifest_size)
    manifest = oci.parse_manifest(body, req.header("content-type"), strict=True)
    digest = oci.Digest.of(body, expected.algorithm if expected else "sha256")
    if expected is not None and digest != expected:
        raise RegistryError(
            "DIGEST_INVALID",
            400,
            f"manifest body has digest {digest}, not the {expected} it was pushed as",
        )
    # Moving an existing tag is an update, which `create` alone does not allow.
    create_only = "update" not in registry.auth.policy.allowed(identity(req.scope), name)
    async with registry.repository_change(req.scope, name) as events:
        # Checked under the lock: no racing push can create the tag between check and write.
        if tag is not None and create_only and await registry.io(_tag_exists, registry, name, tag):
            raise RegistryError("DENIED", 403, f"may not update existing tag {name}:{tag}")
        result = await registry.io(registry.storage.put_manifest, name, body, manifest, digest, tag)
        if result.created_repository:
            events.append((Action.REPOSITORY_CREATED, Target(repository=name)))
        record = ManifestRecord(digest, manifest.media_type, body)
        events.append((Action.MANIFEST_PUSHED, _manifest_target(req, record, tag, manifest)))

    headers = [
        ("Location", registry.url(req.scope, f"/v2/{name}/manifests/{digest}")),
        ("Docker-Content-Digest", str(digest)),
    ]
    if manifest.subject is not None:
        headers.append(("OCI-Subject", str(manifest.subject.digest)))
    await req.respond(201, headers)


async def get_manifest(req: RawRequest) -> None:
    registry = req.registry
    tag, digest = _stored_reference(req.params["reference"])
    record = await registry.io(_lookup, registry.storage, req.name, tag, digest)
    etag = f'"{record.digest}"'
    headers = [
        ("Content-Type", record.media_type),
        ("Docker-Content-Digest", str(record.digest)),
        ("ETag", etag),
        ("Content-Length", str(len(record.body))),
    ]
    if digest is not None:  # a tag may move; what a digest names never changes
        headers.append(IMMUTABLE)
    if not_modified(req.header("if-none-match"), etag):
        await req.respond(304, headers)
        return
    if req.method == "HEAD":
        # Content-Length stays the manifest's size (clients take the descriptor size from
        # it); no body is sent.
        await req.respond(200, headers)
        return
    if registry.events.wants(Action.MANIFEST_PULLED):
        manifest = oci.parse_manifest(record.body, record.media_type)
        target = _manifest_target(req, record, tag, manifest)
        await registry.emit(req.scope, (Action.MANIFEST_PULLED, target))
    await req.respond(200, headers, record.body)


async def delete_manifest(req: RawRequest) -> None:
    registry = req.registry
    name = req.name
    tag, digest = _stored_reference(req.params["reference"])
    async with registry.repository_change(req.scope, name) as events:
        if tag is not None:
            # Deleting by tag removes the tag only; the manifest stays reachable by digest.
            digest = await registry.io(registry.storage.delete_tag, name, tag)
            events.append(
                (Action.TAG_DELETED, Target(repository=name, tag=tag, digest=str(digest)))
            )
        else:
            assert digest is not None
            media_type, tags = await registry.io(_delete_by_digest, registry.storage, name, digest)
            # The tags that pointed at it went with it: each gets its tag delete first, as in
            # distribution, so a consumer replaying the stream drops them too.
            events.extend(
                (Action.TAG_DELETED, Target(repository=name, tag=t, digest=str(digest)))
                for t in tags
            )
            target = Target(repository=name, digest=str(digest), media_type=media_type)
            events.append((Action.MANIFEST_DELETED, target))
    await req.respond(202)


async def referrers(name: str, digest: str) -> Response:
    registry = current_registry()
    oci.validate_name(name)
    subject = oci.parse_digest(digest)
    descriptors = await registry.io(registry.storage.referrers, name, subject)
    headers = {"Content-Type": oci.OCI_INDEX}
    artifact_type = request.args.get("artifactType")
    if artifact_type:
        descriptors = [d for d in descriptors if d.artifact_type == artifact_type]
        headers["OCI-Filters-Applied"] = "artifactType"
    index = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_INDEX,
        "manifests": [d.to_json() for d in descriptors],
    }
    return Response(json.dumps(index), 200, headers)
