"""The Orbax-backed checkpoint store: ownership, integrity, retention, and the ledger of what happened."""

from continuity.checkpoints.ledger import Ledger, to_json_value
from continuity.checkpoints.lock import StoreLockedError, describe_holder, read_holder
from continuity.checkpoints.retention import checkpoints_to_delete
from continuity.checkpoints.store import (
    CONDITIONS,
    EXPORT_SUFFIXES,
    SCHEMA_VERSION,
    STATUSES,
    CheckpointInfo,
    CheckpointNotFoundError,
    CheckpointSaveError,
    CheckpointStore,
    CorruptCheckpointError,
    ExportDestinationError,
    ReadOnlyStoreError,
    Restored,
    StoreAccessError,
    Verification,
)
from continuity.checkpoints.store_file import StoreFileError

__all__ = [
    "CONDITIONS",
    "EXPORT_SUFFIXES",
    "SCHEMA_VERSION",
    "STATUSES",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "CheckpointStore",
    "CorruptCheckpointError",
    "ExportDestinationError",
    "Ledger",
    "ReadOnlyStoreError",
    "Restored",
    "StoreAccessError",
    "StoreFileError",
    "StoreLockedError",
    "Verification",
    "checkpoints_to_delete",
    "describe_holder",
    "read_holder",
    "to_json_value",
]
