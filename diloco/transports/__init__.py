"""Transports: how islands average their pseudo-gradients (see docs/transports.md).

`base.py` holds the `Transport` protocol and `AverageResult`; `config.py` the `transport`
section and the builder of each kind; one module or package per kind: `local.py`,
`torch_distributed.py`, `grpc/`, `hivemind/`.
"""

from typing import TYPE_CHECKING

from diloco.lazy import lazy_exports

if TYPE_CHECKING:
    from diloco.shared_state import SharedState as SharedState
    from diloco.transports.base import AverageResult as AverageResult
    from diloco.transports.base import GroupMismatchError as GroupMismatchError
    from diloco.transports.base import SharedStateSource as SharedStateSource
    from diloco.transports.base import Transport as Transport
    from diloco.transports.base import TransportSetup as TransportSetup
    from diloco.transports.base import check_fingerprints as check_fingerprints
    from diloco.transports.base import ring_allreduce_bytes as ring_allreduce_bytes
    from diloco.transports.config import TransportConfig as TransportConfig
    from diloco.transports.config import TransportKind as TransportKind
    from diloco.transports.config import build_transports as build_transports
    from diloco.transports.local import LocalGroup as LocalGroup
    from diloco.transports.local import LocalTransport as LocalTransport
    from diloco.transports.torch_distributed import (
        TorchDistributedTransport as TorchDistributedTransport,
    )

_EXPORTS = {
    "SharedState": "diloco.shared_state",
    "AverageResult": "diloco.transports.base",
    "GroupMismatchError": "diloco.transports.base",
    "SharedStateSource": "diloco.transports.base",
    "Transport": "diloco.transports.base",
    "TransportSetup": "diloco.transports.base",
    "check_fingerprints": "diloco.transports.base",
    "ring_allreduce_bytes": "diloco.transports.base",
    "TransportConfig": "diloco.transports.config",
    "TransportKind": "diloco.transports.config",
    "build_transports": "diloco.transports.config",
    "LocalGroup": "diloco.transports.local",
    "LocalTransport": "diloco.transports.local",
    "TorchDistributedTransport": "diloco.transports.torch_distributed",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
