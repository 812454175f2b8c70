"""One round through the data plane on loopback, next to raw TCP and memcpy, with peak RSS.

For each size, codec and island count, in one run: N island processes (one torch thread each)
and a coordinator process (diloco/transports/dataplane: `DataPlaneServer` + one
`LockstepExchange` per round, as the coordinator will register them). A round: every island,
from a shared barrier, sends its encoded payload on its ticket and receives the encoded
weighted mean; the coordinator reads the N streams in lockstep, decodes and accumulates chunk
by chunk, encodes the mean chunk by chunk, and answers every island. The round's time is the
slowest island's, connect and TLS handshake included (one connection per exchange). Rows:

- data plane TLS / plaintext: the above (TLS: a self-signed P-256 pair made with openssl).
- raw TCP: the same bytes moved the same way with bare sockets (the pattern of
  bench/transports.py `measure_raw_tcp`: persistent connections, each island sends its payload,
  the server answers each with as many bytes once it holds all of them; no compute).
- memcpy: one copy of the payload (`dst.copy_(src)`, one thread), for scale.

Peak RSS (Linux VmHWM, reset with /proc/self/clear_refs after setup): for the coordinator and
the islands, the whole process's peak over the payload size, and the data plane's share: the
peak minus the RSS after setup (imports, the island's payload, the coordinator's server), over
the payload size. An island's share includes the answer buffer (1x: the mean it receives).

Median over `--reps` rounds after one warm-up round.

    python bench/dataplane.py [--sizes 25e6 124e6] [--islands 2 4] [--codecs none int8]
                              [--reps 3] [--chunk-bytes 4194304] [--socket-buffer-bytes 0]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from diloco.codecs import build_codec, sum_kernels
from diloco.codecs.base import empty
from diloco.transports.dataplane.accumulate import LockstepAccumulator
from diloco.transports.dataplane.client import DataPlaneClient
from diloco.transports.dataplane.codec_chunks import chunk_codec, new_payload
from diloco.transports.dataplane.config import DataPlaneConfig
from diloco.transports.dataplane.lockstep import LockstepExchange
from diloco.transports.dataplane.server import DataPlaneServer
from diloco.transports.dataplane.tickets import (
    Ticket,
    TicketFields,
    derive_ticket_key,
    new_ticket,
)
from diloco.transports.dataplane.tls import client_context, server_context
from diloco.transports.grpc.security import self_signed_pair

TOKEN = "bench-token-0123456789abcdef"
RUN = "bench-dataplane"
KEY = derive_ticket_key(TOKEN, RUN)
HOST = "127.0.0.1"
JOIN_S = 1800.0
_CPU = torch.device("cpu")


# --- memory -------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def _random_payload(codec_name: str, numel: int, seed: int) -> torch.Tensor:
    """A valid payload built chunk by chunk, so no fp32 vector of `numel` ever exists here."""
    chunked = chunk_codec(build_codec(codec_name), numel)
    payload = new_payload(chunked)
    generator = torch.Generator().manual_seed(seed)
    step = max(chunked.alignment, (1 << 20) // chunked.alignment * chunked.alignment)
    for start in range(0, numel, step):
        x_n = torch.randn(min(step, numel - start), generator=generator) * 1e-3
        chunked.encode_chunk(x_n, payload, start)
    return payload


# --- the data plane -----------------------------------------------------------------------------


def _coordinator(
    settings: DataPlaneConfig,
    pem: tuple[str, str] | None,
    codec_name: str,
    numel: int,
    tickets: list[list[Ticket]],
    threads: int,
    to_parent: Any,
) -> None:
    if threads:
        torch.set_num_threads(threads)
    tls = server_context(*pem) if pem else None
    server = DataPlaneServer(settings, key=KEY, run_id=RUN, tls=tls, insecure=pem is None)
    # The one-pass sum kernels load at setup, as the grpc coordinator loads them at its start
    # (DataPlaneHost.start): a fixed 77 MiB or so, not a share of the round's memory.
    sum_kernels.fma_add_matches_torch()
    server.start()
    accumulator = LockstepAccumulator(
        build_codec(codec_name), numel, chunk_bytes=settings.chunk_bytes
    )
    deadline = time.monotonic() + JOIN_S
    weights = {ticket.fields.island: float(ticket.fields.island + 1) for ticket in tickets[0]}
    exchanges: list[LockstepExchange | None] = []
    for round_tickets in tickets:
        group = LockstepExchange(accumulator, weights, deadline=deadline)
        for ticket in round_tickets:
            server.expect(ticket, group, deadline=deadline)
        exchanges.append(group)
    base_kb = _status_kb("VmRSS")
    _reset_peak()
    to_parent.put(("ready", server.address))
    failures = []
    for index, exchange in enumerate(exchanges):
        assert exchange is not None
        outcome = exchange.outcome()
        if outcome is None or outcome.mean_payload is None:
            failures.append(f"round {index}: {outcome}")
        exchanges[index] = None  # the round's mean goes once its answers are sent
    expected = len(weights) * len(tickets)
    limit = time.monotonic() + 60
    while server.exchanges_completed < expected and time.monotonic() < limit:
        time.sleep(0.01)
    peak_kb = _status_kb("VmHWM")
    server.stop()
    to_parent.put(("done", base_kb, peak_kb, failures, server.refusals()))


def _island(
    rank: int,
    address: tuple[str, int],
    tickets: list[bytes],
    codec_name: str,
    numel: int,
    cert: str | None,
    barrier: Any,
    results: Any,
) -> None:
    torch.set_num_threads(1)
    payload = _random_payload(codec_name, numel, seed=rank)
    tls = client_context(cert) if cert else None
    client = DataPlaneClient(tls=tls, insecure=cert is None, inactivity_timeout_s=JOIN_S)
    base_kb = _status_kb("VmRSS")
    _reset_peak()
    answer = empty(payload.numel(), torch.uint8, _CPU)
    times = []
    for ticket in tickets:
        barrier.wait()
        start = time.perf_counter()
        client.exchange(
            address,
            ticket,
            payload,
            answer_bytes=payload.numel(),
            timeout_s=JOIN_S,
            answer_into=answer,
        )
        times.append(time.perf_counter() - start)
    results.put((rank, times, base_kb, _status_kb("VmHWM")))


def measure_dataplane(
    numel: int,
    codec_name: str,
    n: int,
    rounds: int,
    pem: tuple[str, str] | None,
    settings: DataPlaneConfig,
    threads: int,
) -> tuple[list[float], dict[str, float]]:
    """Round times (slowest island) and peak RSS figures (kB) of coordinator and islands."""
    payload_bytes = build_codec(codec_name).payload_bytes(numel)
    tickets = [
        [
            new_ticket(
                KEY, RUN, TicketFields(island=rank, round=r, payload_bytes=payload_bytes), JOIN_S
            )
            for rank in range(n)
        ]
        for r in range(rounds)
    ]
    context = mp.get_context("spawn")
    to_parent = context.Queue()
    coordinator = context.Process(
        target=_coordinator,
        args=(settings, pem, codec_name, numel, tickets, threads, to_parent),
    )
    coordinator.start()
    try:
        kind, address = to_parent.get(timeout=JOIN_S)
        assert kind == "ready"
        per_island = _run_islands(
            _island,
            n,
            lambda rank: (
                address,
                [t[rank].to_bytes() for t in tickets],
                codec_name,
                numel,
                pem[0] if pem else None,
            ),
        )
        kind, base_kb, peak_kb, failures, refusals = to_parent.get(timeout=JOIN_S)
        if failures or refusals:
            raise RuntimeError(f"data plane rounds failed: {failures} {refusals}")
    finally:
        coordinator.join(timeout=60)
        if coordinator.is_alive():
            coordinator.kill()
    memory = {
        "coordinator_base_kb": base_kb,
        "coordinator_peak_kb": peak_kb,
        "island_base_kb": max(base for _, base, _ in per_island),
        "island_peak_kb": max(peak for _, _, peak in per_island),
        "island_share_kb": max(peak - base for _, base, peak in per_island),
    }
    slowest = [max(times[r] for times, _, _ in per_island) for r in range(rounds)]
    return slowest, memory


# --- raw TCP: the same bytes, the same pattern (bench/transports.py) ---------------------------


def _tcp_island(rank: int, nbytes: int, port: int, rounds: int, barrier: Any, results: Any) -> None:
    payload = os.urandom(nbytes)
    answer = memoryview(bytearray(nbytes))
    times = []
    with socket.create_connection((HOST, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            barrier.wait()
            start = time.perf_counter()
            sock.sendall(payload)
            got = 0
            while got < nbytes:
                got += sock.recv_into(answer[got:], nbytes - got)
            times.append(time.perf_counter() - start)
    results.put((rank, times, 0, 0))


def measure_raw_tcp(nbytes: int, n: int, rounds: int) -> list[float]:
    server = socket.create_server((HOST, 0))
    port = server.getsockname()[1]

    def serve() -> None:
        connections = [server.accept()[0] for _ in range(n)]
        buffers = [memoryview(bytearray(nbytes)) for _ in range(n)]
        everyone = threading.Barrier(n)

        def handle(index: int) -> None:
            sock, view = connections[index], buffers[index]
            for _ in range(rounds):
                got = 0
                while got < nbytes:
                    got += sock.recv_into(view[got:], nbytes - got)
                everyone.wait()  # the mean exists once every payload is in
                sock.sendall(view)

        handlers = [threading.Thread(target=handle, args=(i,)) for i in range(n)]
        for handler in handlers:
            handler.start()
        for handler in handlers:
            handler.join()
        for sock in connections:
            sock.close()

    serving = threading.Thread(target=serve, daemon=True)
    serving.start()
    per_island = _run_islands(_tcp_island, n, lambda rank: (nbytes, port, rounds))
    serving.join(timeout=60)
    server.close()
    return [max(times[r] for times, _, _ in per_island) for r in range(rounds)]


# --- memcpy ---------------------------------------------------------------------------------------


def measure_memcpy(nbytes: int, rounds: int) -> list[float]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    dst = empty(nbytes, torch.uint8, _CPU)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    torch.set_num_threads(before)
    return times


# --- running islands --------------------------------------------------------------------------


def _run_islands(target: Any, n: int, args_of: Any) -> list[tuple[list[float], int, int]]:
    context = mp.get_context("spawn")
    results = context.Queue()
    barrier = context.Barrier(n)
    processes = [
        context.Process(target=target, args=(rank, *args_of(rank), barrier, results))
        for rank in range(n)
    ]
    for process in processes:
        process.start()
    collected: dict[int, tuple[list[float], int, int]] = {}
    try:
        while len(collected) < n:
            rank, times, base, peak = results.get(timeout=JOIN_S)
            collected[rank] = (times, base, peak)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    return [collected[rank] for rank in range(n)]


def _median(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def _row(numel: int, n: int, codec_name: str, args: argparse.Namespace, pem: Any) -> str:
    rounds = args.reps + 1
    settings = DataPlaneConfig(
        chunk_bytes=args.chunk_bytes, socket_buffer_bytes=args.socket_buffer_bytes
    )
    payload_bytes = build_codec(codec_name).payload_bytes(numel)
    tls_times, memory = measure_dataplane(
        numel, codec_name, n, rounds, pem, settings, args.coordinator_threads
    )
    plain_times, _ = measure_dataplane(
        numel, codec_name, n, rounds, None, settings, args.coordinator_threads
    )
    tcp_s = _median(measure_raw_tcp(payload_bytes, n, rounds))
    copy_s = _median(measure_memcpy(payload_bytes, rounds))
    tls_s, plain_s = _median(tls_times), _median(plain_times)
    kb = payload_bytes / 1024
    coord_whole = memory["coordinator_peak_kb"] / kb
    coord_share = (memory["coordinator_peak_kb"] - memory["coordinator_base_kb"]) / kb
    island_whole = memory["island_peak_kb"] / kb
    island_share = memory["island_share_kb"] / kb
    return (
        f"| {numel / 1e6:g}M | {n} | {codec_name} | {payload_bytes / 1e6:.1f} | {tls_s:.3f} "
        f"| {plain_s:.3f} | {tcp_s:.3f} | {tls_s / tcp_s:.2f}x | {plain_s / tcp_s:.2f}x "
        f"| {copy_s:.4f} | {coord_whole:.2f}x / {coord_share:.2f}x "
        f"| {island_whole:.2f}x / {island_share:.2f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[25e6, 124e6])
    parser.add_argument("--islands", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--codecs", nargs="+", default=["none", "int8"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--chunk-bytes", type=int, default=4 << 20)
    parser.add_argument("--socket-buffer-bytes", type=int, default=0)
    parser.add_argument(
        "--coordinator-threads", type=int, default=0, help="torch threads (0: torch's default)"
    )
    args = parser.parse_args()
    print(
        f"# one round through the data plane on loopback; {os.cpu_count()} cores; median of "
        f"{args.reps} after a warm-up; chunk {args.chunk_bytes} B, socket buffers "
        f"{args.socket_buffer_bytes} B"
    )
    print("# peak RSS over the payload: whole process / the data plane's share (see docstring)")
    print()
    print(
        "| elements | islands | codec | payload MB | data plane TLS s | plaintext s | raw TCP s "
        "| TLS / TCP | plain / TCP | memcpy s | coordinator RSS | island RSS |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as directory:
        cert, key = self_signed_pair(Path(directory))
        pem = (str(cert), str(key))
        for size in args.sizes:
            for n in args.islands:
                for codec_name in args.codecs:
                    print(_row(int(size), n, codec_name, args, pem), flush=True)


if __name__ == "__main__":
    main()
