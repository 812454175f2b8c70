"""A transport plug-in: a group of one island (docs/plugins.md, "A transport")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from diloco.codecs.base import Codec
from diloco.transports.base import AverageResult


class SoloTransport:
    """A group of one island: the mean is its own pseudo-gradient, nothing goes on the wire."""

    def __init__(self, codec: Codec, numel: int):
        self.codec, self.numel = codec, numel
        self.rank, self.num_islands = 0, 1

    def join(self, available_rounds: Sequence[int], fingerprint: Mapping[str, str]) -> int | None:
        return max(available_rounds) if available_rounds else None  # nobody to compare with

    def average(
        self,
        payload: torch.Tensor,
        weight: float,
        round: int,
        params_sha256: str | None = None,
    ) -> AverageResult:
        # A transport that kept the group's state would check params_sha256 against it.
        mean = self.codec.decode(payload, self.numel)
        return AverageResult(mean, participants=1, bytes_sent=0, bytes_received=0)

    def close(self) -> None:
        return None
