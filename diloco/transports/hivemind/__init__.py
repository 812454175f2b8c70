"""The hivemind transport: a DHT and a butterfly all-reduce over libp2p, no server.

- `transport.py`: the island's side (join, shared state, average, leave).
- `allreduce.py`: hivemind's all-reduce changed to give every island the same bits.
- `compression.py`: our codecs behind hivemind's compression interface.
- `config.py`: the `transport.hivemind` section.

Needs the optional extra: `pip install -e ".[hivemind]"`.
"""

from typing import TYPE_CHECKING

from diloco.lazy import lazy_exports

if TYPE_CHECKING:
    from diloco.transports.hivemind.compression import CodecCompression as CodecCompression
    from diloco.transports.hivemind.config import HivemindTransportConfig as HivemindTransportConfig
    from diloco.transports.hivemind.transport import HivemindTransport as HivemindTransport

_EXPORTS = {
    "CodecCompression": "diloco.transports.hivemind.compression",
    "HivemindTransportConfig": "diloco.transports.hivemind.config",
    "HivemindTransport": "diloco.transports.hivemind.transport",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
