"""Inner-loop throughput: DiLoCo's island runtime next to a plain PyTorch loop, same run.

Both train the same model on the same batches with AdamW (fused on a GPU), bf16 autocast on a
GPU, gradient clipping 1.0. `ours` is `run_island` with one local island (its compute_s leaves
out sync and evaluation); `plain` is a bare loop written here. The ratio is what the
framework costs (or saves) per inner step.

    python bench/inner_throughput.py [--config configs/demo.yaml] [--steps 200] [key=value ...]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from diloco.config import load_config
from diloco.data import build_data_sources
from diloco.metrics import read_metrics
from diloco.models import build_model
from islands.island import run_island


def plain_tokens_per_s(config, steps: int, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    torch.manual_seed(config.run.seed)
    model = build_model(config.model, context=config.data.seq_len).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.inner.lr, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    source = build_data_sources(
        config.data, islands=[0], num_islands=1, seed=0, vocab_size=config.model.vocab_size
    )[0]
    bf16 = device.type == "cuda"
    warmup = max(3, steps // 10)
    tokens = 0
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, tokens = time.perf_counter(), 0
        batch = source.next_batch()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch.inputs.to(device, non_blocking=True))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch.num_tokens
    loss.item()  # waits for the device
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    inner_steps = max(1, args.steps // 4)
    config = load_config(
        args.config,
        [
            "transport.kind=local",
            "transport.islands=1",
            f"outer.inner_steps={inner_steps}",
            "outer.rounds=5",  # the first round warms up and is left out, as plain's warm-up
            "run.dir=runs/bench-inner",
            "run.resume=false",
            "run.progress=none",
            "eval.every=0",
            "eval.batches=1",
            *args.overrides,
        ],
    )
    summary = run_island(config)
    device = torch.device(summary["device"])
    rows = read_metrics(Path(summary["run_dir"]) / "metrics.jsonl")[1:]
    ours = sum(r["tokens"] - p["tokens"] for p, r in zip(rows, rows[1:], strict=False)) / sum(
        r["compute_s"] for r in rows[1:]
    )
    plain = plain_tokens_per_s(config, args.steps, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"\ndevice: {device} ({name or platform.machine()}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"model: {summary['shared_parameters']:,} parameters, batch "
        f"{config.data.batch_size} x {config.data.seq_len}"
    )
    print("| loop | tokens/s | ratio to plain |")
    print("| --- | --- | --- |")
    print(f"| plain PyTorch AdamW | {plain:,.0f} | 1.00 |")
    print(f"| diloco island inner loop | {ours:,.0f} | {ours / plain:.2f} |")


if __name__ == "__main__":
    main()
