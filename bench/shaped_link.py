"""The grpc transport over a shaped link: sync time per round against bytes / bandwidth.

Needs root (it creates two network namespaces joined by a veth pair). The coordinator runs in
one namespace; the islands share the other, like sites behind one uplink. Each direction of
the link is limited to `--mbit` by a token-bucket filter (`tc tbf`). A `--delay-ms` is added
with `tc netem` where the kernel has it (the sandbox this was written on has no sch_netem: the
figures in docs/results/transports.md are bandwidth-limited only).

Each island is a real `diloco-island` process training a GPT of about `--params` parameters
(TLS and the run token on); `sync_s` is read from its metrics.jsonl (the outer sync: encode,
upload, the coordinator's average, download, decode, outer step). The prediction for a round
is the bytes of the round through the shared link divided by its bandwidth: the uploads must all
be in before the mean exists, so the downloads follow them rather than overlap:
islands x (payload + mean) / bandwidth.

    sudo python bench/shaped_link.py [--mbit 100] [--delay-ms 25] [--codecs none int8]
                                     [--islands 2] [--rounds 4]

`--streaming P TAU` instead compares, for each codec in the same run, blocking DiLoCo with
Streaming DiLoCo (`outer.fragments=P outer.overlap_steps=TAU`) at `--inner-steps` H: the
islands' compute utilization (inner-step time over the round's wall time, the lowest island's,
median over the rounds between the first and the last) and the peak bytes one sync event puts
on the link.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COORD_NS, SITES_NS = "diloco-coord", "diloco-sites"
COORD_IP, SITES_IP = "10.77.0.1", "10.77.0.2"
TOKEN = "shaped-link-token-0123456789abcdef"
# ~24M parameters: 12 d^2 per layer, 6 layers of d = 576.
MODEL = ["model.n_layer=6", "model.d_model=576", "model.n_head=8"]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def make_link(mbit: float, delay_ms: float) -> bool:
    """Two namespaces and a shaped veth pair; returns whether the delay could be added."""
    remove_link()
    sh("ip", "netns", "add", COORD_NS)
    sh("ip", "netns", "add", SITES_NS)
    sh("ip", "link", "add", "dl-coord", "type", "veth", "peer", "name", "dl-sites")
    delayed = True
    for ns, dev, ip in ((COORD_NS, "dl-coord", COORD_IP), (SITES_NS, "dl-sites", SITES_IP)):
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        rate = f"{mbit}mbit"
        netem = sh(
            "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem",
            "delay", f"{delay_ms}ms", "rate", rate, "limit", "100000", check=False,
        )  # fmt: skip
        if netem.returncode != 0:
            delayed = False
            sh(
                "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                "rate", rate, "burst", "64kb", "latency", "400ms",
            )  # fmt: skip
    return delayed


def remove_link() -> None:
    for ns in (COORD_NS, SITES_NS):
        sh("ip", "netns", "del", ns, check=False)


def run_group(
    codec: str,
    islands: int,
    rounds: int,
    work: Path,
    extra: tuple[str, ...] = (),
    inner_steps: int = 2,
    name: str = "",
) -> tuple[list[float], float, float]:
    """Coordinator + islands for `rounds` rounds; the islands' sync_s of each round after the
    first (the first includes joining and the state download)."""
    name = name or codec
    cli = str(Path(sys.executable).parent / "diloco-island")
    common = [
        "--config", "configs/demo.yaml", *MODEL,
        "data.batch_size=1", "data.seq_len=32", "eval.batches=1", "eval.every=0",
        "run.progress=none", "run.device=cpu", "run.threads=1", "run.checkpoint_every=0",
        f"run.dir={work / name}", f"outer.rounds={rounds}", f"outer.inner_steps={inner_steps}",
        f"outer.codec={codec}", "transport.kind=grpc", f"transport.islands={islands}",
        f"transport.grpc.address={COORD_IP}:50051", "transport.grpc.insecure=true",
        "transport.grpc.deadline_floor_s=300", *extra,
    ]  # fmt: skip
    env = {**os.environ, "DILOCO_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    coordinator = subprocess.Popen(
        ["ip", "netns", "exec", COORD_NS, cli, *common, "transport.grpc.role=coordinator"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(3)
    sites = [
        subprocess.Popen(
            ["ip", "netns", "exec", SITES_NS, cli, *common, f"transport.rank={rank}"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(islands)
    ]
    for process in [*sites, coordinator]:
        _, stderr = process.communicate(timeout=3600)
        if process.returncode != 0:
            raise RuntimeError(f"a process failed:\n{stderr}")
    sync = []
    for rank in range(islands):
        rows = (work / name / f"island-{rank}" / "metrics.jsonl").read_text().splitlines()
        sync.append([_waited_share(json.loads(row)) for row in rows] if extra else
                    [json.loads(row)["sync_s"] for row in rows])  # fmt: skip
    summary = json.loads((work / name / "island-0" / "summary.json").read_text())
    payload = summary["bytes_sent"] / rounds
    mean = summary["bytes_received"] / rounds
    print(f"  {codec}: {summary['shared_parameters']:,} parameters, {payload / 1e6:.1f} MB")
    return [max(per_round) for per_round in zip(*sync, strict=True)][1:], payload, mean


def _waited_share(row: dict[str, float]) -> float:
    """1 - compute utilization of a round: streaming rows carry it, blocking ones have the
    inner phase (compute_s) and the sync (sync_s)."""
    if "compute_utilization" in row:
        return 1.0 - float(row["compute_utilization"])
    return float(row["sync_s"]) / (float(row["compute_s"]) + float(row["sync_s"]))


def compare_streaming(args: argparse.Namespace, work: Path) -> None:
    """Blocking against streaming, each codec, in the same run: utilization and peak bytes."""
    fragments, overlap = args.streaming
    stream = ("outer.fragments=" + str(fragments), "outer.overlap_steps=" + str(overlap),
              "outer.mix=0.5", "outer.warmup_rounds=0")  # fmt: skip
    rows = []
    for codec in args.codecs:
        for variant, extra in (("blocking", ("outer.warmup_rounds=0",)), ("streaming", stream)):
            waited, payload, _ = run_group(
                codec, args.islands, args.rounds, work, extra, args.inner_steps,
                name=f"{codec}-{variant}",
            )  # fmt: skip
            peak = payload / (fragments if variant == "streaming" else 1)
            # Steady rounds: the last one of a streaming run also waits for the exchanges
            # still in flight when training ends (no compute is left to hide them behind).
            steady = waited[:-1] if len(waited) > 1 else waited
            rows.append((codec, variant, 1.0 - statistics.median(steady), peak))
    print()
    print("| codec | sync | H | compute utilization (median) | peak MB per sync event |")
    print("| --- | --- | --- | --- | --- |")
    for codec, variant, utilization, peak in rows:
        label = variant if variant == "blocking" else f"P = {fragments}, tau = {overlap}"
        print(f"| {codec} | {label} | {args.inner_steps} | {utilization:.1%} | {peak / 1e6:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mbit", type=float, default=100.0)
    parser.add_argument("--delay-ms", type=float, default=25.0)
    parser.add_argument("--codecs", nargs="+", default=["none", "int8"])
    parser.add_argument("--islands", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--streaming", type=int, nargs=2, metavar=("P", "TAU"))
    parser.add_argument("--inner-steps", type=int, default=2, help="H")
    args = parser.parse_args()
    if shutil.which("tc") is None or os.geteuid() != 0:
        sys.exit("needs root and iproute2 (ip, tc)")
    delayed = make_link(args.mbit, args.delay_ms)
    work = Path(tempfile.mkdtemp(prefix="shaped-link-"))
    shape = f"{args.mbit:g} Mbit/s" + (f", {args.delay_ms:g} ms each way" if delayed else "")
    print(f"# grpc over a shaped link ({shape}; netem delay {'on' if delayed else 'unavailable'})")
    rows = []
    try:
        if args.streaming:
            compare_streaming(args, work)
            return
        for codec in args.codecs:
            sync, payload, mean = run_group(codec, args.islands, args.rounds, work)
            predicted = args.islands * (payload + mean) * 8 / (args.mbit * 1e6)
            rows.append((codec, payload, statistics.median(sync), predicted))
    finally:
        remove_link()
    print()
    print("| codec | payload MB | islands | sync s (median) | bytes / bandwidth s | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for codec, payload, sync_s, predicted in rows:
        print(
            f"| {codec} | {payload / 1e6:.1f} | {args.islands} | {sync_s:.2f} | {predicted:.2f} "
            f"| {sync_s / predicted:.2f}x |"
        )


if __name__ == "__main__":
    main()
