"""Islands of several ranks in tests: `diloco-island` under torchrun, as a user starts it.

`start_torchrun` starts one torchrun (one island of R ranks for grpc and hivemind, or every
island x R for the torch transport) on a free rendezvous port; `worker_pids` finds the ranks it
started, so a test can SIGKILL one of them the way a crashed GPU process dies.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.harness import CliResult, cli_env, finish, free_port


def torchrun_command(nproc: int, *, as_script: bool = False) -> list[str]:
    """torchrun from this interpreter, on one node, rendezvous on a free loopback port.

    `as_script`: `torchrun ... diloco-island` as the README writes it (the repository root's
    `diloco-island` file, run by the interpreter: run it from the root); else
    `torchrun ... -m islands`."""
    entry = ["diloco-island"] if as_script else ["-m", "islands"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *entry,
    ]


def start_torchrun(
    nproc: int, args: Sequence[str], cwd: Path | None = None, *, as_script: bool = False
) -> subprocess.Popen[str]:
    """Start `torchrun --nproc-per-node NPROC diloco-island ARGS` in the background."""
    env = cli_env()
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(
        [*torchrun_command(nproc, as_script=as_script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def run_torchrun(
    nproc: int,
    args: Sequence[str],
    timeout_s: float,
    cwd: Path | None = None,
    *,
    as_script: bool = False,
) -> CliResult:
    """Run `torchrun ... diloco-island ARGS` to the end."""
    return finish(start_torchrun(nproc, args, cwd, as_script=as_script), timeout_s)


def worker_pids(agent_pid: int) -> list[int]:
    """The processes torchrun's agent started (its children), in pid order."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent pid; the command name (field 2) may hold spaces: split after it.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == agent_pid:
            children.append(int(entry.name))
    return sorted(children)


def kill_worker(agent_pid: int, index: int = 0) -> int:
    """SIGKILL the `index`-th worker of a torchrun (a rank dying); returns its pid."""
    pids = worker_pids(agent_pid)
    assert len(pids) > index, f"torchrun {agent_pid} has workers {pids}"
    os.kill(pids[index], 9)
    return pids[index]
