"""The hivemind transport: a DHT and a butterfly all-reduce over libp2p, no server.

- `transport.py`: the island's side (join, shared state, average, leave).
- `allreduce.py`: hivemind's all-reduce changed to give every island the same bits.
- `compression.py`: our codecs behind hivemind's compression interface.

Needs the optional extra: `pip install -e ".[hivemind]"`.
"""

from diloco.transports.hivemind.compression import CodecCompression
from diloco.transports.hivemind.transport import HivemindGroup, HivemindTransport

__all__ = ["CodecCompression", "HivemindGroup", "HivemindTransport"]
