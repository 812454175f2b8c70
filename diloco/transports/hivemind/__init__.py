"""The hivemind transport: a DHT and a butterfly all-reduce over libp2p, no server.

- `transport.py`: the island's side (join, shared state, average, leave).
- `build.py`: building it from a `TransportSetup` (the composition root's entry point).
- `records.py`: what islands publish in the DHT and read back (group keys, fingerprints,
  progress).
- `adopt.py`: when an island adopts the group's state instead of averaging.
- `state.py`: serving the shared state to newcomers and downloading it.
- `auth.py`: the run token (proofs that a peer holds it).
- `averager.py`: hivemind's averager and DHT processes as an island runs them.
- `allreduce.py`: hivemind's all-reduce changed to give every island the same bits.
- `compression.py`: our codecs behind hivemind's compression interface.
- `connect.py`: starting the DHT node and finding the first peers.
- `sockets.py`: the island's private directory for p2pd's unix sockets.
- `config.py`: the `transport.hivemind` section.

Needs the optional extra: `pip install -e ".[hivemind]"`.
"""

from typing import TYPE_CHECKING

from diloco.lazy import lazy_exports

if TYPE_CHECKING:
    from diloco.transports.hivemind.auth import read_run_token as read_run_token
    from diloco.transports.hivemind.build import (
        build_hivemind_transport as build_hivemind_transport,
    )
    from diloco.transports.hivemind.compression import CodecCompression as CodecCompression
    from diloco.transports.hivemind.config import HivemindTransportConfig as HivemindTransportConfig
    from diloco.transports.hivemind.transport import HivemindGroup as HivemindGroup
    from diloco.transports.hivemind.transport import HivemindTransport as HivemindTransport

_EXPORTS = {
    "CodecCompression": "diloco.transports.hivemind.compression",
    "HivemindGroup": "diloco.transports.hivemind.transport",
    "HivemindTransportConfig": "diloco.transports.hivemind.config",
    "HivemindTransport": "diloco.transports.hivemind.transport",
    "build_hivemind_transport": "diloco.transports.hivemind.build",
    "read_run_token": "diloco.transports.hivemind.auth",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
