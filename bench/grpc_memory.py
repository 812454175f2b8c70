"""Peak memory of a grpc run relative to its payload: 2 islands and a coordinator, a model of
64M fp32 parameters (256 MiB), codec none, on loopback.

Each island is a process that holds what an island holds: the model's parameters and their
gradients (a loss that touches every parameter: dense gradients, as a transformer's), the
inner loop's AdamW (`ChunkedAdamW`; `--torch-adamw`: torch's) and its two moments, and
`OuterSync` (the anchor; the pseudo-gradient, its payload and the mean during a sync) over a
`GrpcTransport`. The coordinator is a `CoordinatorServer` in a process of its own, persisting
its state every round as a real one does (its folder in a temporary directory). Per process:
the resident set after imports and setup (the baseline: torch, grpc, the server, torch's lazy
imports, no model yet), then the peak (Linux VmHWM, reset after the baseline) over `--rounds`
rounds of one inner step each; the table gives the peak over the payload, the whole
process's and above its baseline, and for an island the peaks of its two phases apart (VmHWM
reset before each): the training step (AdamW's own temporaries included: `--tensors` splits
the model) and the sync (what the outer step and the transport add). One row per path: the
data plane (transport.grpc.dataplane, the default) and the grpc stream
(dataplane.enabled=false: the path every payload took before the data plane).
`--offload-state`: the islands and the coordinator keep the outer momentum in files between
outer steps (outer.offload_state; diloco/offload.py), in the temporary directory (on a disk).

    python bench/grpc_memory.py [--numel 64e6] [--rounds 3] [--paths dataplane grpc-stream]
                                [--tensors 1] [--no-persist] [--malloc-defaults]
                                [--torch-adamw] [--offload-state]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from diloco.codecs import build_codec
from diloco.inner.chunked_adamw import ChunkedAdamW
from diloco.os_memory import return_freed_buffers_to_the_os
from diloco.outer.optimizers import SgdOuter
from diloco.outer.sync import OuterHyperparams, OuterSync
from diloco.transports.dataplane.config import DataPlaneConfig
from diloco.transports.grpc import Coordinator, CoordinatorServer, GrpcTransport, RoundRules
from diloco.transports.grpc.config import GrpcTransportConfig

TOKEN = "bench-memory-token-0123456789"
PATHS = ("dataplane", "grpc-stream")
ISLANDS = 2
MIB = 1 << 20


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def _settings(address: str, path: str) -> GrpcTransportConfig:
    dataplane = DataPlaneConfig(enabled=path == "dataplane")
    return GrpcTransportConfig(address=address, insecure=True, retry_s=600, dataplane=dataplane)


class Wide(torch.nn.Module):
    """`numel` parameters in `tensors` tensors of (nearly) equal size; the loss touches each
    (a dense gradient) through a sum, so no activation of the parameters' size exists. One
    tensor is the worst case for torch's AdamW, whose `step()` forms two temporaries of each
    parameter's size, one parameter at a time; a transformer's largest tensor is a fraction of
    it (GPT-2 small's embedding: 31 %)."""

    def __init__(self, numel: int, tensors: int = 1):
        super().__init__()
        sizes = [numel // tensors + (i < numel % tensors) for i in range(tensors)]
        self.tables = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(n)) for n in sizes)

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        total = torch.stack([table.sum() for table in self.tables]).sum()
        return (total * scale - 1.0).square()


def _coordinator(
    numel: int,
    rounds: int,
    path: str,
    folder: str | None,
    keep_malloc_defaults: bool,
    offload_state: bool,
    out: Any,
    done: Any,
) -> None:
    torch.set_num_threads(1)
    if not keep_malloc_defaults:
        return_freed_buffers_to_the_os()  # as `diloco-island` does in a coordinator process
    rules = RoundRules(run_id="memory", rounds=rounds, islands=ISLANDS, min_islands=ISLANDS)
    outer = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)
    state_dir = None if folder is None else Path(folder) / "coordinator"
    coordinator = Coordinator(
        rules,
        build_codec("none"),
        outer,
        pinned={},
        state_dir=state_dir,
        offload_state=offload_state,
    )
    server = CoordinatorServer(coordinator, _settings("127.0.0.1:0", path), TOKEN).start()
    baseline = _status_kb("VmRSS")
    _reset_peak()
    out.put(("port", server.port))
    done.wait()
    coordinator.flush()
    out.put(("coordinator", baseline, _status_kb("VmHWM"), None, None))
    server.stop(0)


def _island(
    rank: int,
    numel: int,
    tensors: int,
    torch_adamw: bool,
    rounds: int,
    path: str,
    port: int,
    offload_dir: str | None,
    out: Any,
) -> None:
    torch.set_num_threads(1)
    codec = build_codec("none")
    transport = GrpcTransport(
        _settings(f"127.0.0.1:{port}", path),
        run_id="memory",
        token=TOKEN,
        codec=codec,
        numel=numel,
        rank=rank,
        num_islands=ISLANDS,
    )
    # torch imports torch._dynamo (about 70 MiB of modules, a quarter of this payload) when
    # the process builds its first optimizer: an import, not a copy, so before the baseline.
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    baseline = _status_kb("VmRSS")
    _reset_peak()
    model = Wide(numel, tensors)
    # the island's inner optimizer (diloco/inner/trainer.py), or torch's own for comparison
    adamw = (torch.optim.AdamW if torch_adamw else ChunkedAdamW)(model.parameters(), lr=1e-3)
    outer = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)
    hyper = OuterHyperparams(inner_steps=1)
    where = None if offload_dir is None else Path(offload_dir)
    sync = OuterSync(model.parameters(), transport, codec, outer, hyper, offload_dir=where)
    transport.join([], {"model": "wide", "parameters": str(numel)})  # as an island's
    transport.shared_state(sync.shared_state())
    sync.release_offloaded_state()  # as islands/resume.py does: the seed read the momentum
    setup_peak, train_peak, sync_peak = _status_kb("VmHWM"), 0, 0
    for _ in range(rounds):  # each phase's own peak: VmHWM reset before it
        _reset_peak()
        loss = model(torch.tensor(1e-6 * (rank + 1)))
        loss.backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)  # as the inner loop does (diloco/inner/trainer.py)
        train_peak = max(train_peak, _status_kb("VmHWM"))
        _reset_peak()
        sync.sync(100.0)
        sync_peak = max(sync_peak, _status_kb("VmHWM"))
    peak = max(setup_peak, train_peak, sync_peak)
    out.put((f"island {rank}", baseline, peak, train_peak, sync_peak))
    transport.close()


Figures = tuple[int, int, int | None, int | None]
"""(baseline, peak, peak of the training steps, peak of the syncs), kB; None: not an island."""


def measure(
    numel: int,
    rounds: int,
    path: str,
    persist: bool,
    malloc_defaults: bool = False,
    tensors: int = 1,
    torch_adamw: bool = False,
    offload_state: bool = False,
) -> dict[str, Figures]:
    """process -> its figures; `persist`: the coordinator saves its state; `malloc_defaults`:
    the coordinator keeps glibc's dynamic mmap threshold (diloco/os_memory.py);
    `tensors`: how many tensors the islands' model has (`Wide`); `torch_adamw`: the islands
    step with `torch.optim.AdamW` instead of the inner loop's `ChunkedAdamW`; `offload_state`:
    the outer momentum in files between outer steps (needs `persist`: the coordinator's folder)."""
    context = mp.get_context("spawn")
    out, done = context.Queue(), context.Event()
    with tempfile.TemporaryDirectory() as folder:
        coordinator = context.Process(
            target=_coordinator,
            args=(
                numel,
                rounds,
                path,
                folder if persist else None,
                malloc_defaults,
                offload_state,
                out,
                done,
            ),
        )
        coordinator.start()
        kind, port = out.get(timeout=600)
        assert kind == "port"
        islands = [
            context.Process(
                target=_island,
                args=(
                    rank,
                    numel,
                    tensors,
                    torch_adamw,
                    rounds,
                    path,
                    port,
                    f"{folder}/island-{rank}" if offload_state else None,
                    out,
                ),
            )
            for rank in range(ISLANDS)
        ]
        for island in islands:
            island.start()
        figures = {}
        for _ in islands:
            name, *numbers = out.get(timeout=3600)
            figures[name] = tuple(numbers)
        done.set()
        name, *numbers = out.get(timeout=600)
        figures[name] = tuple(numbers)
        for process in [*islands, coordinator]:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=float, default=64e6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--tensors",
        type=int,
        default=1,
        help="the islands' model in this many equal tensors (1: the worst case for AdamW)",
    )
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument(
        "--no-persist", action="store_true", help="the coordinator keeps its state in memory only"
    )
    parser.add_argument(
        "--malloc-defaults",
        action="store_true",
        help="the coordinator keeps glibc's dynamic mmap threshold (what it did before)",
    )
    parser.add_argument(
        "--torch-adamw",
        action="store_true",
        help="the islands step with torch.optim.AdamW (two temporaries of each parameter's "
        "size) instead of the inner loop's ChunkedAdamW",
    )
    parser.add_argument(
        "--offload-state",
        action="store_true",
        help="the islands and the coordinator keep the outer momentum in files between outer "
        "steps (outer.offload_state)",
    )
    args = parser.parse_args()
    if args.offload_state and args.no_persist:
        parser.error(
            "--offload-state keeps the coordinator's momentum in its folder: drop --no-persist"
        )
    numel = int(args.numel)
    payload_mib = build_codec("none").payload_bytes(numel) / MIB
    print(
        f"# peak RSS of {ISLANDS} islands and a coordinator, {numel / 1e6:.0f}M fp32 parameters "
        f"in {args.tensors} tensor(s), {'torch.' if args.torch_adamw else 'Chunked'}AdamW, "
        f"codec none (payload {payload_mib:.0f} MiB), "
        f"outer state {'in files' if args.offload_state else 'in memory'}, "
        f"{args.rounds} rounds; loopback"
    )
    print()
    print(
        "| path | process | baseline MiB | peak MiB | peak / payload | "
        "(peak - baseline) / payload | training step: above baseline / payload | "
        "sync: above baseline / payload |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in args.paths:
        started = time.perf_counter()
        figures = measure(
            numel,
            args.rounds,
            path,
            not args.no_persist,
            args.malloc_defaults,
            args.tensors,
            args.torch_adamw,
            args.offload_state,
        )
        for name, (baseline, peak, train_peak, sync_peak) in sorted(figures.items()):
            phases = [
                "—" if kb is None else f"{(kb - baseline) / 1024 / payload_mib:.2f}x"
                for kb in (train_peak, sync_peak)
            ]
            print(
                f"| {path} | {name} | {baseline / 1024:.0f} | {peak / 1024:.0f} "
                f"| {peak / 1024 / payload_mib:.2f}x "
                f"| {(peak - baseline) / 1024 / payload_mib:.2f}x | {' | '.join(phases)} |",
                flush=True,
            )
        print(f"<!-- {path}: {time.perf_counter() - started:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
