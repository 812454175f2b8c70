"""hivemind's butterfly all-reduce, changed so that every island receives the same bits.

hivemind's `AllReduceRunner` splits the vector into one span per peer; each peer (the span's
*reducer*) sums its span from every sender and sends back, to each sender, the difference
between the mean and *that sender's* part, compressed; each peer adds that difference to its
own tensor. With a lossy codec, or with float rounding in `local + (mean - local)`, the peers
then hold different bits, and a reducer that fails leaves its span unaveraged on some peers
and averaged on others. DiLoCo needs the same shared parameters on every island, so here:

- a reducer encodes each span's weighted mean once, with our codec, and sends the same bytes
  to every sender; it decodes those bytes for itself too;
- every peer copies the decoded mean into its buffer (no deltas);
- a reducer that fails fails the whole attempt on every peer that misses a span: hivemind's
  step then forms a new group among the peers still there and averages again from the
  unchanged inputs (a peer that died mid all-reduce does not stop the round for the others).

hivemind: https://github.com/learning-at-home/hivemind (averaging/allreduce.py, 1.1.12).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.compression import CompressionInfo
from hivemind.dht import DHT
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import (
    aiter_with_timeout,
    amap_in_executor,
    as_aiter,
    attach_event_on_finished,
    azip,
)

from diloco.transports.hivemind.compression import CodecCompression


class ExactAllReduceRunner(AllReduceRunner):  # type: ignore[misc]
    """A butterfly all-reduce whose result is bit-identical on every peer (module docstring)."""

    def __init__(self, **kwargs: Any):
        self.codec_compression: CodecCompression = kwargs["compression"]
        super().__init__(**kwargs)
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


async def _keep_group_key(group_info: GroupInfo) -> None:
    """hivemind moves a peer to another group key after each group; ours is chosen per round."""
    del group_info


class IslandAverager(DecentralizedAverager):  # type: ignore[misc]
    """A `DecentralizedAverager` that runs `ExactAllReduceRunner` and serves our shared state.

    Args:
        state_provider: called in the island's process when a peer downloads the state:
            returns (metadata, tensors).
        kwargs: `DecentralizedAverager`'s arguments (`compression` must be a CodecCompression).
    """

    def __init__(
        self,
        *args: Any,
        state_provider: Callable[[], tuple[dict[str, Any], Sequence[torch.Tensor]]],
        **kwargs: Any,
    ):
        self._state_provider = state_provider
        self.last_bytes = (0, 0)
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        exit_with_parent(self._parent_pid)
        super().run()

    def get_current_state(self) -> tuple[Any, Sequence[torch.Tensor], None]:
        metadata, tensors = self._state_provider()
        return metadata, tensors, None

    async def _step(self, *, step: Any, future_for_init: Any) -> None:
        self._matchmaking.group_key_manager.update_key_on_group_assembled = _keep_group_key
        await super()._step(step=step, future_for_init=future_for_init)

    async def _aggregate_with_group(
        self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any
    ) -> dict[str, Any]:
        gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        sent, received = self.last_bytes
        return {"gathered": gathered, "bytes_sent": sent, "bytes_received": received}

    async def _run_allreduce_inplace_(
        self,
        tensors: Sequence[torch.Tensor],
        group_info: GroupInfo,
        group_id: bytes | None = None,
        **kwargs: Any,
    ) -> None:
        group_id = group_info.group_id if group_id is None else group_id
        runner = ExactAllReduceRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            async for _ in runner:
                raise ValueError("auxiliary peers receive no averages")
            return
        # The runner yields whole tensors once every span has arrived: a failed attempt
        # leaves `tensors` as they were, ready for the next attempt.
        async for tensor, mean in azip(as_aiter(*tensors), runner):
            tensor.copy_(mean)
        self.last_bytes = (runner.bytes_sent, runner.bytes_received)


class IslandDHT(DHT):  # type: ignore[misc]
    """hivemind's DHT process, which also stops (with its p2pd) when the island dies."""

    def run(self) -> None:
        exit_with_parent(self._parent_pid)
        super().run()


def exit_with_parent(parent_pid: int) -> None:
    """In a forked helper process: when `parent_pid` dies (even by SIGKILL), stop our children
    (p2pd) and exit, so that nothing outlives the island."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        for child in _children(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return children
