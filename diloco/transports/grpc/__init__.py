"""The grpc transport: a coordinator averages each round; TLS and a run token on every call.

- `coordinator.proto`: the wire protocol (the `*_pb2*.py` next to it are generated: `make proto`).
- `rounds.py`: the coordinator's rules (membership, deadlines, late and refused payloads,
  the shared state it keeps and persists), with no grpc in it.
- `service.py`: the grpc service and server around them; `client.py`: the island's side.
- `security.py`: the run token and TLS; `deadline.py`: the adaptive round deadline.
"""

from diloco.transports.grpc.client import GrpcTransport, PayloadRefusedError
from diloco.transports.grpc.rounds import RoundBook, RoundRules
from diloco.transports.grpc.security import read_token
from diloco.transports.grpc.service import CoordinatorServer

__all__ = [
    "CoordinatorServer",
    "GrpcTransport",
    "PayloadRefusedError",
    "RoundBook",
    "RoundRules",
    "read_token",
]
