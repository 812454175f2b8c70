"""`diloco-island --config FILE [dotted.key=value ...]`: parse, run, report, exit.

Two more commands share the config: `diloco-island status --config FILE` (how the run is
doing) and `diloco-island export --config FILE --out DIR` (the shared model as a Hugging Face
directory). Exit codes: 0 success, 1 runtime failure (or a run that cannot be reached), 2 usage
or config error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import diloco
from diloco.config import load_config, to_yaml
from diloco.errors import ConfigError

COMMANDS = ("status", "export")


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors in two lines: argparse wraps its usage line to the terminal
    width (three lines for ours), and the CLI's promise is at most two lines per error."""

    def error(self, message: str) -> NoReturn:
        usage = " ".join(self.format_usage().split())  # one line, however long
        self.exit(2, f"{self.prog}: usage error: {_one_line(message)}\n{usage}\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "run"
    parser = _parser(command)
    args = parser.parse_args(argv[1:] if command != "run" else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:
        # grpc's C core and hivemind print their own lines on stderr ("E1202 ... add_port.cc:83
        # Failed to add port", "[INFO] Generating new identity"), beside the one line we say.
        # Both read these when they load; --debug (or the variable set by the user) keeps them.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        config = load_config(args.config, args.overrides)
        if command == "status":
            return _status(config, as_json=args.json)
        if command == "export":
            return _export(config, args.out)
        if args.print_config:
            print(to_yaml(config), end="")
            return 0
        return _run(config)
    except ConfigError as error:
        # A cause is kept where user code failed (a plug-in's factory): its traceback is the
        # user's to read, behind --debug like every traceback.
        if args.debug:
            traceback.print_exception(error, file=sys.stderr)
        hint = " (run with --debug for the traceback)" if error.__cause__ and not args.debug else ""
        return _fail(2, f"config error: {_one_line(str(error))}{hint}")
    except KeyboardInterrupt:
        return _fail(
            130, "interrupted; run the same command again to resume from the last checkpoint"
        )
    except Exception as error:
        if args.debug:
            raise
        message = _one_line(f"{type(error).__name__}: {error}")
        return _fail(1, f"{message} (run with --debug for the traceback)")


def _parser(command: str) -> _Parser:
    if command == "status":
        parser = _Parser(
            prog="diloco-island status",
            description="How the run is doing: from the coordinator (grpc), the DHT (hivemind) "
            "or run.dir's metrics (local, torch). Exit 0 when the run is reachable, 1 if not.",
        )
        parser.add_argument("--json", action="store_true", help="print the status document")
    elif command == "export":
        parser = _Parser(
            prog="diloco-island export",
            description="Write the run's shared model (its newest checkpoint) as a Hugging "
            "Face directory that AutoModelForCausalLM.from_pretrained loads.",
        )
        parser.add_argument("--out", required=True, help="the directory to write")
    else:
        parser = _Parser(
            prog="diloco-island",
            description="Run one DiLoCo island (or, with transport.kind=local, a whole group). "
            "Also: diloco-island status --config FILE, diloco-island export --config FILE "
            "--out DIR.",
            epilog="Example: diloco-island --config configs/demo.yaml outer.inner_steps=100",
        )
        parser.add_argument("--print-config", action="store_true", help="print the config and exit")
        parser.add_argument("--version", action="version", version=f"diloco {diloco.__version__}")
    parser.add_argument("--config", required=True, help="the island's YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return parser


def _status(config: Any, *, as_json: bool) -> int:
    from islands.status import run_status
    from islands.status_fetch import fetch_coordinator, fetch_hivemind

    code, text = run_status(
        config, fetch_coordinator=fetch_coordinator, fetch_hivemind=fetch_hivemind, as_json=as_json
    )
    if code:
        return _fail(code, text)
    print(text)
    return 0


def _export(config: Any, out: str) -> int:
    from pathlib import Path

    from islands.export import export_run

    directory, round = export_run(config, Path(out))
    print(f"diloco: the shared model after round {round} is in {directory}/ (from_pretrained)")
    return 0


def _run(config: Any) -> int:
    # Imported here so that `--help` and config errors answer without loading torch.
    from islands.coordinator import is_standalone_coordinator, run_coordinator
    from islands.island import run_island
    from islands.progress import ProgressDisplay

    if is_standalone_coordinator(config):
        summary = run_coordinator(config)
        print(
            f"diloco coordinator: {summary['rounds']} rounds closed, late payloads "
            f"{summary['late_payloads']}, refused {summary['refused_payloads']}, params_sha256 "
            f"{summary['params_sha256'][:16]}…"
        )
        return 0

    display = ProgressDisplay(config.run.progress)
    try:
        summary = run_island(config, events=display)
    finally:
        display.close()
    if "island_rank" not in summary:  # the other ranks of an island leave it to rank 0
        print(_format_summary(summary))
    return 0


def _format_summary(summary: dict[str, Any]) -> str:
    sent, ddp = summary["bytes_sent"], summary["ddp_bytes_sent"]
    ratio = f"{ddp / sent:.0f}x fewer" if sent else "no network"
    val = summary["val_loss"]
    lines = [
        f"diloco: {summary['rounds']} rounds of {summary['islands']} island(s), "
        f"{summary['inner_steps']} inner steps each",
        f"  val loss        {'-' if val is None else f'{val:.4f}'}",
        f"  tokens          {summary['tokens_all_islands']:,} ({summary['tokens']:,} per island)",
        f"  bytes sent      {sent / 1e6:,.1f} MB per island",
        f"  DDP would send  {ddp / 1e6:,.1f} MB per island for the same tokens ({ratio})",
        f"  inner loop      {summary['inner_tokens_per_s']:,.0f} tokens/s on {summary['device']}",
        f"  params_sha256   {summary['params_sha256'][:16]}…",
        f"  outputs         {summary['run_dir']}/ (metrics.jsonl, summary.json, checkpoints/)",
    ]
    advice = summary.get("regime_advice")
    if advice:  # what the regime costs, where the map saw DiLoCo trail DDP
        lines.append(f"  {advice}")
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def _fail(code: int, message: str) -> int:
    print(f"diloco-island: {message}", file=sys.stderr)
    return code


def _one_line(message: str) -> str:
    """The first line of a message (library errors can span many: yaml's, torch's)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else message.strip()
    return f"{lines[0]} […{len(lines) - 1} more lines]"


if __name__ == "__main__":
    sys.exit(main())
