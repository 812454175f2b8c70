"""A research sweep: DiLoCo over a grid of H, codec and island count, in one table and plot.

Every point runs `run_island` with simulated islands (`transport.kind: local`: the maths and
byte counts of separate processes, the islands taking turns on this machine) for the same
inner steps per island, so rounds = steps // H. `--baselines` adds, per island count k, what
DDP with k workers computes (one process, k x the batch, plain AdamW) and one island alone
with one island's budget. Any other config key can join the grid with `--grid KEY=V1,V2`.

    python examples/sweep.py --islands 2 4 --inner-steps 25 50 100 --codec none int8 \\
        [--steps 400] [--baselines] [--grid outer.lr=0.5,0.7] [--out runs/sweep] [key=value ...]

Writes results.json, table.md and sweep.png (final val loss against bytes sent per island, log
x) under --out. A point whose sweep_point.json exists is not run again (delete --out to redo).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

from diloco.config import load_config
from diloco.transports import ring_allreduce_bytes
from islands.island import run_island

REPO = Path(__file__).resolve().parents[1]
PLAIN_ADAMW = ["outer.lr=1.0", "outer.momentum=0.0", "outer.nesterov=false"]


def grid_points(args: argparse.Namespace) -> list[tuple[str, list[str], dict[str, Any]]]:
    """(name, overrides, labels) for every DiLoCo point of the grid, then the baselines."""
    extra = [(key, values.split(",")) for key, values in (g.split("=", 1) for g in args.grid)]
    points = []
    for k, h, codec, *others in itertools.product(
        args.islands, args.inner_steps, args.codec, *[values for _, values in extra]
    ):
        if args.steps % h:
            sys.exit(f"--steps {args.steps} is not a multiple of H = {h}")
        labels = {"kind": "diloco", "islands": k, "H": h, "codec": codec}
        labels |= {key: value for (key, _), value in zip(extra, others, strict=True)}
        name = "-".join(f"{key.split('.')[-1]}{value}" for key, value in labels.items())
        overrides = [
            f"transport.islands={k}",
            f"outer.inner_steps={h}",
            f"outer.rounds={args.steps // h}",
            f"outer.codec={codec}",
            *[f"{key}={value}" for (key, _), value in zip(extra, others, strict=True)],
        ]
        points.append((name.replace("kinddiloco-", ""), overrides, labels))
    if args.baselines:
        base = load_config(args.config, args.overrides)
        batch, eval_batches = base.data.batch_size, base.eval.batches
        h = max(args.inner_steps)  # one round per H: the same number of val points
        one_island = [f"outer.inner_steps={h}", f"outer.rounds={args.steps // h}", *PLAIN_ADAMW]
        for k in args.islands:
            labels = {"kind": f"ddp-equivalent ({k}x batch)", "islands": k, "H": 1}
            batch_k = [f"data.batch_size={k * batch}", "transport.islands=1", *one_island]
            if eval_batches % k == 0:  # the same validation windows as the islands'
                batch_k.append(f"eval.batches={eval_batches // k}")
            else:
                sys.stderr.write(f"eval.batches is not a multiple of {k}: the {k}x batch run "
                                 "is evaluated on other (more) validation windows\n")  # fmt: skip
            points.append((f"ddp-equivalent-{k}", batch_k, labels | {"codec": "none"}))
        labels = {"kind": "one island alone", "islands": 1, "H": "—", "codec": "—"}
        points.append(("one-island", ["transport.islands=1", *one_island], labels))
    return points


def run_point(args: argparse.Namespace, name: str, overrides: list[str]) -> dict[str, Any]:
    run_dir = Path(args.out) / name
    done = run_dir / "sweep_point.json"  # the summary and wall-clock of a finished point
    if done.is_file():
        return dict(json.loads(done.read_text()))
    config = load_config(
        args.config,
        [
            "run.resume=false",
            "run.progress=none",
            "run.checkpoint_every=0",
            "eval.every=0",
            *args.overrides,
            *overrides,
            "transport.kind=local",
            f"run.dir={run_dir}",
        ],
    )
    start = time.perf_counter()
    summary = run_island(config)
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def table(rows: list[dict[str, Any]]) -> str:
    ddp = {r["islands"]: r["val_loss"] for r in rows if r["kind"].startswith("ddp")}
    extra = [key for key in rows[0] if key not in ROW_KEYS]
    lines = [
        "| run | islands | H | codec | "
        + "".join(f"{key} | " for key in extra)
        + "steps / island | tokens (all) | final val loss | vs DDP-equivalent | "
        "MB sent / island | DDP bytes ÷ these | wall-clock s |",
        "| --- " * (11 + len(extra)) + "|",
    ]
    for r in rows:
        vs = (
            f"{100 * (r['val_loss'] / ddp[r['islands']] - 1):+.1f}%" if r["islands"] in ddp else "—"
        )
        ratio = f"{r['ddp_bytes'] / r['bytes_sent']:,.0f}×" if r["bytes_sent"] else "—"
        lines.append(
            f"| {r['kind']} | {r['islands']} | {r['H']} | {r['codec']} | "
            + "".join(f"{r[key]} | " for key in extra)
            + f"{r['steps']:,} | {r['tokens_all']:,} | {r['val_loss']:.4f} | {vs} | "
            f"{r['bytes_sent'] / 1e6:,.1f} | {ratio} | {r['wall_s']} |"
        )
    return "\n".join(lines) + "\n"


ROW_KEYS = ("kind", "islands", "H", "codec", "steps", "tokens_all", "val_loss", "bytes_sent")
ROW_KEYS += ("ddp_bytes", "wall_s")


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.stderr.write("matplotlib is not installed: no plot\n")
        return False
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for k in sorted({r["islands"] for r in rows if r["kind"] == "diloco"}):
        points = [r for r in rows if r["kind"] == "diloco" and r["islands"] == k]
        axes.scatter([r["bytes_sent"] for r in points], [r["val_loss"] for r in points],
                     label=f"DiLoCo, {k} islands")  # fmt: skip
        for r in points:
            axes.annotate(f"H{r['H']} {r['codec']}", (r["bytes_sent"], r["val_loss"]), fontsize=7)
    for r in rows:
        if r["kind"] != "diloco":
            axes.axhline(r["val_loss"], linestyle="--", linewidth=1, label=r["kind"], color="gray"
                         if r["islands"] == 1 else None)  # fmt: skip
    axes.set_xscale("log")
    axes.set_xlabel("bytes sent per island (log)")
    axes.set_ylabel("final validation loss")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--islands", type=int, nargs="+", default=[4])
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[50], help="H values")
    parser.add_argument("--codec", nargs="+", default=["none"])
    parser.add_argument("--steps", type=int, default=400, help="inner steps per island")
    parser.add_argument("--grid", action="append", default=[], help="KEY=V1,V2 (repeatable)")
    parser.add_argument("--baselines", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value for every point")
    args = parser.parse_args(argv)
    rows = []
    for name, overrides, labels in grid_points(args):
        summary = run_point(args, name, overrides)
        steps = summary["inner_steps"]
        k = labels["islands"]
        # What k DDP workers would send for these steps (a ring all-reduce of fp32 gradients).
        ddp_bytes = steps * ring_allreduce_bytes(4 * summary["shared_parameters"], k)
        is_ddp = labels["kind"].startswith("ddp")
        rows.append(
            {
                **labels,
                "steps": steps,
                "tokens_all": summary["tokens_all_islands"],
                "val_loss": summary["val_loss"],
                "bytes_sent": ddp_bytes if is_ddp else summary["bytes_sent"],
                "ddp_bytes": ddp_bytes,
                "wall_s": summary.get("wall_s", "—"),
            }
        )
        sys.stdout.write(f"{name}: val {summary['val_loss']:.4f}\n")
        sys.stdout.flush()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    report = table(rows)
    (out / "table.md").write_text(report)
    plotted = plot(rows, out / "sweep.png")
    sys.stdout.write(report + f"\nwritten to {out}: results.json, table.md")
    sys.stdout.write(", sweep.png\n" if plotted else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
