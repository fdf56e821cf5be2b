"""Helpers for the API tests: digests, manifest documents, uploads, error and disk checks."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def descriptor(media_type: str, data: bytes, **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data), **extra}


def dumps(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True).encode()


def image_manifest(
    config: bytes,
    layers: list[bytes],
    *,
    media_type: str = OCI_MANIFEST,
    config_type: str | None = None,
    subject: dict[str, object] | None = None,
    artifact_type: str | None = None,
    annotations: dict[str, str] | None = None,
) -> bytes:
    docker = media_type == DOCKER_MANIFEST
    doc: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": descriptor(config_type or (DOCKER_CONFIG if docker else OCI_CONFIG), config),
        "layers": [descriptor(DOCKER_LAYER if docker else OCI_LAYER, layer) for layer in layers],
    }
    if subject is not None:
        doc["subject"] = subject
    if artifact_type is not None:
        doc["artifactType"] = artifact_type
    if annotations is not None:
        doc["annotations"] = annotations
    return dumps(doc)


def index_manifest(
    children: list[tuple[str, bytes]], *, media_type: str = OCI_INDEX, **extra: object
) -> bytes:
    """An index (OCI) or manifest list (Docker) over ``(media type, manifest body)`` pairs."""
    manifests = [
        descriptor(child_type, body, platform={"architecture": arch, "os": "linux"})
        for (child_type, body), arch in zip(children, ("amd64", "arm64", "s390x"), strict=False)
    ]
    return dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests, **extra})


def random_blob(size: int = 256) -> bytes:
    return os.urandom(size)


def config_blob() -> bytes:
    # Unique per call, so each image has its own config digest.
    return dumps({"architecture": "amd64", "os": "linux", "nonce": os.urandom(8).hex()})


def absolute(http: httpx.AsyncClient, path: str) -> str:
    """``path`` as the registry's absolute ``Location`` for this client names it."""
    return str(http.base_url.join(path))


async def push_blob(http: httpx.AsyncClient, name: str, data: bytes, algorithm: str = "sha256"):
    """Monolithic upload; returns the digest."""
    digest = digest_of(data, algorithm)
    response = await http.post(
        f"/v2/{name}/blobs/uploads/", params={"digest": digest}, content=data
    )
    assert response.status_code == 201, response.text
    assert response.headers["Docker-Content-Digest"] == digest
    return digest


async def push_manifest(
    http: httpx.AsyncClient, name: str, reference: str, body: bytes, media_type: str
) -> httpx.Response:
    response = await http.put(
        f"/v2/{name}/manifests/{reference}", content=body, headers={"Content-Type": media_type}
    )
    assert response.status_code == 201, response.text
    assert response.headers["Docker-Content-Digest"] == digest_of(body)
    return response


async def push_image(
    http: httpx.AsyncClient,
    name: str,
    reference: str | None = None,
    *,
    media_type: str = OCI_MANIFEST,
    **manifest_options: object,
) -> bytes:
    """Push a config, one layer and a manifest (tagged ``reference`` or by digest)."""
    config, layer = config_blob(), random_blob()
    await push_blob(http, name, config)
    await push_blob(http, name, layer)
    body = image_manifest(config, [layer], media_type=media_type, **manifest_options)
    await push_manifest(http, name, reference or digest_of(body), body, media_type)
    return body


def assert_oci_error(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    """The response is the OCI error body with ``code`` first, at ``status``; the entry."""
    assert response.status_code != 500, response.text
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers.get("X-Request-Id")
    body = response.json()
    assert set(body) == {"errors"}
    assert isinstance(body["errors"], list) and body["errors"]
    entry = body["errors"][0]
    assert entry["code"] == code, body
    assert isinstance(entry["message"], str) and entry["message"]
    assert set(entry) <= {"code", "message", "detail"}
    return entry


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> content); directories as ``b'<dir>'``."""
    if not directory.exists():
        return {}
    out = {}
    for path in sorted(directory.rglob("*")):
        relative = str(path.relative_to(directory))
        out[relative] = b"<dir>" if path.is_dir() else path.read_bytes()
    return out
