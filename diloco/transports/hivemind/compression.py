"""Our codecs behind hivemind's compression interface (`hivemind.compression.CompressionBase`).

hivemind splits the averaged vector into parts and compresses each part on its own; this
adapter writes each part as one of our payloads (the 20-byte header, then the codec's body),
so what travels between peers is byte for byte what `diloco.codecs` writes. The adapter is
never registered in hivemind's own table (which dispatches on a protobuf enum): our all-reduce
(`allreduce.py`) calls `extract` itself.
"""

from __future__ import annotations

import torch
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.proto import runtime_pb2

from diloco.codecs import Codec


class CodecCompression(CompressionBase):  # type: ignore[misc]
    """One of our codecs as a hivemind compression.

    Args:
        codec: the run's codec.
        block_size: the codec's block (1 for codecs without blocks): hivemind's parts are
            whole numbers of blocks, so a part's payload is the whole vector's payload for
            those elements.
    """

    # The enum value is only a label here (hivemind's dispatch table never sees this class).
    compression_type = runtime_pb2.CompressionType.NONE

    def __init__(self, codec: Codec, block_size: int = 1):
        self.codec = codec
        self.block_size = max(1, block_size)

    def compress(
        self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False
    ) -> runtime_pb2.Tensor:
        del info, allow_inplace
        flat_N = tensor.detach().reshape(-1).to(torch.float32)
        payload = self.codec.encode(flat_N).cpu()
        return runtime_pb2.Tensor(
            compression=self.compression_type,
            buffer=payload.numpy().tobytes(),
            size=list(tensor.shape),
            dtype="float32",
        )

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        shape = torch.Size(serialized_tensor.size)
        payload = torch.frombuffer(bytearray(serialized_tensor.buffer), dtype=torch.uint8)
        return self.codec.decode(payload, shape.numel()).reshape(shape)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        # hivemind sizes parts as part_size_bytes / (4 bytes * ratio) values: with 1/4, a part
        # holds exactly part_size_bytes values, which `part_values` keeps a whole number of
        # blocks.
        del info
        return 0.25

    def part_values(self, target_values: int) -> int:
        """The part size (in values) nearest `target_values` that is a whole number of blocks."""
        blocks = max(1, round(target_values / self.block_size))
        return blocks * self.block_size

    def __repr__(self) -> str:
        return f"CodecCompression({self.codec.name})"
