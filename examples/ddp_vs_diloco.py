"""DDP against DiLoCo: the same model, data and tokens, trained three ways, in one command.

  ddp         k processes, torch DistributedDataParallel (gloo), gradients all-reduced every
              step; each process draws from the shard island i of DiLoCo draws from
  diloco      k islands, one process each (`transport.kind: torch`), H inner steps per round
  one-island  one island alone with one island's budget: plain AdamW, no communication

All three use the config's model, data, inner AdamW and schedule; DDP and DiLoCo train the same
tokens (k x batch per step, for rounds x H steps). Writes results.json, table.md, and two plots
(val loss against tokens; val loss against bytes sent per island, log x) under --out.

    python examples/ddp_vs_diloco.py [--quick] [--out DIR] [--islands 4] [--inner-steps 50]
        [--rounds 20] [--codec none] [key=value ...]
    python examples/ddp_vs_diloco.py --gpu [...]

`--gpu` runs on one CUDA device: DDP is the k x batch single-process run it is equivalent to,
the islands are simulated in one process (`transport.kind: local`), and a bare PyTorch loop of
the same model gives the tokens/s the DiLoCo inner loop is compared with, plus the MFU.
Without CUDA it exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
from torch.nn.parallel import DistributedDataParallel

from diloco.codecs import build_codec
from diloco.config import IslandConfig, load_config
from diloco.data import build_data_sources
from diloco.inner import InnerTrainer
from diloco.metrics import read_metrics
from diloco.models import build_model
from diloco.transports import ring_allreduce_bytes
from islands.island import run_island

# Plain AdamW through the island runtime: one island, outer step = adopt the local weights.
PLAIN_ADAMW = ("outer.lr=1.0", "outer.momentum=0.0", "outer.nesterov=false")
# A 2-layer, width-64 GPT on short windows: the whole comparison in about a minute on 2 cores.
QUICK = (
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=64",
    "data.seq_len=64",
    "eval.batches=4",
)
# A GPT of about 25M parameters (8 layers, width 512) for a few minutes on one GPU.
GPU_MODEL = ("model.n_layer=8", "model.n_head=8", "model.d_model=512", "data.seq_len=512")
# Dense bf16 peak of the GPUs we expect to see (vendor data sheets, SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Setting:
    config: Path
    islands: int
    inner_steps: int
    rounds: int
    codec: str
    out: Path
    overrides: tuple[str, ...]


def config_for(setting: Setting, name: str, extra: tuple[str, ...] = ()) -> IslandConfig:
    return load_config(
        setting.config,
        [
            f"transport.islands={setting.islands}",
            f"outer.inner_steps={setting.inner_steps}",
            f"outer.rounds={setting.rounds}",
            f"outer.codec={setting.codec}",
            "eval.every=1",
            "run.resume=false",
            "run.progress=none",
            "run.checkpoint_every=0",
            *setting.overrides,
            *extra,
            f"run.dir={setting.out / name}",
        ],
    )


# --- DDP: k processes, every step all-reduced ---------------------------------------------


class CommMeter:
    """What DDP's gradient all-reduces cost this process: seconds and bytes on the wire."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.seconds = 0.0
        self.bytes_sent = 0


def timed_allreduce(meter, bucket):  # type: ignore[no-untyped-def]
    # No annotations: DDP checks them against the real classes, and this module's are strings.
    # DDP's default hook, made synchronous so its time can be measured: on a CPU the gloo
    # all-reduce competes with backward for the same cores anyway.
    start = time.perf_counter()
    grads = bucket.buffer().div_(meter.world_size)
    dist.all_reduce(grads)
    meter.seconds += time.perf_counter() - start
    meter.bytes_sent += ring_allreduce_bytes(grads.numel() * grads.element_size(), meter.world_size)
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(grads)
    return done


def ddp_worker(rank: int, setting: Setting, port: int) -> None:
    config = config_for(setting, "ddp")
    torch.set_num_threads(max(1, config.run.threads))
    k = setting.islands
    store = dist.TCPStore("127.0.0.1", port, world_size=k, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=k)
    torch.manual_seed(config.run.seed)  # the same initial weights as the islands'
    model = build_model(config.model, context=config.data.seq_len)
    ddp = DistributedDataParallel(model)
    meter = CommMeter(k)
    ddp.register_comm_hook(meter, timed_allreduce)
    steps = setting.rounds * setting.inner_steps
    trainer = InnerTrainer(ddp, config.inner, steps, torch.device("cpu"))
    source = build_data_sources(
        config.data, islands=[rank], num_islands=k, seed=config.run.seed,
        vocab_size=config.model.vocab_size,
    )[0]  # fmt: skip
    val_batches = [b.inputs for b in source.val_batches(config.eval.batches)]
    rows, tokens, train_s = [], 0, 0.0
    for step in range(1, steps + 1):
        begin = time.perf_counter()
        batch = source.next_batch()
        trainer.train_step(batch.inputs)
        train_s += time.perf_counter() - begin
        tokens += batch.num_tokens
        if step % setting.inner_steps == 0:  # evaluate where DiLoCo's rounds end
            rows.append(
                {
                    "inner_step": step,
                    "tokens": tokens,
                    "val_loss": trainer.evaluate(val_batches),
                    "bytes_sent": meter.bytes_sent,
                    "train_s": train_s,
                    "comm_s": meter.seconds,
                }
            )
    out = Path(config.run.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def diloco_worker(rank: int, setting: Setting, port: int) -> None:
    config = config_for(setting, "diloco", ("transport.kind=torch", f"transport.rank={rank}"))
    store = dist.TCPStore("127.0.0.1", port, world_size=setting.islands, is_master=False)
    run_island(config, store=store)


def spawn_group(worker: Any, setting: Setting) -> float:
    """Run `worker(rank, setting, port)` in k spawned processes; returns the wall-clock.

    This process owns the rendezvous store (port chosen by the OS); a failing child stops the
    others and its error is raised here (torch.multiprocessing.spawn).
    """
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    start = time.perf_counter()
    torch_mp.spawn(worker, args=(setting, store.port), nprocs=setting.islands, join=True)
    return time.perf_counter() - start


def run_ddp(setting: Setting) -> dict[str, Any]:
    wall_s = spawn_group(ddp_worker, setting)
    rows = json.loads((setting.out / "ddp" / "rank-0.json").read_text())
    last = rows[-1]
    return {
        "workers": setting.islands,
        "steps_per_worker": last["inner_step"],
        "tokens_all": last["tokens"] * setting.islands,
        "val_loss": last["val_loss"],
        "bytes_sent": last["bytes_sent"],
        "wall_s": wall_s,
        "comm_share": last["comm_s"] / last["train_s"],
        "curve": [{"tokens_all": r["tokens"] * setting.islands, **_point(r)} for r in rows],
    }


def run_diloco(setting: Setting) -> dict[str, Any]:
    wall_s = spawn_group(diloco_worker, setting)
    return _from_run_dir(setting.out / "diloco" / "island-0", setting.islands, wall_s)


def run_one_island(setting: Setting, name: str = "one-island", extra: tuple[str, ...] = ()):
    config = config_for(setting, name, ("transport.islands=1", *PLAIN_ADAMW, *extra))
    start = time.perf_counter()
    run_island(config)
    return _from_run_dir(Path(config.run.dir), 1, time.perf_counter() - start)


def _from_run_dir(run_dir: Path, workers: int, wall_s: float) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["val_loss"] is not None]
    return {
        "workers": workers,
        "steps_per_worker": summary["inner_steps"],
        "tokens_all": summary["tokens_all_islands"],
        "val_loss": summary["val_loss"],
        "bytes_sent": summary["bytes_sent"],
        "wall_s": wall_s,
        "comm_share": summary["sync_s"] / max(1e-9, summary["sync_s"] + summary["compute_s"]),
        "inner_tokens_per_s": summary["inner_tokens_per_s"],
        "curve": [{"tokens_all": r["tokens"] * workers, **_point(r)} for r in rows],
    }


def _point(row: dict[str, Any]) -> dict[str, Any]:
    return {"val_loss": row["val_loss"], "bytes_sent": row["bytes_sent"]}


# --- what the bytes should be ---------------------------------------------------------------


def predicted_bytes_ratio(setting: Setting, numel: int, transport: str) -> float:
    """DDP's bytes per worker over DiLoCo's per island, from H, the codec and the transport.

    DDP all-reduces 4 * numel fp32 bytes at every step (ring share 2 (k - 1) / k). DiLoCo sends
    one payload per round: all-reduced the same way for fp32 (codec none) or by the local
    transport's count; broadcast to the k - 1 others for a compressed codec on torch.
    """
    k = setting.islands
    codec = build_codec(setting.codec)
    payload = codec.payload_bytes(numel)
    if transport == "torch" and setting.codec != "none":
        per_round = (k - 1) * payload
    else:
        per_round = ring_allreduce_bytes(payload, k)
    ddp_per_step = ring_allreduce_bytes(4 * numel, k)
    return setting.inner_steps * ddp_per_step / per_round


# --- GPU: DDP as the k x batch run, islands simulated, throughput and MFU ----------------------


def plain_tokens_per_s(config: IslandConfig, steps: int, device: torch.device) -> float:
    """A bare PyTorch loop of the same model and batch: AdamW (fused), bf16 autocast, clip."""
    torch.manual_seed(config.run.seed)
    model = build_model(config.model, context=config.data.seq_len).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.inner.lr, fused=True)
    source = build_data_sources(
        config.data, islands=[0], num_islands=1, seed=0, vocab_size=config.model.vocab_size
    )[0]
    warmup = max(5, steps // 10)
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            start, tokens = time.perf_counter(), 0
        batch = source.next_batch()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch.inputs.to(device, non_blocking=True))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.inner.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch.num_tokens
    torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def flops_per_token(config: IslandConfig, numel: int) -> float:
    """6 N for the matrix products, plus attention's 12 L d T for the built-in GPT (nanoGPT)."""
    attention = 0.0
    if config.model.name == "gpt":
        attention = 12 * config.model.n_layer * config.model.d_model * config.data.seq_len
    return 6 * numel + attention


def run_gpu(setting: Setting) -> dict[str, Any]:
    k = setting.islands
    probe = config_for(setting, "probe")
    # k x the batch, 1/k of the validation batches: the same validation windows as the islands'.
    kx_batch = (f"data.batch_size={k * probe.data.batch_size}",)
    kx_batch += (f"eval.batches={max(1, probe.eval.batches // k)}",)
    runs = {
        "ddp": run_one_island(setting, "ddp-kx-batch", kx_batch),
        "diloco": None,
        "one-island": run_one_island(setting),
    }
    config = config_for(setting, "diloco", ("transport.kind=local",))
    start = time.perf_counter()
    run_island(config)
    runs["diloco"] = _from_run_dir(Path(config.run.dir), k, time.perf_counter() - start)
    numel = sum(p.numel() for p in build_model(config.model, config.data.seq_len).parameters())
    ddp = runs["ddp"]
    ddp["bytes_sent"] = ddp["steps_per_worker"] * ring_allreduce_bytes(4 * numel, k)
    ddp["workers"] = k  # what it computes; its bytes are those k DDP workers would send
    plain = plain_tokens_per_s(config, 200, torch.device("cuda"))
    name = torch.cuda.get_device_name()
    peak = next((v for key, v in PEAK_BF16_FLOPS.items() if key in name), None)
    inner = runs["diloco"]["inner_tokens_per_s"]
    return {
        "runs": runs,
        "numel": numel,
        "throughput": {
            "device": name,
            "plain_tokens_per_s": plain,
            "diloco_inner_tokens_per_s": inner,
            "ratio": inner / plain,
            "mfu": None if peak is None else inner * flops_per_token(config, numel) / peak,
            "peak_flops": peak,
        },
    }


# --- the report -------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    runs = results["runs"]
    ddp = runs["ddp"]
    lines = [
        "| run | workers | steps / worker | tokens (all) | final val loss | vs DDP | "
        "wall-clock s | MB sent / worker | DDP bytes ÷ these | time communicating |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in runs.items():
        ratio = f"{ddp['bytes_sent'] / run['bytes_sent']:,.1f}×" if run["bytes_sent"] else "—"
        lines.append(
            f"| {name} | {run['workers']} | {run['steps_per_worker']:,} | "
            f"{run['tokens_all']:,} | {run['val_loss']:.4f} | "
            f"{100 * (run['val_loss'] / ddp['val_loss'] - 1):+.1f}% | {run['wall_s']:.0f} | "
            f"{run['bytes_sent'] / 1e6:,.1f} | {ratio} | {100 * run['comm_share']:.1f}% |"
        )
    throughput = results.get("throughput")
    if throughput:
        mfu = throughput["mfu"]
        lines += [
            "",
            f"{throughput['device']}: DiLoCo inner loop "
            f"{throughput['diloco_inner_tokens_per_s']:,.0f} tokens/s, plain PyTorch loop "
            f"{throughput['plain_tokens_per_s']:,.0f} tokens/s "
            f"({throughput['ratio']:.2f}×), MFU "
            + ("unknown (peak FLOPs of this GPU not listed)" if mfu is None else f"{mfu:.1%}"),
        ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """Two PNGs; none (and a note on stderr) when matplotlib is missing (`pip install .[dev]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.stderr.write("matplotlib is not installed: no plots\n")
        return []
    written = []
    for x_key, name, log_x in (
        ("tokens_all", "loss_vs_tokens", False),
        ("bytes_sent", "loss_vs_bytes", True),
    ):
        figure, axes = plt.subplots(figsize=(6, 4))
        for run_name, run in results["runs"].items():
            points = [p for p in run["curve"] if not log_x or p[x_key] > 0]
            if points:
                axes.plot([p[x_key] for p in points], [p["val_loss"] for p in points],
                          marker="o", markersize=3, label=run_name)  # fmt: skip
        axes.set_xscale("log" if log_x else "linear")
        axes.set_xlabel("bytes sent per worker (log)" if log_x else "tokens, all workers")
        axes.set_ylabel("validation loss (nats / token)")
        axes.legend()
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / f"{name}.png", dpi=120)
        plt.close(figure)
        written.append(f"{name}.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small GPT, 100 steps: ~1 min")
    parser.add_argument("--gpu", action="store_true", help="one CUDA device, islands simulated")
    parser.add_argument("--out", default="runs/ddp_vs_diloco")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--islands", type=int, default=4, help="k: DDP workers and islands")
    parser.add_argument("--inner-steps", type=int, default=None, help="H (default 50; quick 20)")
    parser.add_argument("--rounds", type=int, default=None, help="default 20; quick 5")
    parser.add_argument("--codec", default="none")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        sys.stderr.write("--gpu needs a CUDA device and torch sees none\n")
        return 2
    presets = (*GPU_MODEL,) if args.gpu else (*QUICK,) if args.quick else ()
    threads = () if args.gpu else ("run.threads=1", "run.device=cpu")  # k processes, 2 cores
    setting = Setting(
        config=Path(args.config),
        islands=args.islands,
        inner_steps=args.inner_steps or (20 if args.quick else 50),
        rounds=args.rounds or (5 if args.quick else 20),
        codec=args.codec,
        out=Path(args.out),
        overrides=(*presets, *threads, *args.overrides),
    )
    setting.out.mkdir(parents=True, exist_ok=True)
    if args.gpu:
        results = run_gpu(setting)
        transport = "local"
    else:
        runs = {}
        for name, run in (("ddp", run_ddp), ("diloco", run_diloco), ("one-island", run_one_island)):
            runs[name] = run(setting)
            sys.stdout.write(
                f"{name}: val {runs[name]['val_loss']:.4f}, {runs[name]['wall_s']:.0f} s\n"
            )
            sys.stdout.flush()
        config = config_for(setting, "probe")
        numel = sum(p.numel() for p in build_model(config.model, config.data.seq_len).parameters())
        results = {"runs": runs, "numel": numel}
        transport = "torch"
    results["setting"] = {
        "mode": "gpu" if args.gpu else "cpu",
        "islands": setting.islands,
        "inner_steps": setting.inner_steps,
        "rounds": setting.rounds,
        "codec": setting.codec,
        "overrides": list(setting.overrides),
        "transport": transport,
    }
    results["predicted_bytes_ratio"] = predicted_bytes_ratio(setting, results["numel"], transport)
    (setting.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report = table(results)
    (setting.out / "table.md").write_text(report)
    plots = plot(results, setting.out)
    sys.stdout.write(
        report + f"\nwritten to {setting.out}: results.json, table.md, {', '.join(plots)}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
