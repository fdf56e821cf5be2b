"""What storage can refuse. Storage knows nothing of HTTP; the API maps these to OCI codes."""

from __future__ import annotations


class StorageError(Exception):
    """Base of every refusal storage reports (not of I/O failures, which stay OSError)."""


class NameUnknown(StorageError):
    pass


class BlobUnknown(StorageError):
    pass


class BlobUploadUnknown(StorageError):
    pass


class DigestMismatch(StorageError):
    pass


class ManifestUnknown(StorageError):
    pass


class ManifestBlobUnknown(StorageError):
    """A manifest references a blob or child manifest that the repository does not hold."""

    def __init__(self, digest: str) -> None:
        super().__init__(f"manifest references {digest}, which this repository does not hold")
        self.digest = digest
