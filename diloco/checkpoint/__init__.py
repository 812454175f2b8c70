"""Checkpoints: atomic writes, and named-tensor checkpoints with a checksum (no pickle)."""

from diloco.checkpoint.atomic import write_atomic
from diloco.checkpoint.store import (
    DamagedCheckpoint,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    newest_intact,
    old_format_checkpoints,
    save_checkpoint,
)

__all__ = [
    "DamagedCheckpoint",
    "checkpoint_path",
    "list_checkpoints",
    "load_checkpoint",
    "newest_intact",
    "old_format_checkpoints",
    "save_checkpoint",
    "write_atomic",
]
