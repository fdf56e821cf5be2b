"""Where everything lives under a store's root: the one place that knows the on-disk layout.

Close to distribution's, so operators recognise it::

    blobs/<alg>/<hex[:2]>/<hex>                          content, shared by all repositories
    repositories/<name>/_layers/<alg>/<hex>              the repository holds this blob
    repositories/<name>/_manifests/revisions/<alg>/<hex> holds this manifest (file: media type)
    repositories/<name>/_manifests/tags/<tag>            tag -> digest (file: the digest)
    repositories/<name>/_referrers/<alg>/<subject hex>/<alg>-<hex>.json   referrer descriptor
    uploads/<id>                                         upload session data (survives restarts;
                                                         purged once idle, see purge_uploads)
    tmp/                                                 staging for atomic writes
    locks/repository-<xx>                                a stripe of the repository locks
                                                         (see :mod:`.locks`), 00 to ff

The store (:mod:`.filesystem`) writes it and garbage collection (:mod:`.gc`) reads and prunes
it; both ask :class:`Layout` for paths. Nothing here touches the disk except
:meth:`Layout.repository_names`, which walks it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..oci import Digest

__all__ = ["REPOSITORY_LOCK_STRIPES", "Layout"]

# How many files the repository locks are spread over: unrelated repositories rarely share
# one (and then only take turns), and the files a store holds stay few whatever it serves.
REPOSITORY_LOCK_STRIPES = 256


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def repositories(self) -> Path:
        return self.root / "repositories"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def locks(self) -> Path:
        """Outside ``repositories/``: listing and garbage collection never walk it."""
        return self.root / "locks"

    def repository_lock_stripe(self, name: str) -> int:
        """Which of the :data:`REPOSITORY_LOCK_STRIPES` stripes holds ``name``'s lock.

        A hash every process computes alike (Python's own ``hash`` of a str is salted per
        process, so it would not do).
        """
        digest = hashlib.sha256(name.encode()).digest()
        return int.from_bytes(digest[:4], "big") % REPOSITORY_LOCK_STRIPES

    def repository_lock(self, stripe: int) -> Path:
        return self.locks / f"repository-{stripe:02x}"

    def blob(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.encoded[:2] / digest.encoded

    def repository(self, name: str) -> Path:
        # ``name`` has passed oci.validate_name: no '..', no leading '_' or '/'.
        return self.repositories / name

    def layers(self, name: str) -> Path:
        """The directory of ``name``'s blob links, ``<alg>/<hex>`` under it."""
        return self.repository(name) / "_layers"

    def layer_link(self, name: str, digest: Digest) -> Path:
        return self.layers(name) / digest.algorithm / digest.encoded

    def manifests(self, name: str) -> Path:
        """``name``'s manifest directory; the repository exists once it does."""
        return self.repository(name) / "_manifests"

    def revisions(self, name: str) -> Path:
        """The directory of ``name``'s manifest links, ``<alg>/<hex>`` under it."""
        return self.manifests(name) / "revisions"

    def revision_link(self, name: str, digest: Digest) -> Path:
        return self.revisions(name) / digest.algorithm / digest.encoded

    def tags(self, name: str) -> Path:
        return self.manifests(name) / "tags"

    def tag(self, name: str, tag: str) -> Path:
        return self.tags(name) / tag

    def referrers(self, name: str) -> Path:
        """The directory of ``name``'s referrer entries, ``<alg>/<subject hex>/`` under it."""
        return self.repository(name) / "_referrers"

    def referrers_of(self, name: str, subject: Digest) -> Path:
        return self.referrers(name) / subject.algorithm / subject.encoded

    def referrer_entry(self, name: str, subject: Digest, referrer: Digest) -> Path:
        return self.referrers_of(name, subject) / f"{referrer.algorithm}-{referrer.encoded}.json"

    def upload(self, upload_id: str) -> Path:
        return self.uploads / upload_id

    def repository_names(self) -> Iterator[str]:
        """Every repository on disk: one with manifests, or with blob links only (its blobs
        were pushed, its first manifest not yet)."""
        yield from self._walk(self.repositories, "")

    def _walk(self, directory: Path, prefix: str) -> Iterator[str]:
        for child in directory.iterdir():
            # '_' starts a repository's own directories, never a name component.
            if not child.is_dir() or child.name.startswith("_"):
                continue
            name = f"{prefix}{child.name}"
            if self.manifests(name).is_dir() or self.layers(name).is_dir():
                yield name
            yield from self._walk(child, f"{name}/")
