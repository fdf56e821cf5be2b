"""Garbage collection: untagged manifests and unreferenced blobs older than a delay.

Pure storage logic, synchronous and blocking like the rest of this package; it knows nothing
of events or HTTP. It works on the on-disk layout of :mod:`registry_trio.storage.layout`,
through the store's :attr:`~registry_trio.storage.FilesystemStorage.layout`.

Deletions happen in batches of at most :data:`BATCH`, and each batch is handed to the
caller's ``before_delete`` before any of it is deleted; :mod:`registry_trio.maintenance`
commits the batch's events there. So a deletion is never left without its event, whenever
the process dies: a crash after the commit but before the deletion leaves an event for content
still present, which the next run deletes and reports again. Each deletion carries the
mtime of the link it removes (``linked_at``), so the caller can give the repeated report the
same identity as the first (a re-push rewrites the link: a later deletion of the same digest
is another one).

The rules, per run, with ``cutoff = now - delay`` ("old" means an mtime at or before it):

1. **Manifests, per repository.** The roots are the manifests tags point at and every
   revision younger than the delay (a push in progress, or one that has not been tagged
   yet). Kept is everything reachable from a root through index children and through
   referrers whose subject is kept (recursively: a referrer of a referrer of a tagged
   manifest is kept). Every other revision is old and is deleted: its referrer entry, then its
   revision link, then its ``_layers`` self-link (unless that link is young). Manifests are
   deleted parents first (an index before its children), so a crash part-way never leaves a
   manifest that points at a deleted one; the batches keep that order.
2. **Blobs, across repositories, after every manifest deletion is on disk.** A blob file is
   kept when any remaining manifest in any repository names it (config, layer, index child,
   or the manifest itself), when the file is young, or when any ``_layers`` link to it is
   young (blobs are pushed before the manifest that names them). Otherwise its ``_layers``
   links are removed from every repository, and then the file. Links go first: a link without
   its file would let a manifest push succeed against missing content, a file without links
   is only garbage for the next run.
3. **Never touched:** upload sessions (their bytes live under ``uploads/`` until the upload
   finishes; idle ones are purged apart, see ``FilesystemStorage.purge_uploads``), ``tmp/``,
   and files whose names are not digests.

Running against a live registry: each batch is re-checked just before it is announced and
deleted (a tag that appeared, a revision or link that was re-written, a manifest pushed since
the scan), and the rest of a repository whose state changed under the run is left for the
next one. That narrows, but cannot close, the window in which a client that found old
unreferenced content a moment ago races the collector; the delay is what makes that window
irrelevant in practice, as in zot.

Deletions are fsync'd (their directories) at each phase boundary, so the order above holds
across a power loss, not only across a process crash.

One module, though long: the two phases share the scan, the batch re-check and the crash
ordering above, which are easiest to check when read in one place.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ..oci import (
    Digest,
    InvalidDigest,
    InvalidManifest,
    UnsupportedMediaType,
    parse_digest,
    parse_manifest,
)
from .filesystem import FilesystemStorage, fsync_dir
from .layout import Layout

__all__ = ["BATCH", "BeforeDelete", "DeletedBlob", "DeletedManifest", "GCReport", "collect"]

log = logging.getLogger("registry_trio.storage.gc")

_T = TypeVar("_T")

# Deletions announced together, then deleted: one commit of events per batch. Small enough
# that a crash repeats little, large enough that the commits cost little beside the unlinks.
BATCH = 100


@dataclass(frozen=True)
class DeletedManifest:
    repository: str
    digest: Digest
    media_type: str
    # mtime of the revision link removed.
    linked_at: float


@dataclass(frozen=True)
class DeletedBlob:
    digest: Digest
    size: int
    # Repositories whose ``_layers`` linked the blob when the blob phase began (sorted). Empty
    # when it was linked nowhere any more: unlinked by ``DELETE /v2/<name>/blobs/<digest>``,
    # or the body of a manifest whose self-link went with the manifest in the first phase.
    repositories: tuple[str, ...]
    # mtime of each of those links, in the same order.
    linked_at: tuple[float, ...]


# Called on the collecting thread with each batch before any of it is deleted; when it
# raises, the batch and everything after it stays, and the exception ends the run.
BeforeDelete = Callable[[Sequence[DeletedManifest | DeletedBlob]], None]


def _batches(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]


@dataclass
class GCReport:
    """What a run deleted or, with ``dry_run``, would delete."""

    dry_run: bool
    manifests: list[DeletedManifest] = field(default_factory=list)
    blobs: list[DeletedBlob] = field(default_factory=list)
    # Repositories whose manifests were left alone because they changed during the run.
    skipped_repositories: list[str] = field(default_factory=list)
    # What the delay kept: manifests and blob files a run with no delay would have deleted
    # too (untagged but young, or kept only by such a manifest; unreferenced but young).
    held_back_manifests: int = 0
    held_back_blobs: int = 0

    @property
    def bytes_freed(self) -> int:
        return sum(b.size for b in self.blobs)

    def to_json(self) -> dict[str, object]:
        return {
            "dryRun": self.dry_run,
            "manifests": [
                {"repository": m.repository, "digest": str(m.digest), "mediaType": m.media_type}
                for m in self.manifests
            ],
            "blobs": [
                {"digest": str(b.digest), "size": b.size, "repositories": list(b.repositories)}
                for b in self.blobs
            ],
            "bytesFreed": self.bytes_freed,
            "skippedRepositories": self.skipped_repositories,
            "heldBack": {"manifests": self.held_back_manifests, "blobs": self.held_back_blobs},
        }


# -- scanning ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Refs:
    """What a manifest names: blobs (config and layers), child manifests, its subject."""

    blobs: frozenset[Digest] = frozenset()
    children: frozenset[Digest] = frozenset()
    subject: Digest | None = None


_NO_REFS = _Refs()


@dataclass
class _Repository:
    name: str
    tags: dict[str, Digest] = field(default_factory=dict)
    # digest -> (mtime, media type) of each revision link
    revisions: dict[Digest, tuple[float, str]] = field(default_factory=dict)
    # digest -> mtime of each _layers link
    links: dict[Digest, float] = field(default_factory=dict)


def _digest_files(directory: Path) -> Iterator[tuple[Digest, Path]]:
    """``<directory>/<alg>/<hex>`` files whose names form a digest we know."""
    if not directory.is_dir():
        return
    for alg_dir in directory.iterdir():
        if not alg_dir.is_dir():
            continue
        for entry in alg_dir.iterdir():
            try:
                yield parse_digest(f"{alg_dir.name}:{entry.name}"), entry
            except InvalidDigest:
                continue


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _read_tags(layout: Layout, name: str) -> dict[str, Digest]:
    tags: dict[str, Digest] = {}
    tags_dir = layout.tags(name)
    if not tags_dir.is_dir():
        return tags
    for entry in tags_dir.iterdir():
        with contextlib.suppress(FileNotFoundError, InvalidDigest, UnicodeDecodeError):
            tags[entry.name] = parse_digest(entry.read_text(encoding="ascii").strip())
    return tags


def _scan_repository(layout: Layout, name: str) -> _Repository:
    repo = _Repository(name, tags=_read_tags(layout, name))
    for digest, link in _digest_files(layout.revisions(name)):
        try:
            mtime = link.stat().st_mtime
            media_type = link.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, UnicodeDecodeError):
            continue
        repo.revisions[digest] = (mtime, media_type)
    for digest, link in _digest_files(layout.layers(name)):
        if (linked_at := _mtime(link)) is not None:
            repo.links[digest] = linked_at
    return repo


def _scan(layout: Layout) -> list[_Repository]:
    return [_scan_repository(layout, name) for name in sorted(layout.repository_names())]


class _Manifests:
    """Parsed references of manifest bodies, by digest (a body is the same in every repo)."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._cache: dict[Digest, _Refs] = {}

    def refs(self, digest: Digest, media_type: str) -> _Refs:
        refs = self._cache.get(digest)
        if refs is None:
            refs = self._cache[digest] = self._parse(digest, media_type)
        return refs

    def _parse(self, digest: Digest, media_type: str) -> _Refs:
        try:
            body = self._layout.blob(digest).read_bytes()
            manifest = parse_manifest(body, media_type)
        except (FileNotFoundError, InvalidManifest, UnsupportedMediaType) as exc:
            # Nothing to follow; the revision itself is still judged by tags and age.
            log.warning("gc: cannot read manifest %s: %s", digest, exc)
            return _NO_REFS
        return _Refs(
            blobs=frozenset(b.digest for b in manifest.blobs),
            children=frozenset(c.digest for c in manifest.manifests),
            subject=manifest.subject.digest if manifest.subject else None,
        )


# -- phase 1: manifests ------------------------------------------------------------------


def _unreachable(repo: _Repository, manifests: _Manifests, cutoff: float) -> list[Digest]:
    """Revisions of ``repo`` to delete, ordered parents first."""
    refs = {d: manifests.refs(d, media_type) for d, (_, media_type) in repo.revisions.items()}
    referrers: dict[Digest, list[Digest]] = {}
    for digest, r in refs.items():
        if r.subject is not None:
            referrers.setdefault(r.subject, []).append(digest)

    roots = {d for d in repo.tags.values() if d in refs}
    roots.update(d for d, (mtime, _) in repo.revisions.items() if mtime > cutoff)
    kept = set(roots)
    todo = list(roots)
    while todo:
        digest = todo.pop()
        for nxt in (*refs[digest].children, *referrers.get(digest, ())):
            if nxt in refs and nxt not in kept:
                kept.add(nxt)
                todo.append(nxt)

    doomed = set(refs) - kept
    # Depth-first post-order puts children before parents; reversed, parents come first.
    order: list[Digest] = []
    seen: set[Digest] = set()

    def visit(digest: Digest) -> None:
        seen.add(digest)
        for child in sorted(refs[digest].children):
            if child in doomed and child not in seen:
                visit(child)
        order.append(digest)

    for digest in sorted(doomed):
        if digest not in seen:
            visit(digest)
    order.reverse()
    return order


def _referrer_entries(layout: Layout, name: str) -> dict[Digest, list[Path]]:
    """Referrer entry files of a repository, by the referrer's digest."""
    entries: dict[Digest, list[Path]] = {}
    for _subject, subject_dir in _digest_files(layout.referrers(name)):
        if not subject_dir.is_dir():
            continue
        for entry in subject_dir.iterdir():
            alg, _, rest = entry.name.partition("-")
            with contextlib.suppress(InvalidDigest):
                digest = parse_digest(f"{alg}:{rest.removesuffix('.json')}")
                entries.setdefault(digest, []).append(entry)
    return entries


def _changed(layout: Layout, repo: _Repository, doomed: list[Digest]) -> bool:
    """Whether ``repo`` moved under us: a doomed revision got tagged or was re-written."""
    tagged = set(_read_tags(layout, repo.name).values())
    for digest in doomed:
        if digest in tagged:
            return True
        if _mtime(layout.revision_link(repo.name, digest)) != repo.revisions[digest][0]:
            return True
    return False


def _unlink(path: Path, touched: set[Path]) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        touched.add(path.parent)


def _sync(touched: set[Path]) -> None:
    for directory in touched:
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(directory)
    touched.clear()


def _delete_manifests(
    layout: Layout,
    repo: _Repository,
    planned: list[DeletedManifest],
    cutoff: float,
    touched: set[Path],
    before_delete: BeforeDelete,
) -> list[DeletedManifest]:
    """Delete ``planned`` (parents first) batch by batch; what was deleted.

    Stops at the first batch in which the repository changed since the scan.
    """
    entries = _referrer_entries(layout, repo.name)
    deleted: list[DeletedManifest] = []
    for batch in _batches(planned):
        if _changed(layout, repo, [m.digest for m in batch]):
            break
        before_delete(batch)
        for manifest in batch:
            # Referrer entry first: a crash after it leaves an unlisted but whole manifest,
            # which the next run deletes; never a listed referrer that does not exist.
            for entry in entries.get(manifest.digest, ()):
                _unlink(entry, touched)
            _unlink(layout.revision_link(repo.name, manifest.digest), touched)
            link_mtime = repo.links.get(manifest.digest)
            if link_mtime is not None and link_mtime <= cutoff:
                _unlink(layout.layer_link(repo.name, manifest.digest), touched)
        deleted.extend(batch)
    return deleted


# -- phase 2: blobs ----------------------------------------------------------------------


def _blob_files(layout: Layout) -> Iterator[tuple[Digest, Path]]:
    """``blobs/<alg>/<hex[:2]>/<hex>`` files whose names form a digest we know."""
    for alg_dir in layout.blobs.iterdir():
        if not alg_dir.is_dir():
            continue
        for prefix_dir in alg_dir.iterdir():
            if not prefix_dir.is_dir():
                continue
            for entry in prefix_dir.iterdir():
                try:
                    digest = parse_digest(f"{alg_dir.name}:{entry.name}")
                except InvalidDigest:
                    continue
                if layout.blob(digest) == entry:
                    yield digest, entry


def _referenced(
    repos: Iterable[_Repository],
    manifests: _Manifests,
    leaving_out: dict[str, set[Digest]] | None = None,
) -> set[Digest]:
    """What the repositories' manifests name (and the manifests themselves), but for the
    revisions ``leaving_out`` lists per repository."""
    referenced: set[Digest] = set()
    for repo in repos:
        left_out = (leaving_out or {}).get(repo.name, set())
        for digest, (_, media_type) in repo.revisions.items():
            if digest in left_out:
                continue
            refs = manifests.refs(digest, media_type)
            referenced.add(digest)
            referenced.update(refs.blobs)
            referenced.update(refs.children)
    return referenced


def _unreferenced_blobs(
    layout: Layout,
    repos: list[_Repository],
    manifests: _Manifests,
    cutoff: float,
    held_back: dict[str, set[Digest]],
) -> tuple[list[tuple[DeletedBlob, Path]], int]:
    """Blob files to delete; and how many more would go but for the delay: referenced only
    by ``held_back`` manifests (per repository), or unreferenced but young."""
    referenced = _referenced(repos, manifests)
    referenced_by_old = _referenced(repos, manifests, leaving_out=held_back)
    linked: dict[Digest, list[tuple[str, float]]] = {}
    for repo in repos:
        for digest, mtime in repo.links.items():
            linked.setdefault(digest, []).append((repo.name, mtime))
    out, young = [], 0
    for digest, path in sorted(_blob_files(layout)):
        if digest in referenced:
            young += digest not in referenced_by_old
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        links = linked.get(digest, [])
        if stat.st_mtime > cutoff or any(mtime > cutoff for _, mtime in links):
            young += 1
            continue
        repositories, linked_at = zip(*sorted(links), strict=True) if links else ((), ())
        out.append((DeletedBlob(digest, stat.st_size, repositories, linked_at), path))
    return out, young


def _links(layout: Layout, blob: DeletedBlob) -> list[Path]:
    return [layout.layer_link(name, blob.digest) for name in blob.repositories]


def _relinked(layout: Layout, blob: DeletedBlob, cutoff: float) -> bool:
    """Whether a link of ``blob`` was re-written since the scan: an upload or mount landed."""
    return any((m := _mtime(link)) is not None and m > cutoff for link in _links(layout, blob))


def _delete_blobs(
    layout: Layout,
    planned: list[tuple[DeletedBlob, Path]],
    cutoff: float,
    touched: set[Path],
    before_delete: BeforeDelete,
) -> list[DeletedBlob]:
    # Links first, each blob re-checked. Announcing a blob announces its links' removal,
    # which is what its events (one per repository) report.
    survivors = []
    for batch in _batches(planned):
        fresh = [(blob, path) for blob, path in batch if not _relinked(layout, blob, cutoff)]
        before_delete([blob for blob, _ in fresh])
        for blob, _ in fresh:
            for link in _links(layout, blob):
                _unlink(link, touched)
        survivors.extend(fresh)
    _sync(touched)

    # A link that appeared anywhere meanwhile (a mount into another repository) keeps the
    # blob; the file must not go from under it.
    relinked = {
        digest
        for name in layout.repository_names()
        for digest, _ in _digest_files(layout.layers(name))
    }
    deleted = []
    for blob, path in survivors:
        if blob.digest in relinked:
            continue
        mtime = _mtime(path)
        if mtime is None or mtime > cutoff:
            continue
        _unlink(path, touched)
        deleted.append(blob)
    _sync(touched)
    return deleted


# -- the run -----------------------------------------------------------------------------


def _announce_nothing(batch: Sequence[DeletedManifest | DeletedBlob]) -> None:
    return None


def collect(
    storage: FilesystemStorage,
    *,
    delay: float,
    now: float | None = None,
    dry_run: bool = False,
    before_delete: BeforeDelete = _announce_nothing,
) -> GCReport:
    """Delete untagged manifests and unreferenced blobs older than ``delay`` seconds.

    ``now`` defaults to the wall clock (mtimes are wall-clock times). With ``dry_run``
    nothing is deleted (nor announced) and the report says what a real run would have
    deleted. ``before_delete`` sees every batch before it is deleted (see the module doc).
    """
    now = time.time() if now is None else now
    cutoff = now - delay
    report = GCReport(dry_run=dry_run)
    layout = storage.layout
    manifests = _Manifests(layout)
    touched: set[Path] = set()

    # Phase 1: manifests, every repository, all on disk before any blob goes.
    removed: dict[str, set[Digest]] = {}
    held_back: dict[str, set[Digest]] = {}  # what only the delay keeps, per repository
    for repo in _scan(layout):
        doomed = _unreachable(repo, manifests, cutoff)
        held_back[repo.name] = set(_unreachable(repo, manifests, now)) - set(doomed)
        report.held_back_manifests += len(held_back[repo.name])
        planned = [
            DeletedManifest(repo.name, d, repo.revisions[d][1], repo.revisions[d][0])
            for d in doomed
        ]
        if dry_run:
            removed[repo.name] = {m.digest for m in planned}
            report.manifests.extend(planned)
            continue
        deleted = _delete_manifests(layout, repo, planned, cutoff, touched, before_delete)
        report.manifests.extend(deleted)
        if len(deleted) < len(planned):
            report.skipped_repositories.append(repo.name)
    _sync(touched)

    # Phase 2: blobs, against a fresh scan, so manifests pushed since phase 1 count.
    repos = _scan(layout)
    if dry_run:
        # What phase 1 would have removed: the revisions and their old self-links.
        for repo in repos:
            for digest in removed.get(repo.name, ()):
                repo.revisions.pop(digest, None)
                link_mtime = repo.links.get(digest)
                if link_mtime is not None and link_mtime <= cutoff:
                    del repo.links[digest]
    planned_blobs, report.held_back_blobs = _unreferenced_blobs(
        layout, repos, manifests, cutoff, held_back
    )
    if dry_run:
        report.blobs = [blob for blob, _ in planned_blobs]
    else:
        report.blobs = _delete_blobs(layout, planned_blobs, cutoff, touched, before_delete)
    return report
