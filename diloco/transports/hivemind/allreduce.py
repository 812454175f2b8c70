"""hivemind's butterfly all-reduce, changed so that every island receives the same bits.

hivemind's `AllReduceRunner` splits the vector into one span per peer; each peer (the span's
*reducer*) sums its span from every sender and sends back, to each sender, the difference
between the mean and *that sender's* part, compressed; each peer adds that difference to its
own tensor. With a lossy codec, or with float rounding in `local + (mean - local)`, the peers
then hold different bits, and a reducer that fails leaves its span unaveraged on some peers
and averaged on others. DiLoCo needs the same shared parameters on every island, so here:

- a reducer computes each span's mean with `diloco.aggregate.weighted_mean`, the islands'
  parts in rank order (their ranks travel in the data hivemind gathers), so the mean has the
  bits every other transport would compute; it encodes the mean once, with our codec, and
  sends the same bytes to every sender; it decodes those bytes for itself too;
- every peer copies the decoded mean into its buffer (no deltas);
- a reducer that fails fails the whole attempt on every peer that misses a span: hivemind's
  step then forms a new group among the peers still there and averages again from the
  unchanged inputs (a peer that died mid all-reduce does not stop the round for the others).

Bytes: hivemind cuts the vector into parts of 2^19 values (whole codec blocks) and deals
whole parts to the peers, about n/N values each with equal bandwidths (a vector of one part
is reduced by a single peer). Per round, a peer sends each part it does not reduce and
receives its mean, and for each part it reduces receives N - 1 parts and sends N - 1 means:
with P(part) a part's payload bytes, sent = received = sum(P(p), p not reduced by the peer)
+ (N - 1) * sum(P(p), p reduced by the peer). Which peer reduces which parts follows the
order the group's leader drew at random.

hivemind: https://github.com/learning-at-home/hivemind (averaging/allreduce.py, 1.1.12).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import CompressionInfo
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, attach_event_on_finished

from diloco.aggregate import weighted_mean
from diloco.transports.hivemind.compression import CodecCompression


class OrderedPartReducer(TensorPartReducer):  # type: ignore[misc]
    """hivemind's reducer of this peer's parts, except that a part's mean is `weighted_mean`
    of the senders' parts in a fixed order, computed once every sender's part is in.

    Args:
        part_shapes, num_senders: as hivemind's `TensorPartReducer`.
        sender_order: one sort key per sender (the island's rank, then its peer id).
    """

    def __init__(
        self,
        part_shapes: Sequence[torch.Size],
        num_senders: int,
        sender_order: Sequence[tuple[int, str]],
    ):
        self._sender_order = list(sender_order)
        self._parts: dict[int, tuple[torch.Tensor, float]] = {}
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        self._parts = {}
        super().reset_accumulators()

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        # hivemind's accumulate_part, keeping the part instead of adding it to a running sum.
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait(
                {self.current_part_future, asyncio.create_task(self.finished.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self.finished.is_set():
                raise AllreduceException("attempted to aggregate a part in a finalized reducer")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self._parts[sender_index] = (tensor_part, weight)
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future  # type: ignore[no-any-return]

    def check_current_part_finished(self) -> None:
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            senders = sorted(self._parts, key=self._sender_order.__getitem__)
            mean = weighted_mean(
                [self._parts[i][0] for i in senders], [self._parts[i][1] for i in senders]
            )
            self.current_part_future.set_result(mean)
            self.reset_accumulators()


class ExactAllReduceRunner(AllReduceRunner):  # type: ignore[misc]
    """A butterfly all-reduce whose result is bit-identical on every peer (module docstring).

    Args:
        sender_order: {peer id: sort key} of the group's peers (rank order).
        kwargs: `AllReduceRunner`'s arguments (`compression` must be a CodecCompression).
    """

    def __init__(self, *, sender_order: dict[PeerID, tuple[int, str]], **kwargs: Any):
        self.codec_compression: CodecCompression = kwargs["compression"]
        super().__init__(**kwargs)
        self.tensor_part_reducer = OrderedPartReducer(
            tuple(part.shape for part in self.parts_for_local_averaging),
            len(self.sender_peer_ids),
            [sender_order[peer] for peer in self.sender_peer_ids],
        )
        self.bytes_sent = 0
        self.bytes_received = 0
        self._means: dict[int, asyncio.Future[runtime_pb2.Tensor]] = {}

    def _encoded_mean(self, part_index: int, mean_part: torch.Tensor) -> Any:
        """The span's mean as our payload: encoded once, shared by every sender's stream."""
        future = self._means.get(part_index)
        if future is None:
            info = CompressionInfo.from_tensor(mean_part)
            future = asyncio.get_event_loop().run_in_executor(
                None, self.codec_compression.compress, mean_part, info
            )
            self._means[part_index] = future
        return future

    async def _communicate_with_peer(self, peer_id: PeerID) -> None:
        peer_index = self.ordered_peer_ids.index(peer_id)
        loop = asyncio.get_event_loop()
        if peer_id == self.peer_id:
            sender_index = self.sender_peer_ids.index(peer_id)
            for part_index, part in enumerate(self.parts_for_local_averaging):
                # Our own span is already decoded from our payload: no second trip through
                # the codec (the mean below is what every peer shares).
                mean_part = await self.tensor_part_reducer.accumulate_part(
                    sender_index, part_index, part, weight=self.weight
                )
                message = await self._encoded_mean(part_index, mean_part)
                decoded = await loop.run_in_executor(None, self.codec_compression.extract, message)
                self.tensor_part_container.register_processed_part(peer_index, part_index, decoded)
            return
        try:
            done_sending = asyncio.Event()
            inputs = attach_event_on_finished(
                self._generate_input_for_peer(peer_index), done_sending
            )
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()  # client-mode peers send everything first

            def decode(msg: averaging_pb2.AveragingData) -> torch.Tensor:
                if msg.code != averaging_pb2.AVERAGED_PART:
                    code = averaging_pb2.MessageCode.Name(msg.code)
                    raise AllreduceException(f"{peer_id} sent {code}")
                self.bytes_received += len(msg.tensor_part.buffer)
                return self.codec_compression.extract(msg.tensor_part)

            part_index = 0
            async for mean_part in amap_in_executor(
                decode,
                aiter_with_timeout(stream, self.reducer_timeout),
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                self.tensor_part_container.register_processed_part(
                    peer_index, part_index, mean_part
                )
                part_index += 1
            expected = self.tensor_part_container.num_parts_by_peer[peer_index]
            if part_index != expected:
                raise AllreduceException(f"{peer_id} sent {part_index} of {expected} parts")
        except BaseException as error:
            # Unlike hivemind, never fill a missing span with our own values: fail the attempt.
            self.finalize(exception=AllreduceException(f"reducer {peer_id} failed: {error!r}"))
            raise

    async def _generate_input_for_peer(
        self, peer_index: int
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for message in super()._generate_input_for_peer(peer_index):
            self.bytes_sent += len(message.tensor_part.buffer)
            yield message

    async def _accumulate_parts_streaming(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        part_index = 0

        def decode(msg: averaging_pb2.AveragingData) -> tuple[torch.Tensor, float]:
            self.bytes_received += len(msg.tensor_part.buffer)
            return self.codec_compression.extract(msg.tensor_part), msg.weight

        try:
            async for part, weight in amap_in_executor(
                decode, stream, max_prefetch=self.tensor_part_container.prefetch
            ):
                try:
                    mean_part = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, part, weight=weight
                    )
                except BannedException:
                    break  # the sender was dropped; its parts no longer count
                message = await self._encoded_mean(part_index, mean_part)
                part_index += 1
                self.bytes_sent += len(message.buffer)
                yield averaging_pb2.AveragingData(
                    code=averaging_pb2.AVERAGED_PART, tensor_part=message
                )
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])
