"""Streaming DiLoCo's quality against blocking DiLoCo at equal tokens (issue 14's acceptance).

The demo model (configs/demo.yaml: 4 local islands, H = 50, 8 rounds), each variant run to the
end with `run_island`; the table gives the final validation loss and its gap to blocking
DiLoCo with the same codec (target: P = 4, tau = 5, alpha = 0.5 within +1 %). Each variant's
summary is kept under --out and not run again (delete it to redo).

    python bench/streaming_quality.py [--out runs/streaming-quality] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from diloco.config import load_config
from islands.island import run_island

REPO = Path(__file__).resolve().parents[1]
STREAM = ["outer.fragments=4", "outer.overlap_steps=5", "outer.mix=0.5"]
VARIANTS: list[tuple[str, str, list[str]]] = [
    # (name, the blocking variant it is compared with, overrides)
    ("blocking", "blocking", []),
    ("P=4 tau=5 alpha=0.5", "blocking", STREAM),
    ("P=4 tau=5 alpha=0.5 eager", "blocking", [*STREAM, "outer.eager=true"]),
    ("P=1 tau=5 alpha=0.5", "blocking", ["outer.overlap_steps=5", "outer.mix=0.5"]),
    ("blocking fp4", "blocking fp4", ["outer.codec=fp4"]),
    ("P=4 tau=5 alpha=0.5 fp4", "blocking fp4", [*STREAM, "outer.codec=fp4"]),
    ("P=4 tau=5 alpha=0.5 eager fp4", "blocking fp4", [*STREAM, "outer.eager=true",
                                                       "outer.codec=fp4"]),
]  # fmt: skip


def run_variant(out: Path, name: str, overrides: list[str]) -> dict[str, object]:
    folder = out / name.replace(" ", "_").replace("=", "")
    done = folder / "summary.json"
    if done.exists():
        return dict(json.loads(done.read_text()))
    config = load_config(
        REPO / "configs" / "demo.yaml",
        [f"run.dir={folder}", "run.progress=none", "run.resume=false", *overrides],
    )
    begin = time.perf_counter()
    summary = run_island(config)
    summary["wall_s"] = round(time.perf_counter() - begin, 1)
    done.write_text(json.dumps(summary, default=str))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "streaming-quality")
    parser.add_argument("overrides", nargs="*", help="extra key=value for every variant")
    args = parser.parse_args()
    results = {}
    for name, _, overrides in VARIANTS:
        results[name] = run_variant(args.out, name, [*overrides, *args.overrides])
        print(f"{name}: val loss {results[name]['val_loss']}", flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch CPU, demo model\n")
    print("| variant | final val loss | vs blocking (same codec) | bytes sent per island |")
    print("| --- | --- | --- | --- |")
    for name, reference, _ in VARIANTS:
        loss = float(results[name]["val_loss"])  # type: ignore[arg-type]
        base = float(results[reference]["val_loss"])  # type: ignore[arg-type]
        gap = (loss - base) / base * 100
        sent = int(results[name]["bytes_sent"])  # type: ignore[call-overload]
        print(f"| {name} | {loss:.4f} | {gap:+.2f} % | {sent / 1e6:.1f} MB |")


if __name__ == "__main__":
    main()
