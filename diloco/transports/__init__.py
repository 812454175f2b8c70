"""Transports: how islands average their pseudo-gradients (see docs/transports.md)."""

from diloco.transports.base import (
    AverageResult,
    GroupMismatchError,
    SharedState,
    SharedStateSource,
    Transport,
    check_fingerprints,
    ring_allreduce_bytes,
)
from diloco.transports.local import LocalGroup, LocalTransport
from diloco.transports.torch_distributed import TorchDistributedTransport

__all__ = [
    "AverageResult",
    "GroupMismatchError",
    "check_fingerprints",
    "LocalGroup",
    "LocalTransport",
    "SharedState",
    "SharedStateSource",
    "TorchDistributedTransport",
    "Transport",
    "ring_allreduce_bytes",
]
