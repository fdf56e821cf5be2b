"""Content-addressed storage. Knows neither HTTP nor events; every call blocks on disk."""

from .errors import (
    BlobUnknown,
    BlobUploadUnknown,
    DigestMismatch,
    ManifestBlobUnknown,
    ManifestUnknown,
    NameUnknown,
    StorageError,
    StorageFull,
    UploadBusy,
)
from .filesystem import FilesystemStorage, ManifestRecord, PutManifestResult, UploadWriter
from .layout import Layout

__all__ = [
    "BlobUnknown",
    "BlobUploadUnknown",
    "DigestMismatch",
    "FilesystemStorage",
    "Layout",
    "ManifestBlobUnknown",
    "ManifestRecord",
    "ManifestUnknown",
    "NameUnknown",
    "PutManifestResult",
    "StorageError",
    "StorageFull",
    "UploadBusy",
    "UploadWriter",
]
