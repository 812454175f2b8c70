"""DiLoCo against its baselines at the demo's scale, on this machine's CPU.

Runs, with the model, data and schedule of configs/demo.yaml:
  diloco        4 local islands, H = 50 (the demo itself)
  ddp-4x-batch  one process, 4x the batch, as many steps as one island: what DDP with 4
                workers computes (plain AdamW: outer lr 1, momentum 0)
  1-island-4x   one island, plain AdamW, the same total tokens as the 4 islands together
  1-island      one island alone with one island's budget (plain AdamW)
and prints a Markdown table: final val loss, tokens, bytes each island sends.

    python bench/baselines.py [--out runs/baselines] [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diloco.config import load_config
from diloco.transports import ring_allreduce_bytes
from islands.island import run_island

PLAIN_ADAMW = ["outer.lr=1.0", "outer.momentum=0.0", "outer.nesterov=false"]


def variants(rounds: int, batch: int) -> dict[str, list[str]]:
    return {
        "diloco": [f"outer.rounds={rounds}"],
        "ddp-4x-batch": [
            "transport.islands=1",
            f"outer.rounds={rounds}",
            f"data.batch_size={4 * batch}",
            *PLAIN_ADAMW,
        ],
        "1-island-4x": ["transport.islands=1", f"outer.rounds={4 * rounds}", *PLAIN_ADAMW],
        "1-island": ["transport.islands=1", f"outer.rounds={rounds}", *PLAIN_ADAMW],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="runs/baselines")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    batch = load_config(args.config).data.batch_size
    results = {}
    for name, overrides in variants(args.rounds, batch).items():
        if args.only and name not in args.only:
            continue
        config = load_config(
            args.config,
            [*overrides, f"run.dir={args.out}/{name}", "run.progress=none", "eval.every=0"],
        )
        start = time.perf_counter()
        summary = run_island(config)
        summary["wall_s"] = round(time.perf_counter() - start, 1)
        summary.pop("config")
        summary["batch_size"] = config.data.batch_size
        summary["ddp4_bytes"] = summary["inner_steps"] * ring_allreduce_bytes(
            4 * summary["shared_parameters"], 4
        )
        results[name] = summary
        print(f"{name}: val {summary['val_loss']:.4f} in {summary['wall_s']} s", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    ddp = results.get("ddp-4x-batch")
    print(
        "\n| run | islands | batch/island | steps/island | tokens (all) | val loss | "
        "vs DDP | MB sent/island | DDP MB/island (4 workers, same steps) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, s in results.items():
        rel = f"{100 * (s['val_loss'] / ddp['val_loss'] - 1):+.2f}%" if ddp else "-"
        print(
            f"| {name} | {s['islands']} | {s['batch_size']} | {s['inner_steps']} | "
            f"{s['tokens_all_islands']:,} | {s['val_loss']:.4f} | {rel} | "
            f"{s['bytes_sent'] / 1e6:.1f} | {s['ddp4_bytes'] / 1e6:.1f} |"
        )


if __name__ == "__main__":
    main()
