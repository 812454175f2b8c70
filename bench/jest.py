"""JEST against uniform sampling on the noisy built-in corpus (issue #6, docs/results/jest.md).

Runs configs/jest-noisy.yaml (4 local islands, the demo's model and schedule) as:
  uniform-noisy  data.noise 0.5, every sequence trained on
  jest-noisy     data.noise 0.5, JEST keeps the most learnable half of each super-batch
  uniform-clean  data.noise 0
  jest-clean     data.noise 0
then reads each run's metrics.jsonl and prints a Markdown table: learner steps and total FLOPs
(learner + scoring on every island + the reference's training, done once per process) to
reach uniform-noisy's final clean validation loss, and the noise-0 val losses at equal steps.
Between two evaluations, steps and FLOPs are interpolated linearly in the val loss.

    python bench/jest.py [--out runs/bench-jest] [--only NAME ...] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from diloco.config import load_config
from diloco.metrics import read_metrics
from islands.island import run_island

VARIANTS = {
    "uniform-noisy": ["data.selector.name=uniform"],
    "jest-noisy": [],
    "uniform-clean": ["data.selector.name=uniform", "data.noise=0.0"],
    "jest-clean": ["data.noise=0.0"],
}


def total_flops(row: dict[str, Any], islands: int) -> float:
    """Group FLOPs so far: every island's learner and scoring, the reference's training once."""
    return islands * (row["learner_flops"] + row["scoring_flops"]) + row["reference_flops"]


def reach(rows: list[dict[str, Any]], target: float, islands: int) -> tuple[float, float] | None:
    """(inner steps, total FLOPs) at which the val loss first reaches `target`, or None."""
    evaluated = [r for r in rows if r["val_loss"] is not None]
    previous: dict[str, Any] | None = None
    for row in evaluated:
        if row["val_loss"] <= target:
            if previous is None:
                return float(row["inner_step"]), total_flops(row, islands)
            share = (previous["val_loss"] - target) / (previous["val_loss"] - row["val_loss"])
            steps = previous["inner_step"] + share * (row["inner_step"] - previous["inner_step"])
            before, after = total_flops(previous, islands), total_flops(row, islands)
            return steps, before + share * (after - before)
        previous = row
    return None


def run(name: str, config: str, out: str, extra: list[str]) -> list[dict[str, Any]]:
    overrides = [*VARIANTS[name], *extra, f"run.dir={out}/{name}", "run.progress=none"]
    begin = time.perf_counter()
    summary = run_island(load_config(config, overrides))
    print(f"{name}: val {summary['val_loss']:.4f} in {time.perf_counter() - begin:.0f} s")
    return read_metrics(Path(out) / name / "metrics.jsonl")


def table(rows: dict[str, list[dict[str, Any]]], islands: int) -> str:
    lines = []
    if "uniform-noisy" in rows:
        base = rows["uniform-noisy"]
        target = base[-1]["val_loss"]
        base_steps, base_flops = base[-1]["inner_step"], total_flops(base[-1], islands)
        lines += [
            f"noise 0.5, target: uniform's final val loss {target:.4f}",
            "",
            "| run | final val loss | kept noisy | steps to target | × uniform "
            "| total FLOPs to target | × uniform | scoring s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name in ("uniform-noisy", "jest-noisy"):
            if name not in rows:
                continue
            last = rows[name][-1]
            reached = reach(rows[name], target, islands)
            steps, flops = reached if reached else (float("nan"), float("nan"))
            lines.append(
                f"| {name} | {last['val_loss']:.4f} | {last['selected_noisy_fraction']} "
                f"| {steps:.0f} | {steps / base_steps:.2f} | {flops:.3g} "
                f"| {flops / base_flops:.2f} | {last['scoring_s']:.0f} |"
            )
    if "uniform-clean" in rows and "jest-clean" in rows:
        lines += ["", "noise 0, val loss at equal learner steps", ""]
        lines += ["| steps | uniform | jest | jest / uniform - 1 |", "| --- | --- | --- | --- |"]
        uniform = {r["inner_step"]: r["val_loss"] for r in rows["uniform-clean"]}
        for row in rows["jest-clean"]:
            if row["val_loss"] is not None and uniform.get(row["inner_step"]) is not None:
                base = uniform[row["inner_step"]]
                lines.append(
                    f"| {row['inner_step']} | {base:.4f} | {row['val_loss']:.4f} "
                    f"| {row['val_loss'] / base - 1:+.2%} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/jest-noisy.yaml")
    parser.add_argument("--out", default="runs/bench-jest")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], help="overrides for the jest runs")
    parser.add_argument("--skip-run", action="store_true", help="only read existing runs")
    args = parser.parse_args()
    islands = load_config(args.config).transport.islands
    rows = {}
    for name in VARIANTS:
        path = Path(args.out) / name / "metrics.jsonl"
        if name in args.only and not args.skip_run:
            extra = args.set if name.startswith("jest") else []
            rows[name] = run(name, args.config, args.out, extra)
        elif path.is_file():
            rows[name] = read_metrics(path)
    print(table(rows, islands))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "rows.json").write_text(json.dumps(rows) + "\n")


if __name__ == "__main__":
    main()
