"""A minimal async OCI Distribution client: push and pull images over plain HTTP.

It exists for load generation (the ``bench/`` scripts import it as ``registry_client``) and
the tests (as ``bench.registry_client``); it is not part of the shipped package. It works
against any OCI registry (ours, distribution, zot). It is deliberately small: one-request blob
uploads (falling back to POST + PUT where a registry opens a session instead), a HEAD check to
skip blobs already present, and manifest put/get. Real clients (skopeo, oras) are tested
separately.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import httpx

from registry_trio.oci import OCI_MANIFEST

__all__ = ["Blob", "Image", "RegistryClient", "make_image", "session_url"]

EMPTY_CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"


def session_url(location: str, **params: str) -> httpx.URL:
    """An upload session's ``Location`` (relative or absolute) with ``params`` added.

    The session URL may carry state of its own (distribution's ``_state``, which changes with
    every chunk): it is kept, where httpx's ``params=`` would replace the whole query.
    """
    url = httpx.URL(location)
    for name, value in params.items():
        url = url.copy_add_param(name, value)
    return url


@dataclass(frozen=True)
class Blob:
    data: bytes
    media_type: str = LAYER_TYPE

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}


@dataclass(frozen=True)
class Image:
    config: Blob
    layers: tuple[Blob, ...]
    subject: dict[str, object] | None = None
    artifact_type: str | None = None

    @property
    def manifest(self) -> bytes:
        doc: dict[str, object] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.config.descriptor(),
            "layers": [layer.descriptor() for layer in self.layers],
        }
        if self.artifact_type:
            doc["artifactType"] = self.artifact_type
        if self.subject:
            doc["subject"] = self.subject
        return json.dumps(doc, sort_keys=True).encode()

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()


def make_image(layer_sizes: tuple[int, ...] = (4096,), seed: bytes | None = None) -> Image:
    """A unique image: random layers of the given sizes and a config naming them."""
    seed = seed or os.urandom(16)
    layers = tuple(Blob(seed + os.urandom(max(size - len(seed), 0))) for size in layer_sizes)
    config = Blob(
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
            }
        ).encode(),
        EMPTY_CONFIG_TYPE,
    )
    return Image(config, layers)


class RegistryClient:
    """Push and pull over one pooled ``httpx.AsyncClient``; raises on any non-2xx."""

    def __init__(self, base_url: str, *, client: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = client or httpx.AsyncClient(base_url=self.base_url, timeout=60)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def push_blob(self, repository: str, blob: Blob) -> httpx.Response | None:
        """Upload ``blob`` unless the repository already has it.

        Tries the one-request upload (``POST ?digest=`` with the body). A registry that does
        not support it answers 202 with a session instead, as the spec allows (Docker
        distribution 2.8 does), and the body then goes in a ``PUT`` to that session.
        """
        head = await self.http.head(f"/v2/{repository}/blobs/{blob.digest}")
        if head.status_code == 200:
            return None
        headers = {"Content-Type": "application/octet-stream"}
        response = await self.http.post(
            f"/v2/{repository}/blobs/uploads/",
            params={"digest": blob.digest},
            content=blob.data,
            headers=headers,
        )
        if response.status_code == 202:
            response = await self.http.put(
                session_url(response.headers["Location"], digest=blob.digest),
                content=blob.data,
                headers=headers,
            )
        response.raise_for_status()
        return response

    async def push_manifest(self, repository: str, reference: str, image: Image) -> httpx.Response:
        response = await self.http.put(
            f"/v2/{repository}/manifests/{reference}",
            content=image.manifest,
            headers={"Content-Type": OCI_MANIFEST},
        )
        response.raise_for_status()
        return response

    async def push_image(self, repository: str, tag: str, image: Image) -> httpx.Response:
        """Push blobs then the manifest; returns the manifest PUT's response."""
        for blob in (image.config, *image.layers):
            await self.push_blob(repository, blob)
        return await self.push_manifest(repository, tag, image)

    async def pull_image(self, repository: str, reference: str) -> bytes:
        """Fetch a manifest and every blob it names, checking each digest; the manifest."""
        response = await self.http.get(
            f"/v2/{repository}/manifests/{reference}", headers={"Accept": OCI_MANIFEST}
        )
        response.raise_for_status()
        manifest = json.loads(response.content)
        for descriptor in (manifest["config"], *manifest["layers"]):
            blob = await self.http.get(f"/v2/{repository}/blobs/{descriptor['digest']}")
            blob.raise_for_status()
            actual = "sha256:" + hashlib.sha256(blob.content).hexdigest()
            if actual != descriptor["digest"]:
                raise ValueError(f"blob {descriptor['digest']} came back as {actual}")
        return response.content
