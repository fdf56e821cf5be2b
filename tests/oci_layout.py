"""Write a small multi-layer OCI image layout (the ``oci:`` transport of skopeo)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["OCILayout", "layout_blob", "read_layout", "write_layout"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar of ``files``, with fixed metadata so it is reproducible."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": _sha256(data), "size": len(data)}


@dataclass(frozen=True)
class OCILayout:
    path: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layer_digests: tuple[str, ...]


def _write_blob(root: Path, data: bytes) -> str:
    digest = _sha256(data)
    path = root / "blobs" / "sha256" / digest.removeprefix("sha256:")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def write_layout(
    root: Path, layers: list[dict[str, bytes]], tag: str = "latest", architecture: str = "amd64"
) -> OCILayout:
    """Write an image (linux/``architecture``) with one gzip tar layer per entry of ``layers``
    (file name -> bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    tars = [_tar(files) for files in layers]
    blobs = [gzip.compress(tar, mtime=0) for tar in tars]
    config = json.dumps(
        {
            "architecture": architecture,
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [_sha256(tar) for tar in tars]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _descriptor(OCI_CONFIG, config),
            "layers": [_descriptor(OCI_LAYER_GZIP, blob) for blob in blobs],
        }
    ).encode()
    for data in (config, *blobs, manifest):
        _write_blob(root, data)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{**_descriptor(OCI_MANIFEST, manifest), "annotations": {REF_NAME: tag}}],
    }
    (root / "index.json").write_text(json.dumps(index))
    return OCILayout(
        root, tag, _sha256(manifest), _sha256(config), tuple(_sha256(b) for b in blobs)
    )


def layout_blob(root: Path, digest: str) -> bytes:
    """The bytes of a blob in a layout, checked against its digest."""
    data = (root / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
    if _sha256(data) != digest:
        raise ValueError(f"layout blob {digest} has digest {_sha256(data)}")
    return data


def read_layout(root: Path, tag: str = "latest") -> OCILayout:
    """Find ``tag`` in a layout's index.json and return what its manifest names."""
    index = json.loads((root / "index.json").read_text())
    matches = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == tag]
    if len(matches) != 1:
        raise LookupError(f"{len(matches)} manifests tagged {tag!r} in {root}")
    manifest_digest = matches[0]["digest"]
    manifest = json.loads(layout_blob(root, manifest_digest))
    return OCILayout(
        root,
        tag,
        manifest_digest,
        manifest["config"]["digest"],
        tuple(layer["digest"] for layer in manifest["layers"]),
    )
