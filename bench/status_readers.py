"""What concurrent status-page readers cost a grpc coordinator's rounds (issue 17).

The coordinator runs in this process as `diloco-island` runs a standalone one
(`start_coordinator`, its status page on 127.0.0.1, port 0, its state saved after every round
in a temporary run.dir). Two islands, each a spawned process with one torch thread, average
`--rounds` rounds of a `--numel` fp32 payload through it, after `--compute-ms` of inner phase
each round (a sleep by default, so that the cores are the coordinator's and the readers': what
is measured is the coordinator's own slow-down; `--busy` spins instead). Each island times its
rounds (inner phase plus average). The same run again with `--readers` threads in another
spawned process, each fetching /status.json in a loop as fast as it is answered: a flood, far
above a page refreshing every 3 s. Printed: the median and 90th percentile of the rounds' wall
time with no reader and with the readers, and what the readers got.

    python bench/status_readers.py [--readers 50] [--rounds 20] [--numel 1000000]
                                   [--compute-ms 200] [--busy]
"""

from __future__ import annotations

import argparse
import http.client
import logging
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from diloco.codecs import build_codec
from diloco.outer.optimizers import SgdOuter
from diloco.shared_state import SharedState, params_sha256
from diloco.transports.base import TransportSetup
from diloco.transports.config import TransportConfig, TransportKind
from diloco.transports.grpc import GrpcTransport
from diloco.transports.grpc.config import GrpcTransportConfig
from diloco.transports.grpc.hosting import linger_then_stop, start_coordinator

TOKEN = "bench-status-readers-token-0123456789"
FINGERPRINT = {"bench": "status_readers"}
JOIN_S = 900.0


@dataclass(frozen=True)
class Plan:
    numel: int
    rounds: int
    compute_s: float
    busy: bool


@dataclass(frozen=True)
class Readings:
    ok: int
    failed: int
    median_latency_s: float | None


def _island(rank: int, port: int, plan: Plan, run_dir: str, results: Any) -> None:
    torch.set_num_threads(1)
    codec = build_codec("none")
    settings = GrpcTransportConfig(address=f"127.0.0.1:{port}", insecure=True, retry_s=60)
    transport = GrpcTransport(
        settings,
        run_id="bench",
        token=TOKEN,
        codec=codec,
        numel=plan.numel,
        rank=rank,
        num_islands=2,
        session_file=Path(run_dir) / f"island-{rank}" / "grpc-session",
    )
    optimizer = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)
    anchor = torch.randn(plan.numel, generator=torch.Generator().manual_seed(0))
    state = SharedState(0, anchor, {"momentum": torch.zeros(plan.numel)})
    transport.join([], FINGERPRINT)
    transport.shared_state(state)
    delta = torch.randn(plan.numel, generator=torch.Generator().manual_seed(rank)) * 1e-3
    times = []
    for round in range(plan.rounds):
        begin = time.perf_counter()
        _inner_phase(plan)
        result = transport.average(codec.encode(delta), 100.0, round, params_sha256(state.anchor))
        optimizer.step_(state.anchor, result.mean, state.outer_state, round)
        times.append(time.perf_counter() - begin)
        transport.note_metrics({"round": round + 1, "tokens": 640 * (round + 1), "train_loss": 3.0})
    transport.close()
    results.put((rank, times))


def _inner_phase(plan: Plan) -> None:
    if not plan.busy:
        time.sleep(plan.compute_s)
        return
    end = time.perf_counter() + plan.compute_s
    x = torch.randn(128, 128)
    while time.perf_counter() < end:
        x = torch.tanh(x @ x)


def _readers(port: int, count: int, stop: Any, results: Any) -> None:
    ok, failed, latencies = [0], [0], []
    lock = threading.Lock()

    def read() -> None:
        while not stop.is_set():
            begin = time.perf_counter()
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request("GET", "/status.json")
                response = connection.getresponse()
                response.read()
                connection.close()
                good = response.status == 200
            except OSError:
                good = False
            with lock:
                if good:
                    ok[0] += 1
                    latencies.append(time.perf_counter() - begin)
                else:
                    failed[0] += 1

    threads = [threading.Thread(target=read, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    median = statistics.median(latencies) if latencies else None
    results.put(Readings(ok[0], failed[0], median))


def run_once(plan: Plan, readers: int) -> tuple[list[float], Readings | None]:
    """The rounds' wall times (both islands), and what the readers got (None without)."""
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="status-readers-") as run_dir:
        grpc = GrpcTransportConfig(
            address="127.0.0.1:0", insecure=True, status_listen="127.0.0.1:0"
        )
        setup = TransportSetup(
            config=TransportConfig(kind=TransportKind.grpc, islands=2, run_id="bench", grpc=grpc),
            codec=build_codec("none"),
            numel=0,
            ranks=[],
            rounds=plan.rounds,
            optimizer=SgdOuter(lr=0.7, momentum=0.9, nesterov=True),
            group_settings={},
            run_dir=Path(run_dir),
            device=torch.device("cpu"),
        )
        server = start_coordinator(setup, TOKEN)
        page = (Path(run_dir) / "coordinator" / "status-address").read_text().strip()
        page_port = int(page.rpartition(":")[2])
        results, readings = context.Queue(), context.Queue()
        stop = context.Event()
        reader = None
        if readers:
            reader = context.Process(target=_readers, args=(page_port, readers, stop, readings))
            reader.start()
        islands = [
            context.Process(target=_island, args=(rank, server.port, plan, run_dir, results))
            for rank in (0, 1)
        ]
        for island in islands:
            island.start()
        times = [results.get(timeout=JOIN_S) for _ in islands]
        for island in islands:
            island.join(JOIN_S)
        stop.set()
        got = readings.get(timeout=60) if reader is not None else None
        if reader is not None:
            reader.join(60)
        linger_then_stop(server, linger_s=10.0)  # as a coordinator ends: once all left
    # The first round includes joining and seeding: not a round's cost.
    return [t for _, island_times in times for t in island_times[1:]], got


def _line(label: str, readers: int, times: list[float], got: Readings | None) -> str:
    p90 = statistics.quantiles(times, n=10)[-1] if len(times) > 1 else times[0]
    answers = "-" if got is None else str(got.ok)
    failed = "-" if got is None else str(got.failed)
    latency = "-" if got is None or got.median_latency_s is None else (
        f"{got.median_latency_s:.3f}"
    )  # fmt: skip
    return (
        f"{label:>6} {readers:>8} {statistics.median(times):>15.3f} {p90:>12.3f} {answers:>15} "
        f"{failed:>7} {latency:>16}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--numel", type=float, default=1e6)
    parser.add_argument("--compute-ms", type=float, default=200.0)
    parser.add_argument("--busy", action="store_true", help="spin in the inner phase")
    parser.add_argument(
        "--trials", type=int, default=1, help="runs of each, alternated (a noisy machine)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the coordinator's warning about plain TCP
    plan = Plan(int(args.numel), args.rounds, args.compute_ms / 1000, args.busy)
    print(
        f"{plan.rounds} rounds of 2 islands, {plan.numel:,} fp32 values, inner phase "
        f"{args.compute_ms:.0f} ms ({'busy' if plan.busy else 'sleep'}), {torch.get_num_threads()}"
        " torch threads here"
    )
    print(f"{'trial':>6} {'readers':>8} {'median round s':>15} {'p90 round s':>12} "
          f"{'status answers':>15} {'failed':>7} {'median answer s':>16}")  # fmt: skip
    pooled: dict[int, list[float]] = {0: [], args.readers: []}
    for trial in range(1, args.trials + 1):
        for readers in (0, args.readers):
            times, got = run_once(plan, readers)
            pooled[readers] += times
            print(_line(str(trial), readers, times, got), flush=True)
    if args.trials > 1:
        for readers, times in pooled.items():
            print(_line("all", readers, times, None))


if __name__ == "__main__":
    main()
