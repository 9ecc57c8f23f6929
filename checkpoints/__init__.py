"""The Orbax-backed checkpoint store, its retention rule, and the ledger of what happened."""

from continuity.checkpoints.ledger import Ledger, to_json_value
from continuity.checkpoints.retention import checkpoints_to_delete
from continuity.checkpoints.store import (
    EXPORT_SUFFIXES,
    SCHEMA_VERSION,
    STATUSES,
    CheckpointInfo,
    CheckpointNotFoundError,
    CheckpointSaveError,
    CheckpointStore,
    CorruptCheckpointError,
    Restored,
)

__all__ = [
    "EXPORT_SUFFIXES",
    "SCHEMA_VERSION",
    "STATUSES",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "CheckpointStore",
    "CorruptCheckpointError",
    "Ledger",
    "Restored",
    "checkpoints_to_delete",
    "to_json_value",
]
