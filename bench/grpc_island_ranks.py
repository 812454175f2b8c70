"""The grpc outer sync of sites of 1 and 2 ranks side by side: bytes each rank sends and the
sync time per round (issue 13: rank r of every site exchanges only shard r).

Two sites and a standalone coordinator on loopback (TLS off, the run token on), each site a
`diloco-island` process (1 rank) or a `torchrun --nproc-per-node R` (R ranks, DDP), the
built-in GPT at the size given (default about 25M parameters), codec none. Each site trains
`--inner-steps` steps per round; the figures are the medians over rounds after the first of
`sync_s` (the island's wait for the round's mean) and each rank's bytes sent per round.

    python bench/grpc_island_ranks.py [--ranks 1 2] [--d-model 512] [--n-layer 8] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(ranks: int, args: argparse.Namespace, run_dir: Path) -> list[dict[str, object]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DILOCO_TOKEN": "bench-token-0123456789abcdef"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    common = [
        "--config", str(REPO / "configs" / "demo.yaml"),
        f"run.dir={run_dir}", "run.progress=none", "run.threads=1", "eval.every=0",
        f"model.d_model={args.d_model}", f"model.n_layer={args.n_layer}", "model.n_head=8",
        "data.batch_size=1", "data.seq_len=64", f"outer.rounds={args.rounds}",
        f"outer.inner_steps={args.inner_steps}", "transport.kind=grpc", "transport.islands=2",
        "transport.min_islands=2", f"transport.grpc.address=127.0.0.1:{_free_port()}",
        "transport.grpc.insecure=true", "transport.grpc.deadline_floor_s=600",
        "transport.grpc.linger_s=5",
    ]  # fmt: skip
    if ranks > 1:
        common.append("island.parallel=ddp")
    cli = [sys.executable, "-m", "islands"]
    coordinator = subprocess.Popen([*cli, *common, "transport.grpc.role=coordinator"], env=env)
    sites = []
    for island in (0, 1):
        site_args = [*common, f"transport.rank={island}"]
        if ranks == 1:
            command = [*cli, *site_args]
        else:
            command = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port()), "-m", "islands", *site_args,
            ]  # fmt: skip
        sites.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL))
    for site in sites:
        if site.wait(timeout=args.timeout_s) != 0:
            raise SystemExit(f"a site of {ranks} ranks failed")
    coordinator.wait(timeout=120)
    lines = (run_dir / "island-0" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=1200)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for ranks in args.ranks:
            begin = time.perf_counter()
            rows = _run(ranks, args, Path(folder) / f"ranks-{ranks}")
            results[ranks] = (rows, time.perf_counter() - begin)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, loopback, codec none; load "
          f"average at the end {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print("| ranks per site | MB sent per rank per round | MB sent per site per round | "
          "sync_s per round (median) | wall s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for ranks, (rows, wall) in results.items():
        later = rows[1:] or rows
        per_round = [
            (b["bytes_sent"] - a["bytes_sent"]) for a, b in zip(rows, rows[1:], strict=False)
        ] or [rows[0]["bytes_sent"]]
        site_mb = statistics.median(per_round) / 1e6  # type: ignore[operator]
        sync = statistics.median(float(row["sync_s"]) for row in later)  # type: ignore[arg-type]
        print(f"| {ranks} | {site_mb / ranks:.1f} | {site_mb:.1f} | {sync:.2f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
