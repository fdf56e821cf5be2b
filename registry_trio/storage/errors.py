"""What storage can refuse. Storage knows nothing of HTTP; the API maps these to OCI codes."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

# A write failed for want of room (no space, or no quota left), not because of the request.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class StorageError(Exception):
    """Base of every refusal storage reports (not of I/O failures, which stay OSError)."""


class NameUnknown(StorageError):
    pass


class BlobUnknown(StorageError):
    pass


class BlobUploadUnknown(StorageError):
    pass


class UploadBusy(StorageError):
    """Another request (in any process on the storage root) or the purger holds the session."""

    def __init__(self) -> None:
        super().__init__(
            "another request is using this upload session right now (or it is being purged); "
            "retry once that request is done"
        )


class DigestMismatch(StorageError):
    pass


class ManifestUnknown(StorageError):
    pass


class ManifestBlobUnknown(StorageError):
    """A manifest references a blob or child manifest that the repository does not hold."""

    def __init__(self, digest: str) -> None:
        super().__init__(f"manifest references {digest}, which this repository does not hold")
        self.digest = digest


class StorageFull(StorageError):
    """A write failed for want of space or quota on the filesystem holding ``root``.

    The message is for the operator (paths, free space); clients get a message of their own.
    Built on the worker thread that failed: it asks the filesystem how much room is left.
    """

    def __init__(self, root: Path, cause: OSError) -> None:
        try:
            usage = shutil.disk_usage(root)
            room = f"{usage.free} of {usage.total} bytes free"
        except OSError:
            room = "free space unknown"
        writing = f" writing {cause.filename}" if cause.filename else ""
        super().__init__(f"{cause.strerror}{writing} (filesystem of {root}: {room})")
        self.root = root
