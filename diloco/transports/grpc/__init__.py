"""The grpc transport: a coordinator averages each round; TLS and a run token on every call.

- `coordinator.proto`: the wire protocol (the `*_pb2*.py` next to it are generated: `make proto`);
  `wire.py`: how payloads and states are framed on it.
- `coordinator.py`: the coordinator's rules, with no grpc in them, built from `membership.py`
  (joins, sessions), `rounds.py` (a round's contributions and their mean) and
  `state_keeper.py` (the shared state, the outer step, persistence).
- `service.py`: the grpc service and server around them; `guard.py`: stream timeouts, call
  limits and header checks; `client.py`: the island's side; `hosting.py`: building both.
- `security.py`: the run token and TLS; `deadline.py`: the adaptive round deadline;
  `config.py`: the `transport.grpc` section.
"""

from typing import TYPE_CHECKING

from diloco.lazy import lazy_exports

if TYPE_CHECKING:
    from diloco.transports.grpc.client import GrpcTransport as GrpcTransport
    from diloco.transports.grpc.client import PayloadRefusedError as PayloadRefusedError
    from diloco.transports.grpc.config import GrpcTransportConfig as GrpcTransportConfig
    from diloco.transports.grpc.coordinator import Coordinator as Coordinator
    from diloco.transports.grpc.hosting import start_coordinator as start_coordinator
    from diloco.transports.grpc.rounds import RoundRules as RoundRules
    from diloco.transports.grpc.security import read_token as read_token
    from diloco.transports.grpc.service import CoordinatorServer as CoordinatorServer

_EXPORTS = {
    "GrpcTransport": "diloco.transports.grpc.client",
    "PayloadRefusedError": "diloco.transports.grpc.client",
    "GrpcTransportConfig": "diloco.transports.grpc.config",
    "Coordinator": "diloco.transports.grpc.coordinator",
    "start_coordinator": "diloco.transports.grpc.hosting",
    "RoundRules": "diloco.transports.grpc.rounds",
    "read_token": "diloco.transports.grpc.security",
    "CoordinatorServer": "diloco.transports.grpc.service",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
