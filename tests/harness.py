"""Multi-process test harness: the parent owns rendezvous, children are spawned and watched.

Rules (docs: STYLE.md, "Tests"): the parent creates the rendezvous store (`TCPStore` on port 0,
or a file in `tmp_path`) and hands its address to the children; children are started with the
`spawn` context, joined with a timeout, and killed when they straggle; a child's exception comes
back through a queue and is re-raised in the parent with the child's traceback. CLI runs go
through `run_cli` (a timeout, stdout and stderr captured and shown on failure) and `FaultPlan`
(which signal to send to which island once it has written a given round).
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import queue as queue_module
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from diloco.metrics import read_metrics
from diloco.transports.grpc.security import self_signed_pair as self_signed_pair  # for the tests

# A model and data small enough that a round costs milliseconds on one CPU thread. One thread:
# on this 2-core machine shared with other jobs, torch's default of 2 intra-op threads makes
# a tiny step about 100x slower (measured: 350 ms against 3 ms).
TINY = (
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "data.batch_size=2",
    "data.seq_len=16",
    "eval.batches=1",
    "run.threads=1",
    "run.progress=none",
    "run.device=cpu",
)

STORE_TIMEOUT = datetime.timedelta(seconds=60)


# --- rendezvous: owned by the parent ------------------------------------------------------


def tcp_store() -> dist.TCPStore:
    """The parent's rendezvous store on 127.0.0.1, port chosen by the OS (read `.port`)."""
    return dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT
    )


def connect_store(port: int) -> dist.TCPStore:
    """A child's client handle on the parent's store."""
    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=STORE_TIMEOUT)


# --- spawned children -----------------------------------------------------------------------


class ChildError(RuntimeError):
    """A child failed; the message carries its rank and traceback."""


def _child_main(results: Any, rank: int, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        torch.set_num_threads(1)
        value = target(*args)
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    else:
        results.put((rank, True, value))


def spawn_children(
    target: Callable[..., Any], args_per_child: Sequence[tuple[Any, ...]], timeout_s: float
) -> list[Any]:
    """Run `target(*args)` in one spawned process per entry; return their values by index.

    `target` and its arguments must be picklable (module-level functions, plain data) and its
    return value too (send bytes or lists, not tensors: a shared-memory tensor outlives its
    sender badly). Raises ChildError with the child's traceback if any child raised, died or
    outlived `timeout_s`; every child is dead when this returns or raises.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    children = [
        context.Process(target=_child_main, args=(results, index, target, args), daemon=True)
        for index, args in enumerate(args_per_child)
    ]
    for child in children:
        child.start()
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    exited_at: dict[int, float] = {}
    try:
        # Drain the queue before joining: a child blocks on exit until its queued value is read.
        while len(values) + len(errors) < len(children):
            try:
                index, ok, value = results.get(timeout=0.2)
            except queue_module.Empty:
                now = time.monotonic()
                if now > deadline:
                    break
                for i, child in enumerate(children):
                    if child.exitcode is None or i in values or i in errors:
                        continue
                    # A value may still be in flight for a moment after the child exits.
                    if now - exited_at.setdefault(i, now) > 2.0:
                        errors[i] = f"exited with code {child.exitcode} and sent no result"
                continue
            (values if ok else errors)[index] = value
            if errors:  # the others may wait forever in a collective: give them a moment
                deadline = min(deadline, time.monotonic() + 5.0)
        for child in children:
            child.join(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        stragglers = [i for i, child in enumerate(children) if child.is_alive()]
        for child in children:
            if child.is_alive():
                child.kill()
                child.join(timeout=10)
        results.close()
    if errors:
        raise ChildError(
            "\n".join(f"child {i} failed:\n{errors[i]}" for i in sorted(errors))
            + (f"\nchildren {stragglers} were still running and were killed" if stragglers else "")
        )
    if stragglers or len(values) < len(children):
        missing = sorted(set(range(len(children))) - set(values))
        raise ChildError(f"children {missing} gave no result within {timeout_s} s (killed)")
    return [values[i] for i in range(len(children))]


def run_threads(
    target: Callable[..., Any], args_per_thread: Sequence[tuple[Any, ...]], timeout_s: float
) -> list[Any]:
    """`spawn_children` for in-process islands: one thread each, exceptions re-raised here."""
    values: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}

    def run(index: int, args: tuple[Any, ...]) -> None:
        try:
            values[index] = target(*args)
        except BaseException as error:  # re-raised below, in the test's thread
            errors[index] = error

    threads = [
        threading.Thread(target=run, args=(i, args), daemon=True)
        for i, args in enumerate(args_per_thread)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise ChildError(f"island threads still running after {timeout_s} s")
    if errors:
        first = min(errors)
        raise ChildError(f"island thread {first} failed: {errors[first]!r}") from errors[first]
    return [values[i] for i in range(len(threads))]


# --- the CLI as a subprocess ------------------------------------------------------------------


def cli_command() -> list[str]:
    """`diloco-island` from this interpreter's environment (the console script if installed)."""
    script = Path(sys.executable).parent / "diloco-island"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "islands.cli"]


def cli_env() -> dict[str, str]:
    """The environment of a CLI run: no torchrun variables, one intra-op thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def run_cli(args: Sequence[str], timeout_s: float = 60, cwd: Path | None = None) -> CliResult:
    """Run `diloco-island ARGS` to the end; stdout and stderr are captured."""
    done = subprocess.run(
        [*cli_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=cli_env(),
        cwd=cwd,
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


def start_cli(args: Sequence[str], cwd: Path | None = None) -> subprocess.Popen[str]:
    """Start `diloco-island ARGS` in the background (for fault injection); pipes captured."""
    return subprocess.Popen(
        [*cli_command(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=cwd,
    )


def finish(process: subprocess.Popen[str], timeout_s: float) -> CliResult:
    """Wait for a started CLI; kill it if it outlives `timeout_s`."""
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate(timeout=10)
        raise AssertionError(f"diloco-island ran past {timeout_s} s:\n{stderr}") from None
    return CliResult(process.returncode, stdout, stderr)


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The complete rows of run_dir/metrics.jsonl (a torn last line is ignored)."""
    return read_metrics(run_dir / "metrics.jsonl")


def params_hashes(run_dir: Path) -> list[str]:
    """The params_sha256 of each round of run_dir/metrics.jsonl."""
    return [row["params_sha256"] for row in metrics_rows(run_dir)]


def wait_for(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    """Block until `condition()` holds; AssertionError after `timeout_s`. For what another
    thread finishes after the call a test made has returned (a server's counters: the island
    holds its answer before the server counts the exchange)."""
    limit = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < limit, "condition not met in time"
        time.sleep(0.02)


def wait_for_rows(run_dir: Path, rows: int, timeout_s: float) -> None:
    """Block until run_dir/metrics.jsonl holds `rows` rows; AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(metrics_rows(run_dir)) >= rows:
            return
        time.sleep(0.02)
    raise AssertionError(f"{run_dir} did not reach {rows} rounds in {timeout_s} s")


def assert_ok(*results: CliResult) -> None:
    """Every CLI run exited 0 (else its output is shown)."""
    for result in results:
        assert result.returncode == 0, result.describe()


# --- loopback networking ------------------------------------------------------------------------


ATTACKER_SCRIPT = Path(__file__).resolve().parent / "integration" / "grpc_attacker.py"


def run_attacker(plan: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run tests/integration/grpc_attacker.py (a token holder's raw grpc calls, its own
    process) with `plan`; the outcome of each of its steps, by step name."""
    done = subprocess.run(
        [sys.executable, str(ATTACKER_SCRIPT)],
        input=json.dumps(plan),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=cli_env(),
    )
    assert done.returncode == 0, f"the attacker failed:\n{done.stderr}"
    outcomes: dict[str, Any] = json.loads(done.stdout)
    return outcomes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that need a fixed one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- fault injection ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    island: int
    """Which process of the plan (its index in the list given to `FaultPlan.run`)."""
    round: int
    """Send the signal once this island's metrics.jsonl has a row for this round."""
    signal: signal.Signals


@dataclass
class FaultPlan:
    """Declarative faults for CLI processes: `FaultPlan().kill(island=0, round=2)`.

    `run` polls every island's metrics.jsonl and sends each fault's signal as soon as its
    round is written; it records the row count seen at that moment in `fired`.
    """

    faults: list[Fault] = field(default_factory=list)
    fired: dict[int, int] = field(default_factory=dict)

    def kill(self, *, island: int, round: int) -> FaultPlan:
        self.faults.append(Fault(island, round, signal.SIGKILL))
        return self

    def terminate(self, *, island: int, round: int) -> FaultPlan:
        self.faults.append(Fault(island, round, signal.SIGTERM))
        return self

    def run(
        self,
        processes: Sequence[subprocess.Popen[str]],
        run_dirs: Sequence[Path],
        timeout_s: float,
    ) -> list[CliResult]:
        """Apply the plan while the processes run; return every process's result."""
        pending = list(self.faults)
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for fault in list(pending):
                process = processes[fault.island]
                rows = len(metrics_rows(run_dirs[fault.island]))
                if rows >= fault.round and process.poll() is None:
                    process.send_signal(fault.signal)
                    self.fired[fault.island] = rows
                    pending.remove(fault)
                elif process.poll() is not None:
                    pending.remove(fault)  # ended before its fault: `fired` lacks it
            time.sleep(0.005)
        return finish_all(processes, max(1.0, deadline - time.monotonic()))


def finish_all(processes: Sequence[subprocess.Popen[str]], timeout_s: float) -> list[CliResult]:
    """`finish` every process within one shared deadline; none is left running."""
    deadline = time.monotonic() + timeout_s
    try:
        return [finish(p, max(1.0, deadline - time.monotonic())) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
