"""Manifest and referrers routes (Quart): small JSON bodies, capped at the manifest limit."""

from __future__ import annotations

import json

from quart import Blueprint, Response, request

from .. import oci
from ..events import Action, Target
from ..storage import ManifestRecord, ManifestUnknown
from .context import Registry, identity
from .errors import RegistryError
from .quart_app import current_registry

__all__ = ["blueprint"]

blueprint = Blueprint("manifests", __name__)


async def _read_body(limit: int) -> bytes:
    """The request body, refusing it once it passes ``limit`` (chunked bodies included)."""
    body = bytearray()
    async for chunk in request.body:
        body += chunk
        if len(body) > limit:
            raise RegistryError(
                "MANIFEST_INVALID", 413, f"manifest is larger than the {limit}-byte limit"
            )
    return bytes(body)


def _reference(reference: str) -> tuple[str | None, oci.Digest | None]:
    """Split a manifest reference into (tag, None) or (None, digest), validating either."""
    if oci.is_digest_reference(reference):
        return None, oci.parse_digest(reference)
    return oci.validate_tag(reference), None


async def _resolve(registry: Registry, name: str, reference: str) -> tuple[str | None, oci.Digest]:
    tag, digest = _reference(reference)
    if digest is None:
        digest = await registry.io(registry.storage.resolve_tag, name, tag)
    return tag, digest


def _manifest_target(
    registry: Registry, name: str, record: ManifestRecord, tag: str | None, manifest: oci.Manifest
) -> Target:
    references = tuple(d.to_json() for d in (*manifest.blobs, *manifest.manifests))
    return Target(
        repository=name,
        digest=str(record.digest),
        media_type=record.media_type,
        size=len(record.body),
        tag=tag,
        url=registry.url(request.scope, f"/v2/{name}/manifests/{record.digest}"),
        references=references,
        manifest=record.body.decode("utf-8", "replace"),
    )


def _tag_exists(registry: Registry, name: str, tag: str) -> bool:
    try:
        registry.storage.resolve_tag(name, tag)
    except ManifestUnknown:
        return False
    return True


@blueprint.route("/v2/<path:name>/manifests/<reference>", methods=["PUT"])
async def put_manifest(name: str, reference: str) -> Response:
    registry = current_registry()
    oci.validate_name(name)
    tag, expected = _reference(reference)
    body = await _read_body(registry.config.http.max_manifest_size)
    manifest = oci.parse_manifest(body, request.headers.get("Content-Type"))
    digest = oci.Digest.of(body, expected.algorithm if expected else "sha256")
    if expected is not None and digest != expected:
        raise RegistryError(
            "DIGEST_INVALID",
            400,
            f"manifest body has digest {digest}, not the {expected} it was pushed as",
        )
    if tag is not None and "update" not in registry.auth.policy.allowed(
        identity(request.scope), name
    ):
        # Moving an existing tag is an update, which `create` alone does not allow.
        existing = await registry.io(_tag_exists, registry, name, tag)
        if existing:
            raise RegistryError("DENIED", 403, f"may not update existing tag {name}:{tag}")
    result = await registry.io(registry.storage.put_manifest, name, body, manifest, digest, tag)
    record = ManifestRecord(digest, manifest.media_type, body)
    changes = []
    if result.created_repository:
        changes.append((Action.REPOSITORY_CREATED, Target(repository=name)))
    changes.append(
        (Action.MANIFEST_PUSHED, _manifest_target(registry, name, record, tag, manifest))
    )
    await registry.emit(request.scope, *changes)

    headers = {"Location": f"/v2/{name}/manifests/{digest}", "Docker-Content-Digest": str(digest)}
    if manifest.subject is not None:
        headers["OCI-Subject"] = str(manifest.subject.digest)
    return Response(b"", 201, headers)


@blueprint.route("/v2/<path:name>/manifests/<reference>", methods=["GET", "HEAD"])
async def get_manifest(name: str, reference: str) -> Response:
    registry = current_registry()
    oci.validate_name(name)
    tag, digest = await _resolve(registry, name, reference)
    record = await registry.io(registry.storage.get_manifest, name, digest)
    headers = {
        "Content-Type": record.media_type,
        "Docker-Content-Digest": str(record.digest),
        "ETag": f'"{record.digest}"',
        "Content-Length": str(len(record.body)),
    }
    if request.method == "HEAD":
        # With the body given, Content-Length stays the manifest's size (clients take the
        # descriptor size from it); Hypercorn sends no body in answer to HEAD.
        return Response(record.body, 200, headers)
    if registry.events.wants(Action.MANIFEST_PULLED):
        manifest = oci.parse_manifest(record.body, record.media_type)
        target = _manifest_target(registry, name, record, tag, manifest)
        await registry.emit(request.scope, (Action.MANIFEST_PULLED, target))
    return Response(record.body, 200, headers)


@blueprint.route("/v2/<path:name>/manifests/<reference>", methods=["DELETE"])
async def delete_manifest(name: str, reference: str) -> Response:
    registry = current_registry()
    oci.validate_name(name)
    tag, digest = _reference(reference)
    if tag is not None:
        # Deleting by tag removes the tag only; the manifest stays reachable by digest.
        digest = await registry.io(registry.storage.delete_tag, name, tag)
        target = Target(repository=name, tag=tag, digest=str(digest))
        await registry.emit(request.scope, (Action.TAG_DELETED, target))
        return Response(b"", 202)
    record = await registry.io(registry.storage.get_manifest, name, digest)
    manifest = oci.parse_manifest(record.body, record.media_type)
    subject = manifest.subject.digest if manifest.subject else None
    await registry.io(registry.storage.delete_manifest, name, digest, subject)
    target = Target(repository=name, digest=str(digest), media_type=record.media_type)
    await registry.emit(request.scope, (Action.MANIFEST_DELETED, target))
    return Response(b"", 202)


@blueprint.route("/v2/<path:name>/referrers/<digest>", methods=["GET"])
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
