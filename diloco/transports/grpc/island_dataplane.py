"""An island's side of the data plane: its payload sent on the ticket the coordinator handed out,
the round's mean read back on the same connection.

The payload goes straight from its tensor's buffer (no copy in Python: dataplane/client.py) and
the answer is read back into that same buffer (the caller handed the payload over, and a mean
has the payload's size): no new model-sized buffer, whose first touch cost more than the
copy itself (124M fp32: the round 1.36-1.43 s -> 0.98-1.04 s, docs/results/streaming.md). The
island then uses its values as the mean without another copy where the codec allows
(`codec_chunks.decode_view`). Once the answer has begun the payload is gone: an answer that
breaks (AnswerBroken) cannot be followed by a resend, which the control plane never asks for
(the exchange completed before its first answer byte: the island gets the round's mean).

TLS uses the run's files as grpc does (transport.grpc.tls_ca, or tls_cert itself; with
mutual_tls the island presents its certificate), plaintext only with transport.grpc.insecure;
the host is the coordinator's (transport.grpc.address), the port the one each ticket comes
with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diloco.codecs.base import empty
from diloco.transports.dataplane.client import DataPlaneClient
from diloco.transports.dataplane.tls import client_context
from diloco.transports.grpc import coordinator_pb2 as pb
from diloco.transports.grpc.config import GrpcTransportConfig

_CPU = torch.device("cpu")


class IslandDataPlane:
    """Runs this island's exchanges with the coordinator of `settings.address`."""

    def __init__(self, settings: GrpcTransportConfig):
        tls = None
        if settings.tls_cert:
            mutual = settings.mutual_tls
            tls = client_context(
                settings.tls_ca or settings.tls_cert,
                cert=settings.tls_cert if mutual else "",
                key=settings.tls_key if mutual else "",
                ca_key="tls_ca" if settings.tls_ca else "tls_cert",
            )
        self.host = settings.address.rpartition(":")[0].strip("[]")
        self.client = DataPlaneClient(
            tls=tls,
            insecure=tls is None and settings.insecure,
            inactivity_timeout_s=settings.dataplane.inactivity_timeout_s,
            socket_buffer_bytes=settings.dataplane.socket_buffer_bytes,
        )

    def exchange(
        self,
        reply: pb.AverageReply,
        payload: torch.Tensor,
        answer_bytes: int,
        timeout_s: float,
        before_trailer: Callable[[], None] | None = None,
        use_answer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Send `payload` (contiguous uint8, CPU) on the reply's ticket; the mean's payload,
        in `payload`'s own buffer (module docstring), or what `use_answer` makes of it.
        `before_trailer`, `use_answer`: as `DataPlaneClient.exchange`'s.

        Raises:
            AnswerBroken: the answer broke after it had begun: `payload` holds part of it.
            DataPlaneError: the exchange did not complete (ask the coordinator again).
        """
        answer = (
            payload if payload.numel() == answer_bytes else empty(answer_bytes, torch.uint8, _CPU)
        )
        return self.client.exchange(
            (self.host, int(reply.dataplane_port)),
            bytes(reply.ticket),
            payload,
            answer_bytes=answer_bytes,
            timeout_s=timeout_s,
            answer_into=answer,
            before_trailer=before_trailer,
            use_answer=use_answer,
        )
