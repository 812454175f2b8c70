"""One round's average through the grpc transport, next to the limits of the machine.

For each size, codec and island count, in one run, with N island processes (one torch thread
each) and the server side in this process:

- grpc: `GrpcTransport.average_into` of an encoded pseudo-gradient, as OuterSync calls it
  (the spent pseudo-gradient's buffer takes the decoded mean), through a real coordinator
  (`Coordinator` + `CoordinatorServer` on port 0; TLS off unless --tls: loopback; the token
  on), timed on each island from a shared barrier to its answer; the round's time is the
  slowest island's. With the data plane (the default path): the header on grpc, the payload
  on a ticketed TCP stream, the weighted mean computed chunk by chunk as the streams arrive,
  encoded once and sent back on each stream, the island decoding it. With --paths grpc-stream
  too: the same round with the payload on the grpc stream (transport.grpc.dataplane.enabled
  false: the coordinator decodes every payload, averages in fp32, re-encodes, streams back).
- raw TCP: the same bytes moved the same way with bare sockets: every island sends its payload
  to one server, which answers each with as many bytes once it holds all of them. This is the
  wire's limit for this pattern (no framing, no compute).
- gloo: torch.distributed `all_reduce` of the fp32 tensor among the N islands (what the torch
  transport does for codec none; no coordinator).

Median over `--reps` rounds after one warm-up round.

    python bench/transports.py [--sizes 25e6 124e6] [--islands 2 4] [--codecs none int8]
                               [--reps 3] [--paths dataplane grpc-stream] [--tls]

With `--netem DEV` the caller has shaped the link (see docs/results/transports.md).
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diloco.codecs import build_codec
from diloco.outer.nesterov import nesterov_step_
from diloco.outer.optimizers import SgdOuter
from diloco.shared_state import SharedState, params_sha256
from diloco.transports.dataplane.config import DataPlaneConfig
from diloco.transports.grpc import Coordinator, CoordinatorServer, GrpcTransport, RoundRules
from diloco.transports.grpc import coordinator_pb2 as pb
from diloco.transports.grpc import coordinator_pb2_grpc as pb_grpc
from diloco.transports.grpc.config import GrpcTransportConfig
from diloco.transports.grpc.security import self_signed_pair
from diloco.transports.grpc.service import CHANNEL_OPTIONS
from diloco.transports.grpc.wire import chunks_of, receive_bytes

TOKEN = "bench-token-0123456789abcdef"
HOST = "127.0.0.1"
JOIN_S = 1800.0
PATHS = ("dataplane", "grpc-stream")


def grpc_settings(address: str, path: str, tls: tuple[str, str] | None) -> GrpcTransportConfig:
    """The transport.grpc section of the bench's islands and coordinator."""
    dataplane = DataPlaneConfig(enabled=path == "dataplane")
    if tls is None:
        return GrpcTransportConfig(address=address, insecure=True, dataplane=dataplane)
    cert, key = tls
    return GrpcTransportConfig(address=address, tls_cert=cert, tls_key=key, dataplane=dataplane)


# --- grpc -------------------------------------------------------------------------------------


def _grpc_island(
    rank: int, n: int, numel: int, codec_name: str, settings: GrpcTransportConfig, rounds: int,
    barrier: Any, results: Any,
) -> None:  # fmt: skip
    torch.set_num_threads(1)
    codec = build_codec(codec_name)
    transport = GrpcTransport(
        settings, run_id="bench", token=TOKEN, codec=codec, numel=numel, rank=rank, num_islands=n
    )
    transport.join([], {"model": "bench"})
    anchor, momentum = torch.zeros(numel), torch.zeros(numel)
    transport.shared_state(SharedState(0, anchor, {"momentum": momentum}))
    delta = torch.randn(numel, generator=torch.Generator().manual_seed(rank)) * 1e-3
    times = []
    for round in range(rounds):
        sha = params_sha256(anchor)
        spent = delta.clone()  # the round's pseudo-gradient, computed afresh as OuterSync does
        payload = codec.encode(spent)  # handed over: the data plane reads the mean into it
        barrier.wait()
        start = time.perf_counter()
        # As OuterSync: the spent pseudo-gradient takes the decoded mean (a codec none mean is
        # read into the payload, and stays there); the payload is one OuterSync has checked
        # (its pass over the pseudo-gradient comes before the transport, as here).
        result = transport.average_into(payload, 1.0, round, sha, spent, checked_finite=True)
        times.append(time.perf_counter() - start)
        barrier.wait()  # every island has its mean: the coordinator settles its outer step
        assert result.participants == n and result.adopt is None
        nesterov_step_(anchor, result.mean, momentum, lr=0.7, mu=0.9)
    transport.close()
    results.put((rank, times, payload.numel(), result.bytes_received))


def measure_grpc(
    numel: int,
    codec_name: str,
    n: int,
    rounds: int,
    path: str = "dataplane",
    tls: tuple[str, str] | None = None,
) -> tuple[list[float], int]:
    rules = RoundRules(
        run_id="bench", rounds=rounds, islands=n, min_islands=n, deadline_floor_s=600,
        deadline_ceiling_s=600,
    )  # fmt: skip
    outer = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)
    coordinator = Coordinator(rules, build_codec(codec_name), outer, pinned={}, state_dir=None)
    server = CoordinatorServer(coordinator, grpc_settings(f"{HOST}:0", path, tls), TOKEN).start()
    settings = grpc_settings(f"{HOST}:{server.port}", path, tls)
    try:
        per_island = _run_islands(
            _grpc_island, n, (n, numel, codec_name, settings, rounds), with_barrier=True,
            between_rounds=coordinator.flush, rounds=rounds,
        )  # fmt: skip
    finally:
        server.stop(0)
    payload_bytes = per_island[0][1]
    slowest = [max(times[r] for times, _, _ in per_island) for r in range(rounds)]
    return slowest, payload_bytes


# --- a bare grpc stream: what grpc itself costs per byte ------------------------------------------


class _Echo(pb_grpc.CoordinatorServicer):
    """Average answered with the bytes it received: grpc streaming with no coordinator work."""

    def Average(self, request_iterator: Any, context: Any) -> Any:
        header = next(request_iterator).average
        body = receive_bytes(request_iterator, header.payload_bytes, "payload")
        yield pb.Chunk(reply=pb.AverageReply(payload_bytes=body.numel()))
        yield from chunks_of(body)


def _echo_island(
    rank: int, nbytes: int, address: str, rounds: int, barrier: Any, results: Any
) -> None:
    stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
    payload = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    times = []
    for _ in range(rounds):
        barrier.wait()
        start = time.perf_counter()

        def requests() -> Any:
            yield pb.Chunk(average=pb.AverageHeader(payload_bytes=nbytes))
            yield from chunks_of(payload)

        answers = iter(stub.Average(requests()))
        receive_bytes(answers, next(answers).reply.payload_bytes, "answer")
        times.append(time.perf_counter() - start)
    results.put((rank, times, nbytes, nbytes))


def measure_bare_grpc(nbytes: int, n: int, rounds: int) -> list[float]:
    """Each island streams `nbytes` to a grpc server in this process and gets them back."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4 + n), options=CHANNEL_OPTIONS)
    pb_grpc.add_CoordinatorServicer_to_server(_Echo(), server)
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    try:
        per_island = _run_islands(_echo_island, n, (nbytes, f"{HOST}:{port}", rounds), True)
    finally:
        server.stop(0)
    return [max(times[r] for times, _, _ in per_island) for r in range(rounds)]


# --- raw TCP: the same bytes, the same pattern --------------------------------------------------


def _tcp_island(rank: int, nbytes: int, port: int, rounds: int, barrier: Any, results: Any) -> None:
    payload = os.urandom(nbytes)
    answer = bytearray(nbytes)
    view = memoryview(answer)
    times = []
    with socket.create_connection((HOST, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            barrier.wait()
            start = time.perf_counter()
            sock.sendall(payload)
            got = 0
            while got < nbytes:
                got += sock.recv_into(view[got:], nbytes - got)
            times.append(time.perf_counter() - start)
    results.put((rank, times, nbytes, nbytes))


def measure_raw_tcp(nbytes: int, n: int, rounds: int) -> list[float]:
    server = socket.create_server((HOST, 0))
    port = server.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        connections = [server.accept()[0] for _ in range(n)]
        buffers = [bytearray(nbytes) for _ in range(n)]
        everyone = threading.Barrier(n)

        def handle(index: int) -> None:
            sock, view = connections[index], memoryview(buffers[index])
            for _ in range(rounds):
                got = 0
                while got < nbytes:
                    got += sock.recv_into(view[got:], nbytes - got)
                everyone.wait()  # the mean exists once every payload is in
                sock.sendall(view)

        threads = [threading.Thread(target=handle, args=(i,)) for i in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for sock in connections:
            sock.close()
        stop.set()

    serving = threading.Thread(target=serve, daemon=True)
    serving.start()
    per_island = _run_islands(_tcp_island, n, (nbytes, port, rounds), with_barrier=True)
    serving.join(timeout=60)
    server.close()
    return [max(times[r] for times, _, _ in per_island) for r in range(rounds)]


# --- gloo all_reduce --------------------------------------------------------------------------


def _gloo_island(
    rank: int, n: int, numel: int, port: int, rounds: int, barrier: Any, results: Any
) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore(HOST, port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=n)
    x = torch.randn(numel)
    times = []
    for _ in range(rounds):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - start)
    dist.destroy_process_group()
    results.put((rank, times, 4 * numel, 4 * numel))


def measure_gloo(numel: int, n: int, rounds: int) -> list[float]:
    store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False)
    per_island = _run_islands(_gloo_island, n, (n, numel, store.port, rounds), with_barrier=True)
    return [max(times[r] for times, _, _ in per_island) for r in range(rounds)]


# --- running islands --------------------------------------------------------------------------


def _run_islands(
    target: Any,
    n: int,
    args: tuple[Any, ...],
    with_barrier: bool,
    between_rounds: Callable[[], None] | None = None,
    rounds: int = 0,
) -> list[Any]:
    """Run `target` in n island processes; with `between_rounds`, this process joins the
    barrier the islands pass at each round's start and end too, and runs `between_rounds()`
    between the two (the coordinator's work left from a round, which a real run hides behind
    H inner steps, stays out of the next one's time)."""
    context = mp.get_context("spawn")
    results = context.Queue()
    barrier = context.Barrier(n + (between_rounds is not None))
    if between_rounds is not None:

        def settle_each_round() -> None:
            for _ in range(rounds):
                barrier.wait()  # the round starts
                barrier.wait()  # every island has its answer
                between_rounds()

        threading.Thread(target=settle_each_round, daemon=True).start()
    processes = [
        context.Process(target=target, args=(rank, *args, barrier, results)) for rank in range(n)
    ]
    for process in processes:
        process.start()
    collected = {}
    deadline = time.monotonic() + JOIN_S
    while len(collected) < n and time.monotonic() < deadline:
        rank, times, sent, received = results.get(timeout=JOIN_S)
        collected[rank] = (times, sent, received)
    for process in processes:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    if len(collected) < n:
        raise RuntimeError(f"only islands {sorted(collected)} of {n} answered")
    return [collected[rank] for rank in range(n)]


def _median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[25e6, 124e6])
    parser.add_argument("--islands", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--codecs", nargs="+", default=["none", "int8"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=["dataplane"])
    parser.add_argument("--tls", action="store_true", help="TLS on grpc and the data plane")
    parser.add_argument("--no-gloo", action="store_true", help="skip the gloo all_reduce")
    parser.add_argument(
        "--bare-grpc",
        action="store_true",
        help="instead: a bare grpc echo of each codec's payload next to raw TCP (grpc's own cost)",
    )
    args = parser.parse_args()
    rounds = args.reps + 1
    if args.bare_grpc:
        print_bare_grpc(args.sizes, args.islands, args.codecs, rounds)
        return
    with tempfile.TemporaryDirectory() as folder:
        pair = self_signed_pair(Path(folder)) if args.tls else None
        tls = (str(pair[0]), str(pair[1])) if pair is not None else None
        _print_table(args, rounds, tls)


def _print_table(args: argparse.Namespace, rounds: int, tls: tuple[str, str] | None) -> None:
    wire = "TLS" if tls else "plaintext"
    print(
        f"# one round's average on loopback ({wire}); {os.cpu_count()} cores; median of {args.reps}"
    )
    print()
    heads = [f"grpc {path} s | {path} / TCP" for path in args.paths]
    print(
        "| elements | islands | codec | payload MB | raw TCP s | "
        + " | ".join(heads)
        + " | gloo fp32 all_reduce s | "
        + f"{args.paths[0]} / gloo |"
    )
    print("| --- " * (7 + 2 * len(args.paths)) + "|")
    for size in args.sizes:
        numel = int(size)
        for n in args.islands:
            gloo_s = (
                math.nan if args.no_gloo else _median_after_warmup(measure_gloo(numel, n, rounds))
            )
            for codec_name in args.codecs:
                cells, first_s = [], math.nan
                for path in args.paths:
                    times, payload_bytes = measure_grpc(numel, codec_name, n, rounds, path, tls)
                    grpc_s = _median_after_warmup(times)
                    first_s = grpc_s if math.isnan(first_s) else first_s
                    cells.append(grpc_s)
                tcp_s = _median_after_warmup(measure_raw_tcp(payload_bytes, n, rounds))
                ratios = " | ".join(f"{t:.3f} | {t / tcp_s:.2f}x" for t in cells)
                print(
                    f"| {numel / 1e6:.0f}M | {n} | {codec_name} | {payload_bytes / 1e6:.1f} "
                    f"| {tcp_s:.3f} | {ratios} | {gloo_s:.3f} | {first_s / gloo_s:.2f}x |",
                    flush=True,
                )


def print_bare_grpc(sizes: list[float], islands: list[int], codecs: list[str], rounds: int) -> None:
    print("| elements | islands | codec | payload MB | bare grpc echo s | raw TCP s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in sizes:
        for n in islands:
            for codec_name in codecs:
                nbytes = build_codec(codec_name).payload_bytes(int(size))
                grpc_s = _median_after_warmup(measure_bare_grpc(nbytes, n, rounds))
                tcp_s = _median_after_warmup(measure_raw_tcp(nbytes, n, rounds))
                print(
                    f"| {size / 1e6:.0f}M | {n} | {codec_name} | {nbytes / 1e6:.1f} | {grpc_s:.3f} "
                    f"| {tcp_s:.3f} | {grpc_s / tcp_s:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
