"""The OCI Distribution grammar: repository names, tags, digests and media types.

Everything that reaches the filesystem passes through these parsers first, so the grammar is
also the path-traversal defence: a name component can never be ``..``, start with ``_``
(our metadata directories) or contain anything but ``[a-z0-9._-]``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import orjson

__all__ = [
    "DIGEST_ALGORITHMS",
    "MANIFEST_MEDIA_TYPES",
    "Digest",
    "InvalidDigest",
    "InvalidName",
    "InvalidTag",
    "parse_digest",
    "validate_name",
    "validate_tag",
]

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
# Docker distribution's limit; a name also becomes a path, so it must stay short.
MAX_NAME_LENGTH = 255

DIGEST_ALGORITHMS = {"sha256": 64, "sha512": 128}
_ENCODED = re.compile(r"[a-f0-9]+")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST})
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
# Descriptor sizes are int64 in the OCI spec (and in the Go clients that read them back).
MAX_DESCRIPTOR_SIZE = 2**63 - 1


class InvalidName(ValueError):
    pass


class InvalidTag(ValueError):
    pass


class InvalidDigest(ValueError):
    pass


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid repository name, else raise :class:`InvalidName`."""
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"repository name is longer than {MAX_NAME_LENGTH} characters")
    if not _NAME.fullmatch(name):
        raise InvalidName(
            f"invalid repository name {name!r}: use lower-case components of [a-z0-9._-] "
            "separated by '/'"
        )
    return name


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it matches the OCI tag grammar, else raise :class:`InvalidTag`."""
    if not _TAG.fullmatch(tag):
        raise InvalidTag(f"invalid tag {tag!r}: at most 128 characters of [A-Za-z0-9._-]")
    return tag


@dataclass(frozen=True, order=True)
class Digest:
    """A content digest such as ``sha256:<64 hex>``; only algorithms we can verify exist."""

    algorithm: str
    encoded: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def parse_digest(text: str) -> Digest:
    """Parse ``algorithm:encoded``; raise :class:`InvalidDigest` with a readable reason."""
    algorithm, sep, encoded = text.partition(":")
    if not sep:
        raise InvalidDigest(f"invalid digest {text[:200]!r}: expected 'algorithm:hex'")
    length = DIGEST_ALGORITHMS.get(algorithm)
    if length is None:
        supported = ", ".join(DIGEST_ALGORITHMS)
        raise InvalidDigest(f"unsupported digest algorithm {algorithm[:50]!r} (use {supported})")
    if len(encoded) != length or not _ENCODED.fullmatch(encoded):
        raise InvalidDigest(
            f"invalid {algorithm} digest: expected {length} lower-case hex characters"
        )
    return Digest(algorithm, encoded)


def is_digest_reference(reference: str) -> bool:
    """Whether a manifest reference is meant as a digest rather than a tag (tags have no ':')."""
    return ":" in reference


class InvalidManifest(ValueError):
    """The body is not a manifest of the type it claims to be."""


class UnsupportedMediaType(ValueError):
    """A manifest media type this registry does not store (e.g. Docker schema 1)."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None
    # Foreign (non-distributable) layers live elsewhere; the registry need not hold them.
    has_urls: bool = False

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True)
class Manifest:
    """What the registry needs to know about a manifest: its type, what it points at."""

    media_type: str
    # Blobs (config and layers) that must exist in the repository.
    blobs: tuple[Descriptor, ...]
    # Child manifests of an index that must exist in the repository.
    manifests: tuple[Descriptor, ...]
    subject: Descriptor | None
    artifact_type: str | None
    annotations: dict[str, str] | None

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES


def _descriptor(value: object, where: str, strict: bool) -> Descriptor:
    if not isinstance(value, dict):
        raise InvalidManifest(f"{where} must be a descriptor object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise InvalidManifest(f"{where}.mediaType must be a non-empty string")
    if not isinstance(digest, str):
        raise InvalidManifest(f"{where}.digest must be a string")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidManifest(f"{where}.size must be a non-negative integer")
    if strict and size > MAX_DESCRIPTOR_SIZE:
        raise InvalidManifest(f"{where}.size is larger than an int64 ({MAX_DESCRIPTOR_SIZE})")
    try:
        parsed = parse_digest(digest)
    except InvalidDigest as exc:
        raise InvalidManifest(f"{where}.digest: {exc}") from None
    return Descriptor(
        media_type,
        parsed,
        size,
        _artifact_type(value, f"{where}.", strict),
        _annotations(value, f"{where}.", strict),
        bool(value.get("urls")),
    )


def _artifact_type(doc: dict[str, object], where: str, strict: bool) -> str | None:
    value = doc.get("artifactType")
    if strict and value is not None and not isinstance(value, str):
        raise InvalidManifest(f"{where}artifactType must be a string")
    return value if isinstance(value, str) else None


def _annotations(doc: dict[str, object], where: str, strict: bool) -> dict[str, str] | None:
    value = doc.get("annotations")
    strings = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    if strict and value is not None and not strings:
        raise InvalidManifest(f"{where}annotations must be an object of strings")
    return value if isinstance(value, dict) else None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise InvalidManifest(
                f"manifest has the key {key[:100]!r} more than once in one object "
                "(which one counts would depend on the reader)"
            )
        seen.add(key)
    return dict(pairs)


def _load_strictly(body: bytes) -> object:
    """The JSON of a pushed manifest, held to I-JSON (RFC 7493).

    What plain JSON parsers let through (NaN, numbers beyond a double, lone surrogates,
    duplicate keys) is read differently by different clients, or fails later on: a manifest
    is refused for it before anything is stored.
    """
    try:
        # orjson refuses invalid UTF-8 (encoded surrogates included), lone surrogate
        # escapes, NaN and Infinity, numbers that overflow a double and nesting deeper than
        # 1024, in C, before the standard parser recurses or converts a 100,000-digit int.
        orjson.loads(body)
        # The standard parser sees duplicate keys, which orjson silently resolves.
        return json.loads(body, object_pairs_hook=_unique_keys)
    except InvalidManifest:
        raise
    except ValueError as exc:
        raise InvalidManifest(f"manifest is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidManifest("manifest is nested too deeply") from None


def parse_manifest(body: bytes, content_type: str | None, *, strict: bool = False) -> Manifest:
    """Parse and check a manifest body against the media type it is pushed with.

    The media type comes from ``Content-Type``; when a client omits it, from the body's own
    ``mediaType`` field; failing both, from the shape (``manifests`` means an index).

    ``strict`` is for a manifest being pushed: strict JSON, and every field the registry
    passes on (sizes, annotations, artifact types) of the type the spec gives it. Stored
    manifests are read as they were accepted: garbage collection must keep following the
    references of one stored before a rule was added.
    """
    if strict:
        doc = _load_strictly(body)
    else:
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidManifest(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidManifest("manifest must be a JSON object")
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise InvalidManifest("mediaType must be a string")
    media_type = (content_type or "").split(";")[0].strip() or declared
    if not media_type:
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if media_type not in MANIFEST_MEDIA_TYPES:
        raise UnsupportedMediaType(
            f"manifest media type {media_type[:100]!r} is not supported; push one of "
            + ", ".join(sorted(MANIFEST_MEDIA_TYPES))
        )
    if declared is not None and declared != media_type:
        raise InvalidManifest(
            f"mediaType {declared[:100]!r} in the body does not match Content-Type "
            f"{media_type[:100]!r}"
        )
    version = doc.get("schemaVersion")
    if version != 2 or (strict and type(version) is not int):
        raise InvalidManifest("schemaVersion must be 2")

    blobs: list[Descriptor] = []
    children: list[Descriptor] = []
    if media_type in INDEX_MEDIA_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise InvalidManifest("an index needs a 'manifests' list")
        children = [_descriptor(d, f"manifests[{i}]", strict) for i, d in enumerate(entries)]
    else:
        blobs.append(_descriptor(doc.get("config"), "config", strict))
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise InvalidManifest("an image manifest needs a 'layers' list")
        blobs.extend(_descriptor(d, f"layers[{i}]", strict) for i, d in enumerate(layers))

    subject = doc.get("subject")
    return Manifest(
        media_type=media_type,
        blobs=tuple(blobs),
        manifests=tuple(children),
        subject=_descriptor(subject, "subject", strict) if subject is not None else None,
        artifact_type=_artifact_type(doc, "", strict),
        annotations=_annotations(doc, "", strict),
    )


def referrer_descriptor(manifest: Manifest, digest: Digest, size: int) -> Descriptor:
    """The descriptor a referrers listing shows for ``manifest``.

    ``artifactType`` falls back to the config media type when empty or missing, as the OCI
    spec asks, so that artifacts pushed before ``artifactType`` existed still filter correctly.
    """
    artifact_type = manifest.artifact_type or None
    if artifact_type is None and not manifest.is_index and manifest.blobs:
        artifact_type = manifest.blobs[0].media_type
    return Descriptor(manifest.media_type, digest, size, artifact_type, manifest.annotations)
