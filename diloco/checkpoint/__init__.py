"""Checkpoints: atomic save and load of everything a round needs."""

from diloco.checkpoint.atomic import (
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["checkpoint_path", "list_checkpoints", "load_checkpoint", "save_checkpoint"]
