"""One round's average through the hivemind transport, next to a bare hivemind averager and grpc.

For each codec and peer count, in one run, with N peer processes on loopback (one torch thread
each), each peer holding one DHT node (and its p2pd) shared by both hivemind contenders:

- ours: `HivemindTransport.average` of an encoded pseudo-gradient: decode into the averager's
  buffer, matchmaking under the round's key, our exact all-reduce (the reducer encodes each
  span's mean once and every peer decodes the same bytes), the copy of the mean, and the
  background snapshot of the shared state that newcomers download.
- bare: `DecentralizedAverager.step` on the same fp32 tensor with the same compression:
  hivemind's own `NoCompression` for codec none (the same bytes without our 20-byte header);
  for int8, our codec adapter put in hivemind's compression table under UNIFORM_8BIT in these
  bench processes only (hivemind's own 8-bit codecs return wrong averages with numpy >= 2.4,
  and its table dispatches on a protobuf enum).
- grpc: `measure_grpc` of bench/transports.py (the lead's bench), in the same run.

Each contender: peers meet at a barrier, then average; a round's time is the slowest peer's.
Median over `--reps` rounds after one warm-up round.

    python bench/hivemind_average.py [--numel 25e6] [--peers 2 3] [--codecs none int8] [--reps 3]
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from diloco.codecs import build_codec
from diloco.outer.optimizers import SgdOuter
from diloco.shared_state import SharedState
from diloco.transports.hivemind.config import HivemindTransportConfig

WINDOW_S = 60.0  # matchmaking window: peers arrive together (barrier), groups fill at once


def _peer(
    rank: int, n: int, numel: int, codec_name: str, reps: int, address: Any, barrier: Any,
    results: Any,
) -> None:  # fmt: skip
    torch.set_num_threads(1)
    from hivemind.averaging import DecentralizedAverager
    from hivemind.compression import NoCompression, serialization
    from hivemind.proto import runtime_pb2

    from diloco.transports.hivemind import CodecCompression, HivemindGroup, HivemindTransport
    from diloco.transports.hivemind.averager import use_socket_prefix

    codec = build_codec(codec_name)
    block = int(getattr(codec, "block_size", 1))
    settings = HivemindTransportConfig(
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        initial_peers=[] if rank == 0 else address.get(),
        matchmaking_s=WINDOW_S,
        averaging_timeout_s=600.0,
        next_chunk_timeout_s=60.0,
        use_relay=False,
    )
    transport = HivemindTransport(
        settings,
        HivemindGroup(
            run_id=f"bench{n}{codec_name}",
            num_islands=n,
            optimizer=SgdOuter(lr=0.7, momentum=0.9, nesterov=True),
            min_islands=n,
        ),
        codec,
        numel=numel,
        rank=rank,
        identity_path=f"/tmp/hivemind-bench-{rank}-{time.time_ns()}.key",
        block_size=block,
    )
    if rank == 0:
        for _ in range(n - 1):
            address.put(transport.visible_maddrs)
    transport.join([], {"model": "bench"})
    anchor, momentum = torch.zeros(numel), torch.zeros(numel)
    transport.shared_state(SharedState(0, anchor, {"momentum": momentum}))
    pseudo_grad = torch.randn(numel, generator=torch.Generator().manual_seed(rank)) * 1e-3
    payload = codec.encode(pseudo_grad)

    if codec_name == "none":
        compression: Any = NoCompression()
    else:
        compression = CodecCompression(codec, block)
        compression.compression_type = runtime_pb2.CompressionType.UNIFORM_8BIT
        serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = compression
    bare_tensor = codec.decode(payload, numel).clone()
    # The bare averager's helper process keeps its unix sockets with this island's (removed on
    # close) instead of leaving them in /tmp: this process is one bench peer and nothing else.
    use_socket_prefix(transport.sockets.p2p_prefix)
    bare = DecentralizedAverager(
        [bare_tensor],
        transport.dht,
        start=True,
        prefix=f"bare{n}{codec_name}",
        target_group_size=n,
        min_group_size=n,
        min_matchmaking_time=WINDOW_S,
        request_timeout=3.0,
        next_chunk_timeout=60.0,
        compression=compression,
    )
    ours, theirs = [], []
    for round in range(reps + 1):
        barrier.wait()
        start = time.perf_counter()
        result = transport.average(payload, 1.0, round, params_sha256=f"r{round}")
        ours.append(time.perf_counter() - start)
        assert result.participants == n and result.adopt is None, result.participants
        bare_tensor.copy_(codec.decode(payload, numel))
        barrier.wait()
        start = time.perf_counter()
        gathered = bare.step(weight=1.0, timeout=600)
        theirs.append(time.perf_counter() - start)
        assert gathered is not None and len(gathered) == n
    bare.shutdown()
    transport.close()
    results.put((rank, ours, theirs, payload.numel(), result.bytes_sent))


def measure_hivemind(numel: int, codec_name: str, n: int, reps: int) -> dict[str, Any]:
    context = mp.get_context("fork")  # hivemind's helper processes want fork
    results, address, barrier = context.Queue(), context.Queue(), context.Barrier(n)
    processes = [
        context.Process(
            target=_peer, args=(rank, n, numel, codec_name, reps, address, barrier, results)
        )
        for rank in range(n)
    ]
    for process in processes:
        process.start()
    collected = {}
    for _ in range(n):
        rank, ours, theirs, payload_bytes, sent = results.get(timeout=1800)
        collected[rank] = (ours, theirs, payload_bytes, sent)
    for process in processes:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    slowest_ours = [max(collected[r][0][i] for r in range(n)) for i in range(reps + 1)]
    slowest_bare = [max(collected[r][1][i] for r in range(n)) for i in range(reps + 1)]
    return {
        "ours": _median_after_warmup(slowest_ours),
        "bare": _median_after_warmup(slowest_bare),
        "payload_bytes": collected[0][2],
        "sent_bytes": collected[0][3],
    }


def _median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def _grpc_bench() -> Any:
    """bench/transports.py, imported by its module name (its spawned children import it so)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("transports")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=float, default=25e6)
    parser.add_argument("--peers", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--codecs", nargs="+", default=["none", "int8"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-grpc", action="store_true", help="skip the grpc column")
    args = parser.parse_args()
    numel = int(args.numel)
    grpc = None if args.no_grpc else _grpc_bench()
    print(f"{numel:,} parameters, median of {args.reps} rounds after a warm-up, slowest peer")
    print("| codec | peers | payload MB | ours s | bare hivemind s | ours / bare | grpc s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for codec_name in args.codecs:
        for n in args.peers:
            figures = measure_hivemind(numel, codec_name, n, args.reps)
            grpc_s = "-"
            if grpc is not None:
                times, _ = grpc.measure_grpc(numel, codec_name, n, args.reps + 1)
                grpc_s = f"{_median_after_warmup(times):.2f}"
            print(
                f"| {codec_name} | {n} | {figures['payload_bytes'] / 1e6:.1f} | "
                f"{figures['ours']:.2f} | {figures['bare']:.2f} | "
                f"{figures['ours'] / figures['bare']:.2f} | {grpc_s} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
