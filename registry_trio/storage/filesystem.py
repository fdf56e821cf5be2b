"""A content-addressed registry store on a local filesystem.

The on-disk layout is :mod:`.layout`'s.

Crash safety rests on one rule: content becomes visible only by ``rename`` of a file that was
written to ``tmp/`` (or as an upload session in ``uploads/``), verified and fsync'd; the parent
directory is fsync'd after the rename. A crash therefore leaves at worst an unreferenced file,
never a partial one under a visible name.

Every method here blocks on the disk. Callers on the event loop run them through
``trio.to_thread`` (see :mod:`registry_trio.api.context`); nothing in this module knows
about Trio, HTTP or events.

One module, though long: blobs, upload sessions and manifests share the one publishing rule
above and its helpers; split, each part would reach into the others' private steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..oci import Descriptor, Digest, Manifest, parse_digest, referrer_descriptor
from .errors import (
    BlobUnknown,
    BlobUploadUnknown,
    DigestMismatch,
    ManifestBlobUnknown,
    ManifestUnknown,
    NameUnknown,
    UploadBusy,
)
from .layout import Layout
from .locks import SessionClaim

__all__ = ["FilesystemStorage", "ManifestRecord", "PutManifestResult", "UploadWriter", "fsync_dir"]

# An upload id is 32 random hex digits followed by 16 naming the repository (a hash of its
# name), so the session is one file, ``uploads/<id>``, whose id alone says which repository it
# belongs to: opening a session reads no bookkeeping file, creating one creates one file.
_UPLOAD_ID = re.compile(r"[0-9a-f]{48}")


# How many sessions' hash states are kept in memory; past that the least recently written
# one's goes, and its digest is computed from the file when it finishes. Bounds what
# abandoned sessions cost in memory (a few hundred bytes each).
HASHER_LIMIT = 4096


def _repository_tag(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def _write_all(fd: int, data: bytes, path: Path) -> None:
    """Write all of ``data`` (os.write may write less); a failure names ``path``."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        # os.write's own error names no file; the operator needs to know which one.
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def fsync_dir(path: Path) -> None:
    """Make the creation, rename or removal of an entry of ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Hashers:
    """sha256 states of upload sessions by id, (bytes covered, state); a bounded cache.

    Shared by the worker threads that write sessions, hence the lock.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._states: OrderedDict[str, tuple[int, hashlib._Hash]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._states)

    def put(self, upload_id: str, covered: int, state: hashlib._Hash) -> None:
        with self._lock:
            self._states[upload_id] = (covered, state)
            self._states.move_to_end(upload_id)
            if len(self._states) > self._limit:
                self._states.popitem(last=False)

    def take(self, upload_id: str) -> tuple[int, hashlib._Hash] | None:
        with self._lock:
            return self._states.pop(upload_id, None)


@dataclass(frozen=True)
class ManifestRecord:
    digest: Digest
    media_type: str
    body: bytes


@dataclass(frozen=True)
class PutManifestResult:
    digest: Digest
    # True when this manifest is the first one the repository ever received.
    created_repository: bool


class UploadWriter:
    """Appends to one upload session, hashing as it goes so the final check is cheap.

    Not thread-safe: its caller holds the session's claim (see
    :meth:`FilesystemStorage.claim_upload`), as everything that changes a session does.
    ``rollback`` truncates to the offset at open, so a chunk that fails half-way (a full disk)
    leaves the session as it was. Writes are unbuffered: a buffered writer would flush, and
    fail, inside the truncate too.
    """

    def __init__(self, storage: FilesystemStorage, upload_id: str | None, data_path: Path) -> None:
        self._storage = storage
        # None for a monolithic upload staged in tmp/: no session, the hash stays here.
        self._upload_id = upload_id
        self.path = data_path
        # A staged file is created here; a session's file must already exist (no O_CREAT: a
        # session finished or cancelled meanwhile is unknown, not silently recreated).
        flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT if upload_id is None else 0)
        try:
            self._fd = os.open(data_path, flags, 0o644)
        except FileNotFoundError:
            raise BlobUploadUnknown(upload_id or str(data_path)) from None
        self.start = os.lseek(self._fd, 0, os.SEEK_END)
        self.offset = self.start
        cached = storage._hashers.take(upload_id) if upload_id else None
        # A hasher is only trusted when it covers exactly the bytes on disk; after a restart
        # (or a rolled-back chunk) the digest is recomputed from the file at the end instead.
        self._hasher = cached[1] if cached and cached[0] == self.start else None
        if self._hasher is None and self.start == 0:
            self._hasher = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        _write_all(self._fd, chunk, self.path)
        self.offset += len(chunk)
        if self._hasher is not None:
            self._hasher.update(chunk)

    def rollback(self) -> None:
        os.ftruncate(self._fd, self.start)
        self.offset = self.start
        self._hasher = None

    def close(self) -> None:
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        if self._hasher is not None and self._upload_id is not None:
            self._storage._hashers.put(self._upload_id, self.offset, self._hasher)

    @property
    def sha256(self) -> tuple[int, hashlib._Hash] | None:
        """(bytes covered, sha256 state) when the hash covers the whole file, else None."""
        return (self.offset, self._hasher) if self._hasher is not None else None


class FilesystemStorage:
    def __init__(self, root: str | os.PathLike[str], *, clean_tmp: bool = True) -> None:
        """Open (creating) the store at ``root``.

        ``clean_tmp=False`` is for a second handle on a root a running server owns (e.g.
        ``registry-trio gc``): its staged files are in use, not crash leftovers.
        """
        self.root = Path(root).resolve()
        self.layout = layout = Layout(self.root)
        for path in (layout.blobs, layout.repositories, layout.uploads, layout.tmp, layout.locks):
            path.mkdir(parents=True, exist_ok=True)
        # Lost on restart by design.
        self._hashers = _Hashers(HASHER_LIMIT)
        # Staged files are never visible; whatever a crash left there is garbage.
        if clean_tmp:
            for leftover in layout.tmp.iterdir():
                leftover.unlink(missing_ok=True)

    # -- atomic writes ---------------------------------------------------------------------

    def _atomic_write(self, path: Path, data: bytes) -> None:
        staged = self.layout.tmp / uuid.uuid4().hex
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                _write_all(fd, data, staged)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._publish(staged, path)
        except BaseException:
            # A full disk (or any failure) must not leave its half-written file behind.
            staged.unlink(missing_ok=True)
            raise

    def _link(self, path: Path) -> None:
        """Create an empty marker file (a link), or refresh the time of an existing one.

        An empty file has no content a crash could tear, so creating it in place is as
        atomic as a rename; the directory fsync makes the creation durable. The time matters:
        garbage collection spares blobs whose links are younger than its delay.
        """
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            os.close(os.open(path, flags, 0o644))
        except FileExistsError:
            os.utime(path)
            return
        except FileNotFoundError:  # the first link in its directory
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
        fsync_dir(path.parent)

    def _publish(self, staged: Path, path: Path) -> None:
        try:
            os.replace(staged, path)
        except FileNotFoundError:  # the first file in its directory (or no staged file)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, path)
        fsync_dir(path.parent)

    # -- blobs -----------------------------------------------------------------------------

    def blob_size(self, name: str, digest: Digest) -> int:
        """Size of a blob the repository holds; :class:`BlobUnknown` otherwise."""
        if not self.layout.layer_link(name, digest).exists():
            raise BlobUnknown(str(digest))
        try:
            return self.layout.blob(digest).stat().st_size
        except FileNotFoundError:
            raise BlobUnknown(str(digest)) from None

    def open_blob(self, name: str, digest: Digest) -> tuple[BinaryIO, int]:
        """Open a blob for reading; the caller closes it."""
        if not self.layout.layer_link(name, digest).exists():
            raise BlobUnknown(str(digest))
        try:
            f = open(self.layout.blob(digest), "rb")  # noqa: SIM115 - caller closes
        except FileNotFoundError:
            raise BlobUnknown(str(digest)) from None
        return f, os.fstat(f.fileno()).st_size

    def delete_blob(self, name: str, digest: Digest) -> None:
        """Unlink a blob from a repository; the content stays until garbage collection."""
        try:
            self.layout.layer_link(name, digest).unlink()
        except FileNotFoundError:
            raise BlobUnknown(str(digest)) from None

    def mount_blob(self, name: str, digest: Digest, source: str | None) -> int | None:
        """Link an existing blob into ``name``; its size, or None when there is none to mount.

        With ``source`` the blob must be held by that repository; without it, any blob
        already stored is mounted (the automatic mount clients rely on).
        """
        if source is not None and not self.layout.layer_link(source, digest).exists():
            return None
        try:
            size = self.layout.blob(digest).stat().st_size
        except FileNotFoundError:
            return None
        self._link(self.layout.layer_link(name, digest))
        return size

    # -- uploads ---------------------------------------------------------------------------

    def create_upload(self, name: str) -> str:
        upload_id = uuid.uuid4().hex + _repository_tag(name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        os.close(os.open(self.layout.upload(upload_id), flags, 0o644))
        return upload_id

    def _session(self, name: str, upload_id: str) -> Path:
        """The data file of ``name``'s session ``upload_id``.

        A session of another repository is unknown here. Existence is checked by the caller's
        open or stat of the data file.
        """
        if not _UPLOAD_ID.fullmatch(upload_id) or upload_id[32:] != _repository_tag(name):
            raise BlobUploadUnknown(upload_id)
        return self.layout.upload(upload_id)

    def claim_upload(self, name: str, upload_id: str) -> SessionClaim:
        """Claim ``name``'s session ``upload_id`` for writing, finishing or cancelling it.

        One claim at a time across every process on this root (see :mod:`.locks`); hold it
        from before the first write until after :meth:`finish_upload`, so that nothing else
        writes, finishes, cancels or purges the session meanwhile. :class:`UploadBusy` when
        it is held already.
        """
        return SessionClaim(self._session(name, upload_id), upload_id)

    def upload_offset(self, name: str, upload_id: str) -> int:
        try:
            return self._session(name, upload_id).stat().st_size
        except FileNotFoundError:
            raise BlobUploadUnknown(upload_id) from None

    def open_upload(self, name: str, upload_id: str) -> UploadWriter:
        return UploadWriter(self, upload_id, self._session(name, upload_id))

    def cancel_upload(self, name: str, upload_id: str) -> None:
        """Remove the session; :class:`UploadBusy` while a request is writing to it."""
        with self.claim_upload(name, upload_id):
            self._hashers.take(upload_id)
            self.layout.upload(upload_id).unlink()

    def finish_upload(self, name: str, upload_id: str, expected: Digest) -> int:
        """Verify the upload against ``expected`` and publish it as a blob of ``name``.

        The caller holds the session's claim. On a digest mismatch the session is discarded:
        its bytes can never become that blob, and keeping them would only leak disk. On
        success the session's file itself becomes the blob (renamed into place), so nothing
        is copied.
        """
        data = self._session(name, upload_id)
        try:
            return self._publish_blob(name, data, expected, self._hashers.take(upload_id))
        except FileNotFoundError:
            raise BlobUploadUnknown(upload_id) from None
        finally:
            data.unlink(missing_ok=True)

    def _last_write(self, upload_id: str) -> float | None:
        """When session ``upload_id`` was last written (its data's mtime); None if no session.

        Entries that are no session (not a file, or not named by a session id) are none of
        the registry's doing and are left alone.
        """
        if not _UPLOAD_ID.fullmatch(upload_id):
            return None
        try:
            info = self.layout.upload(upload_id).stat()
        except FileNotFoundError:
            return None
        return info.st_mtime if stat.S_ISREG(info.st_mode) else None

    def idle_uploads(self, cutoff: float) -> list[str]:
        """Ids of the upload sessions last written at or before ``cutoff`` (wall clock)."""
        return sorted(
            entry.name
            for entry in self.layout.uploads.iterdir()
            if (written := self._last_write(entry.name)) is not None and written <= cutoff
        )

    def purge_uploads(
        self, upload_ids: Sequence[str], cutoff: float, *, dry_run: bool = False
    ) -> list[str]:
        """Remove those of ``upload_ids`` still not written since ``cutoff``; the removed ids.

        Each is claimed first, as a request claims it (:meth:`claim_upload`), in whichever
        process: a session a request holds (a client that stalled mid-body: idle by its file,
        but in use) is skipped, and a request arriving while its session is removed is
        refused, then finds it gone; none writes into a file being removed. With ``dry_run``
        nothing is removed: the ids are those a real run would remove now.
        """
        purged = []
        for upload_id in upload_ids:
            if not _UPLOAD_ID.fullmatch(upload_id):
                continue
            try:
                claim = SessionClaim(self.layout.upload(upload_id), upload_id)
            except (UploadBusy, BlobUploadUnknown):
                continue  # in use, or finished, cancelled or purged meanwhile
            with claim:
                written = self._last_write(upload_id)
                if written is None or written > cutoff:
                    continue  # written to since it was listed
                if not dry_run:
                    self._hashers.take(upload_id)
                    self.layout.upload(upload_id).unlink()
            purged.append(upload_id)
        return purged

    def open_staged_upload(self) -> UploadWriter:
        """A writer for a monolithic upload (``POST ?digest=``): one file in ``tmp/``.

        No session is opened for it (nothing under ``uploads/``), and it is just as safe: the
        file is invisible until :meth:`finish_staged_upload` verifies and renames it.
        """
        return UploadWriter(self, None, self.layout.tmp / uuid.uuid4().hex)

    def finish_staged_upload(self, name: str, writer: UploadWriter, expected: Digest) -> int:
        """Verify and publish a staged upload (the writer must be closed); it is consumed."""
        try:
            return self._publish_blob(name, writer.path, expected, writer.sha256)
        finally:
            writer.path.unlink(missing_ok=True)

    def discard_staged_upload(self, writer: UploadWriter) -> None:
        writer.path.unlink(missing_ok=True)

    def put_blob(self, name: str, data: bytes, expected: Digest) -> int:
        """Verify a whole blob held in memory and publish it as a blob of ``name``; its size.

        The one-call form of a monolithic upload small enough to buffer: nothing touches the
        disk unless the digest matches, and then it is one staged, fsync'd, renamed file.
        """
        hasher = expected.hasher()
        hasher.update(data)
        actual = hasher.hexdigest()
        if actual != expected.encoded:
            raise DigestMismatch(
                f"uploaded content has digest {expected.algorithm}:{actual}, not {expected}"
            )
        target = self.layout.blob(expected)
        if not target.exists():
            self._atomic_write(target, data)
        self._link(self.layout.layer_link(name, expected))
        return len(data)

    def _publish_blob(
        self,
        name: str,
        data: Path,
        expected: Digest,
        cached: tuple[int, hashlib._Hash] | None,
    ) -> int:
        """Check ``data`` against ``expected``, fsync it, rename it into place, link it."""
        fd = os.open(data, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if cached and cached[0] == size and expected.algorithm == "sha256":
                actual = cached[1].hexdigest()
            else:
                hasher = expected.hasher()
                while block := os.read(fd, 1 << 20):
                    hasher.update(block)
                actual = hasher.hexdigest()
            if actual != expected.encoded:
                raise DigestMismatch(
                    f"uploaded content has digest {expected.algorithm}:{actual}, not {expected}"
                )
            os.fsync(fd)
        finally:
            os.close(fd)
        target = self.layout.blob(expected)
        if not target.exists():
            self._publish(data, target)
        self._link(self.layout.layer_link(name, expected))
        return size

    # -- manifests -------------------------------------------------------------------------

    def _has_manifest(self, name: str, digest: Digest) -> bool:
        return self.layout.revision_link(name, digest).exists()

    def put_manifest(
        self,
        name: str,
        body: bytes,
        manifest: Manifest,
        digest: Digest,
        tag: str | None,
    ) -> PutManifestResult:
        """Store a manifest (already parsed and digest-checked) and optionally tag it.

        Order matters for crash safety: content, then revision, then referrer entry, then
        tag. A crash in between leaves an untagged but complete manifest, never a tag that
        points at nothing.
        """
        for blob in manifest.blobs:
            if not blob.has_urls and not self.layout.layer_link(name, blob.digest).exists():
                raise ManifestBlobUnknown(str(blob.digest))
        for child in manifest.manifests:
            if not self._has_manifest(name, child.digest):
                raise ManifestBlobUnknown(str(child.digest))

        manifests_dir = self.layout.manifests(name)
        try:
            manifests_dir.mkdir(parents=True)
            created = True
        except FileExistsError:
            created = False

        target = self.layout.blob(digest)
        if not target.exists():
            self._atomic_write(target, body)
        self._link(self.layout.layer_link(name, digest))
        self._atomic_write(self.layout.revision_link(name, digest), manifest.media_type.encode())
        if manifest.subject is not None:
            entry = referrer_descriptor(manifest, digest, len(body))
            self._atomic_write(
                self.layout.referrer_entry(name, manifest.subject.digest, digest),
                json.dumps(entry.to_json()).encode(),
            )
        if tag is not None:
            self._atomic_write(self.layout.tag(name, tag), str(digest).encode())
        return PutManifestResult(digest, created)

    def resolve_tag(self, name: str, tag: str) -> Digest:
        try:
            return parse_digest(self.layout.tag(name, tag).read_text(encoding="ascii").strip())
        except FileNotFoundError:
            raise ManifestUnknown(f"{name}:{tag}") from None

    def get_manifest(self, name: str, digest: Digest) -> ManifestRecord:
        try:
            media_type = self.layout.revision_link(name, digest).read_text(encoding="utf-8")
            body = self.layout.blob(digest).read_bytes()
        except FileNotFoundError:
            raise ManifestUnknown(str(digest)) from None
        return ManifestRecord(digest, media_type, body)

    def delete_manifest(self, name: str, digest: Digest, subject: Digest | None) -> list[str]:
        """Remove a manifest from ``name`` with every tag that points at it; those tags."""
        revision = self.layout.revision_link(name, digest)
        if not revision.exists():
            raise ManifestUnknown(str(digest))
        removed = []
        for tag in self.list_tags(name):
            tag_path = self.layout.tag(name, tag)
            with contextlib.suppress(FileNotFoundError):
                if tag_path.read_text(encoding="ascii").strip() == str(digest):
                    tag_path.unlink()
                    removed.append(tag)
        if subject is not None:
            self.layout.referrer_entry(name, subject, digest).unlink(missing_ok=True)
        revision.unlink()
        self.layout.layer_link(name, digest).unlink(missing_ok=True)
        return removed

    def delete_tag(self, name: str, tag: str) -> Digest:
        digest = self.resolve_tag(name, tag)
        try:
            self.layout.tag(name, tag).unlink()
        except FileNotFoundError:
            raise ManifestUnknown(f"{name}:{tag}") from None
        return digest

    def list_tags(self, name: str) -> list[str]:
        if not self.layout.manifests(name).is_dir():
            raise NameUnknown(name)
        tags = self.layout.tags(name)
        return sorted(p.name for p in tags.iterdir()) if tags.is_dir() else []

    def referrers(self, name: str, subject: Digest) -> list[Descriptor]:
        directory = self.layout.referrers_of(name, subject)
        if not directory.is_dir():
            return []
        out = []
        for entry in sorted(directory.iterdir()):
            doc = json.loads(entry.read_bytes())
            out.append(
                Descriptor(
                    doc["mediaType"],
                    parse_digest(doc["digest"]),
                    doc["size"],
                    doc.get("artifactType"),
                    doc.get("annotations"),
                )
            )
        return out

    def list_repositories(self) -> list[str]:
        """Repositories with a manifest (one that was only pushed blobs is not listed yet)."""
        layout = self.layout
        return sorted(n for n in layout.repository_names() if layout.manifests(n).is_dir())
