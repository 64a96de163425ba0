"""adapters_store: the artifact store and registry of skills, adapters and datasets (fsspec)."""

from .store import (
    MANIFEST,
    ArtifactConflict,
    ArtifactNotFound,
    ArtifactStore,
    ChecksumMismatch,
    CorruptArtifact,
    DatasetInfo,
    InvalidName,
    Staging,
    StoreError,
    check_name,
    sha256_file,
)

__all__ = [
    "MANIFEST",
    "ArtifactConflict",
    "ArtifactNotFound",
    "ArtifactStore",
    "ChecksumMismatch",
    "CorruptArtifact",
    "DatasetInfo",
    "InvalidName",
    "Staging",
    "StoreError",
    "check_name",
    "sha256_file",
]
