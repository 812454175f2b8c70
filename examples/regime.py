"""The regime map: where DiLoCo pays off against DDP at equal tokens (issue 15), one command.

For one model, a grid of per-island batch (windows of data.seq_len tokens) x H x islands k x
outer setting x inner lr, every point trained with simulated islands (`transport.kind: local`:
the maths and byte counts of separate processes) for the same inner steps per island. Against
each (batch, k): the DDP-equivalent (one process, k x the batch, plain AdamW: what k DDP workers
compute) and one island alone, both on the same inner-lr grid; each kind keeps its best lr
(--diloco-lr-scale narrows DiLoCo's grid). Every point evaluates the same --eval-windows
validation windows.
Reported per point: the gap to DDP, the share of DDP's gain over one island that DiLoCo gets,
((alone - run) / (alone - DDP)), and DDP's fp32 ring all-reduce bytes over DiLoCo's.

    python examples/regime.py [--windows 8 16 64] [--steps 200 | --steps 8:400 64:100]
        [--inner-steps 1 10 50] [--islands 2 4] [--outer paper tuned] [--lr-scale 1 2]
        [--diloco-lr-scale 1] [--eval-windows 512] [--limit N] [--no-run] [--out runs/regime]
        [key=value ...]

Writes regime.json (every point and every row), regime.md (the table) and regime.png (a
heatmap of the gap) under --out. One file per finished point (<out>/<point>/point.json): a
map killed halfway picks up where it stopped; --limit runs at most N new points, --no-run only
tabulates what exists. Results and the settings behind them: docs/results/regime.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diloco.codecs import build_codec
from diloco.config import IslandConfig, load_config
from diloco.errors import TrainingDiverged
from diloco.models.build import build_model
from diloco.transports import ring_allreduce_bytes
from islands.island import run_island

REPO = Path(__file__).resolve().parents[1]
PLAIN_ADAMW = ["outer.lr=1.0", "outer.momentum=0.0", "outer.nesterov=false"]
# Every point: final evaluation only, no resume, no progress display.
RUN_DEFAULTS = ["run.resume=false", "run.progress=none", "run.checkpoint_every=0", "eval.every=0"]


def warm_rounds(steps: int, inner_steps: int, share: float) -> int:
    """Warm rounds (one inner step each) of about `share` of `steps`, so that the rounds of H
    after them end exactly on `steps` (equal tokens with the DDP-equivalent)."""
    wanted = math.ceil(share * steps)
    return steps - inner_steps * ((steps - wanted) // inner_steps)


def paper_outer(k: int, h: int, steps: int) -> list[str]:
    """The DiLoCo paper's outer step: SGD, lr 0.7, Nesterov momentum 0.9, from round 0."""
    return [f"outer.rounds={steps // h}", "outer.lr=0.7", "outer.momentum=0.9"]


def tuned_outer(k: int, h: int, steps: int) -> list[str]:
    """The best outer settings tried (docs/results/regime.md, ablation at 512 tokens per step):
    at H = 1 the plain mean at lr sqrt(k); otherwise a synchronous warm phase over the first
    quarter of the steps at lr sqrt(k), then the paper's 0.7 / Nesterov 0.9 (a momentum
    warm-up after the warm phase measured worse: its first rounds move 0.7 of the mean). The map
    then found lr sqrt(k) too large once the islands' steps agree (1,024 tokens, k = 4: 1.0 was
    better); the setting is kept as it ran, so that the map reproduces."""
    if h == 1:
        return [f"outer.rounds={steps}", f"outer.lr={math.sqrt(k):.4f}", "outer.momentum=0.0"]
    warm = warm_rounds(steps, h, 0.25)
    return [
        f"outer.rounds={warm + (steps - warm) // h}",
        f"outer.warmup_rounds={warm}",
        f"outer.warmup_lr={math.sqrt(k):.4f}",
        "outer.lr=0.7",
        "outer.momentum=0.9",
    ]


OUTER_SETTINGS: dict[str, Callable[[int, int, int], list[str]]] = {
    "paper": paper_outer,
    "tuned": tuned_outer,
}


@dataclass(frozen=True)
class Point:
    name: str
    kind: str  # diloco, ddp or alone
    windows: int
    islands: int
    inner_steps: int
    outer: str
    lr_scale: float
    steps: int
    overrides: tuple[str, ...]


def steps_per_windows(specs: list[str], windows: list[int]) -> dict[int, int]:
    """--steps: one N for every batch, or W:N per batch of W windows."""
    plain = [int(s) for s in specs if ":" not in s]
    steps = {w: plain[-1] for w in windows} if plain else {}
    for spec in (s for s in specs if ":" in s):
        w, n = spec.split(":", 1)
        steps[int(w)] = int(n)
    missing = [w for w in windows if w not in steps]
    if missing:
        sys.exit(f"--steps gives no step count for {missing} windows")
    return steps


def eval_batches(eval_windows: int, batch: int) -> str:
    """eval.batches so that a run of this batch evaluates exactly `eval_windows` windows (the
    same evenly spaced validation windows for every point of the map)."""
    if eval_windows % batch:
        sys.exit(f"--eval-windows {eval_windows} is not a multiple of the batch {batch}")
    return f"eval.batches={eval_windows // batch}"


def grid(args: argparse.Namespace, base_lr: float) -> list[Point]:
    """Every point of the map, the small batches first (a partial map is still a map)."""
    points = []
    for b, steps in sorted(steps_per_windows(args.steps, args.windows).items()):
        for scale in args.lr_scale:
            lr = f"inner.lr={base_lr * scale:.6g}"
            for k in args.islands:
                ddp = [lr, f"data.batch_size={k * b}", eval_batches(args.eval_windows, k * b)]
                ddp += ["transport.islands=1", f"outer.inner_steps={steps}", "outer.rounds=1"]
                name = f"b{b}-ddp{k}-lr{scale:g}"
                points.append(Point(name, "ddp", b, k, 1, "-", scale, steps, (*ddp, *PLAIN_ADAMW)))
                if scale in args.diloco_lr_scale:
                    points += diloco_points(args, b, k, scale, steps, lr)
            alone = [lr, f"data.batch_size={b}", "transport.islands=1"]
            alone += [f"outer.inner_steps={steps}", "outer.rounds=1", *PLAIN_ADAMW]
            alone.append(eval_batches(args.eval_windows, b))
            name = f"b{b}-alone-lr{scale:g}"
            points.append(Point(name, "alone", b, 1, 1, "-", scale, steps, tuple(alone)))
    return points


def diloco_points(
    args: argparse.Namespace, b: int, k: int, scale: float, steps: int, lr: str
) -> list[Point]:
    points = []
    for h in args.inner_steps:
        if steps % h:
            sys.exit(f"--steps {steps} (windows {b}) is not a multiple of H = {h}")
        for outer in args.outer:
            setting = [lr, f"data.batch_size={b}", f"transport.islands={k}"]
            setting += [f"outer.inner_steps={h}", *OUTER_SETTINGS[outer](k, h, steps)]
            setting.append(eval_batches(args.eval_windows, b))
            name = f"b{b}-k{k}-h{h}-{outer}-lr{scale:g}"
            points.append(Point(name, "diloco", b, k, h, outer, scale, steps, tuple(setting)))
    return points


def run_point(args: argparse.Namespace, point: Point) -> dict[str, Any]:
    """Train one point (or read its result): the figures the table needs, and what ran."""
    run_dir = Path(args.out) / point.name
    done = run_dir / "point.json"
    if done.is_file():
        return dict(json.loads(done.read_text()))
    overrides = [*RUN_DEFAULTS, *args.overrides, *point.overrides, "transport.kind=local"]
    config = load_config(args.config, [*overrides, f"run.dir={run_dir}"])
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        summary = run_island(config)
    except TrainingDiverged as error:  # a result too: this setting does not train
        summary = {"val_loss": None, "diverged": str(error), **_planned(config)}
    result = {
        "point": point.name,
        "kind": point.kind,
        "val_loss": summary["val_loss"],
        "diverged": summary.get("diverged"),
        "inner_steps": summary["inner_steps"],
        "rounds": summary["rounds"],
        "inner_lr": config.inner.lr,
        "tokens_all_islands": summary["tokens_all_islands"],
        "bytes_sent": summary["bytes_sent"],
        "shared_parameters": summary["shared_parameters"],
        "wall_s": round(time.perf_counter() - start, 1),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "overrides": overrides,
    }
    if not args.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _planned(config: IslandConfig) -> dict[str, Any]:
    """A diverged point's figures had it finished (its row shows no loss, only what ran)."""
    schedule = config.outer.schedule()
    steps = schedule.total_steps()
    model = build_model(config.model, context=config.data.seq_len)
    numel = sum(p.numel() for p in model.parameters())
    payload = build_codec(config.outer.codec.value).payload_bytes(numel)
    islands = config.transport.islands
    return {
        "inner_steps": steps,
        "rounds": config.outer.rounds,
        "tokens_all_islands": steps * config.data.batch_size * config.data.seq_len * islands,
        "bytes_sent": config.outer.rounds * ring_allreduce_bytes(payload, islands),
        "shared_parameters": numel,
    }


def best(
    results: dict[str, dict[str, Any]], points: list[Point]
) -> tuple[Point, float | None] | None:
    """The point of the lr grid with the lowest val loss among those that finished (a diverged
    one, loss None, only when every finished point diverged); None when none finished."""
    finished = [(p, results[p.name]["val_loss"]) for p in points if p.name in results]
    trained = [(p, v) for p, v in finished if v is not None and math.isfinite(v)]
    if trained:
        return min(trained, key=lambda pv: pv[1])
    return (finished[0][0], None) if finished else None


def rows(
    points: list[Point], results: dict[str, dict[str, Any]], seq_len: int
) -> list[dict[str, Any]]:
    """One row per (batch, k, H, outer setting): each kind at its best inner lr."""

    def group(kind: str, **key: Any) -> list[Point]:
        return [
            p for p in points if p.kind == kind and all(getattr(p, a) == v for a, v in key.items())
        ]

    table = []
    cells = sorted({(p.windows, p.islands, p.inner_steps, p.outer) for p in group("diloco")})
    for b, k, h, outer in cells:
        run = best(results, group("diloco", windows=b, islands=k, inner_steps=h, outer=outer))
        ddp = best(results, group("ddp", windows=b, islands=k))
        if run is None or ddp is None or ddp[1] is None:
            continue
        row = {"windows": b, "tokens_per_step": b * seq_len, "islands": k, "H": h}
        alone = best(results, group("alone", windows=b))
        table.append(row | {"outer": outer} | _figures(run, ddp, alone, results))
    return table


def _figures(
    run: tuple[Point, float | None],
    ddp: tuple[Point, float | None],
    alone: tuple[Point, float | None] | None,
    results: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """A row's losses, gap, share of DDP's gain and bytes, naming the runs behind them."""
    (point, val), (ddp_point, ddp_val) = run, ddp
    assert ddp_val is not None
    alone_val = None if alone is None else alone[1]
    share = None
    if val is not None and alone_val is not None and alone_val != ddp_val:
        share = round((alone_val - val) / (alone_val - ddp_val), 4)
    numel = results[point.name]["shared_parameters"]
    ddp_bytes = point.steps * ring_allreduce_bytes(4 * numel, point.islands)
    sent = results[point.name]["bytes_sent"]
    return {
        "steps": point.steps,
        "val_loss": val,
        "run": point.name,
        "inner_lr": results[point.name]["inner_lr"],
        "ddp_val_loss": ddp_val,
        "ddp_run": ddp_point.name,
        "alone_val_loss": alone_val,
        "alone_run": None if alone is None else alone[0].name,
        "gap": None if val is None else round(val / ddp_val - 1, 5),
        "share_of_ddp_gain": share,
        "bytes_sent": sent,
        "ddp_bytes": ddp_bytes,
        "bytes_ratio": round(ddp_bytes / sent, 2) if sent else None,
    }


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [
        "| tokens / island step (windows) | k | H | outer | steps / island | val loss (run) | "
        "DDP-eq. val loss (run) | vs DDP | one island (run) | share of DDP's gain | "
        "DDP bytes ÷ these |",
        "| --- " * 11 + "|",
    ]
    for r in table:
        alone = (
            "—" if r["alone_val_loss"] is None else f"{r['alone_val_loss']:.4f} ({r['alone_run']})"
        )
        share = "—" if r["share_of_ddp_gain"] is None else f"{100 * r['share_of_ddp_gain']:.0f}%"
        ratio = "—" if r["bytes_ratio"] is None else f"{r['bytes_ratio']:,.1f}×"
        loss = "diverged" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        gap = "—" if r["gap"] is None else f"{100 * r['gap']:+.1f}%"
        lines.append(
            f"| {r['tokens_per_step']:,} ({r['windows']}) | {r['islands']} | {r['H']} | "
            f"{r['outer']} | {r['steps']} | {loss} ({r['run']}) | "
            f"{r['ddp_val_loss']:.4f} ({r['ddp_run']}) | {gap} | {alone} | "
            f"{share} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def heatmap(table: list[dict[str, Any]], path: Path) -> bool:
    """Gap to DDP (%) per (tokens per step, k) row and (outer, H) column; small PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.stderr.write("matplotlib is not installed: no heatmap\n")
        return False
    row_keys = sorted({(r["tokens_per_step"], r["islands"]) for r in table})
    col_keys = sorted({(r["outer"], r["H"]) for r in table})
    gap = {
        ((r["tokens_per_step"], r["islands"]), (r["outer"], r["H"])): 100 * r["gap"]
        for r in table
        if r["gap"] is not None  # a diverged cell stays blank
    }
    values = [[gap.get((rk, ck), math.nan) for ck in col_keys] for rk in row_keys]
    figure, axes = plt.subplots(figsize=(1.1 * len(col_keys) + 2.4, 0.5 * len(row_keys) + 1.6))
    image = axes.imshow(values, cmap="RdYlGn_r", vmin=-15, vmax=15, aspect="auto")
    for i, line in enumerate(values):
        for j, value in enumerate(line):
            if math.isfinite(value):
                axes.text(j, i, f"{value:+.1f}", ha="center", va="center", fontsize=8)
    axes.set_xticks(range(len(col_keys)), [f"{o}\nH={h}" for o, h in col_keys], fontsize=8)
    axes.set_yticks(range(len(row_keys)), [f"{t:,} tok, k={k}" for t, k in row_keys], fontsize=8)
    axes.set_title("DiLoCo val loss vs lr-tuned DDP-equivalent, equal tokens (%)", fontsize=9)
    figure.colorbar(image, ax=axes, label="gap to DDP (%)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--out", default="runs/regime")
    parser.add_argument("--windows", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--steps", nargs="+", default=["200"], help="N, or W:N per batch")
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--islands", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--outer", nargs="+", default=list(OUTER_SETTINGS), choices=OUTER_SETTINGS)
    parser.add_argument("--lr-scale", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument(
        "--diloco-lr-scale", type=float, nargs="+", help="DiLoCo's lr grid (default: --lr-scale)"
    )
    parser.add_argument("--eval-windows", type=int, default=512, help="validation windows")
    parser.add_argument("--limit", type=int, default=-1, help="run at most N new points")
    parser.add_argument("--no-run", action="store_true", help="only tabulate finished points")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value for every point")
    args = parser.parse_args(argv)
    if args.diloco_lr_scale is None:
        args.diloco_lr_scale = args.lr_scale
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    base = load_config(args.config, args.overrides)
    points = grid(args, base.inner.lr)
    out = Path(args.out)
    results: dict[str, dict[str, Any]] = {}
    budget = args.limit
    for point in points:
        finished = (out / point.name / "point.json").is_file()
        if not finished and (args.no_run or budget == 0):
            continue
        budget -= 0 if finished else 1
        results[point.name] = run_point(args, point)
        if not finished:
            sys.stdout.write(f"{point.name}: val {results[point.name]['val_loss']}\n")
            sys.stdout.flush()
    table = rows(points, results, base.data.seq_len)
    out.mkdir(parents=True, exist_ok=True)
    document = {"config": args.config, "overrides": args.overrides, "points": results}
    (out / "regime.json").write_text(json.dumps(document | {"rows": table}, indent=1) + "\n")
    (out / "regime.md").write_text(markdown(table))
    plotted = bool(table) and heatmap(table, out / "regime.png")
    left = sum(p.name not in results for p in points)
    sys.stdout.write(markdown(table) + f"\n{len(results)} of {len(points)} points done")
    sys.stdout.write(f" ({left} left); written to {out}: regime.json, regime.md")
    sys.stdout.write(", regime.png\n" if plotted else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
