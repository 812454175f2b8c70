"""What each codec costs in model quality: the demo model, 4 local islands, H = 50.

Runs `configs/demo.yaml` once per codec (fp4 and topk with and without error feedback) and
prints final val loss relative to `none` and the payload bytes per round per island.

    python bench/codec_quality.py [--out runs/codec-quality] [--only int8 fp4+ef ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from diloco.config import load_config
from islands.island import run_island

VARIANTS: dict[str, list[str]] = {
    "none": ["outer.codec=none"],
    "fp16": ["outer.codec=fp16"],
    "bf16": ["outer.codec=bf16"],
    "int8": ["outer.codec=int8"],
    "fp8": ["outer.codec=fp8"],
    "fp4": ["outer.codec=fp4"],
    "fp4+ef": ["outer.codec=fp4", "outer.error_feedback=true"],
    "topk10": ["outer.codec=topk", "outer.topk_fraction=0.1"],
    "topk10+ef": ["outer.codec=topk", "outer.topk_fraction=0.1", "outer.error_feedback=true"],
}


def run_variant(name: str, config_path: str, out: Path) -> dict[str, Any]:
    result_file = out / name / "summary.json"
    if result_file.is_file():  # finished earlier: reuse (delete the folder to rerun)
        return json.loads(result_file.read_text())
    config = load_config(
        config_path,
        [*VARIANTS[name], f"run.dir={out / name}", "run.progress=none", "eval.every=0"],
    )
    return run_island(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="runs/codec-quality")
    parser.add_argument("--only", nargs="*", default=None, choices=list(VARIANTS))
    args = parser.parse_args()
    out = Path(args.out)
    names = args.only or list(VARIANTS)
    summaries = {name: run_variant(name, args.config, out) for name in names}
    base = summaries.get("none") or run_variant("none", args.config, out)
    print("| codec | final val loss | vs none | payload MB / round / island | bytes vs fp32 |")
    print("| --- | --- | --- | --- | --- |")
    for name, s in summaries.items():
        per_round = s["bytes_sent"] / s["rounds"]
        base_round = base["bytes_sent"] / base["rounds"]
        rel = 100 * (s["val_loss"] / base["val_loss"] - 1)
        print(
            f"| {name} | {s['val_loss']:.4f} | {rel:+.2f}% | {per_round / 1e6:.3f} | "
            f"{per_round / base_round:.3f} |"
        )


if __name__ == "__main__":
    main()
