"""Sites of several ranks on the grpc transport (issue 13), as two sites run them: a standalone
coordinator and one `torchrun --nproc-per-node 2 diloco-island ... transport.rank=i` per site,
TLS and a run token on, on loopback.

Rank r of every site exchanges its shard r in lane `shard-r` of the one coordinator, so both
sites must end every round on the same island hash, send half the bytes per rank, train like
one-rank sites with the whole batch, survive a rank's death (its site exits non-zero, is
started again and rejoins from its checkpoints), and refuse a site launched with other ranks.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    TINY,
    CliResult,
    assert_ok,
    finish,
    free_port,
    metrics_rows,
    self_signed_pair,
    start_cli,
    wait_for_rows,
)
from tests.torchrun import kill_worker, start_torchrun

TOKEN = "e2e-ranks-token-0123456789abcdef"
RUN_S = 240.0
# A rank's payload header (codec none: shape and dtype) is sent by every rank every round.
HEADER_BYTES = 64


@pytest.fixture(autouse=True)
def run_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DILOCO_TOKEN", TOKEN)


class Sites:
    """The command lines of one grpc run: a coordinator and two sites."""

    def __init__(self, tmp_path: Path, name: str, *extra: str) -> None:
        self.run_dir = tmp_path / name
        cert, key = self_signed_pair(tmp_path)
        self.common = [
            "--config",
            "configs/demo.yaml",
            *TINY,
            "outer.rounds=4",
            "outer.inner_steps=3",
            "eval.every=1",
            "transport.kind=grpc",
            "transport.islands=2",
            "transport.min_islands=2",
            f"transport.grpc.address=127.0.0.1:{free_port()}",
            f"transport.grpc.tls_cert={cert}",
            f"transport.grpc.tls_key={key}",
            # Generous: two torchruns of two ranks start seconds apart on a loaded machine.
            "transport.grpc.deadline_floor_s=20",
            "transport.grpc.retry_s=90",
            "transport.grpc.linger_s=5",
            f"run.dir={self.run_dir}",
            *extra,
        ]

    def coordinator(self) -> subprocess.Popen[str]:
        return start_cli([*self.common, "transport.grpc.role=coordinator"])

    def site(self, island: int, ranks: int, *extra: str) -> subprocess.Popen[str]:
        args = [*self.common, f"transport.rank={island}", *extra]
        if ranks == 1:
            return start_cli(args)
        return start_torchrun(ranks, args)

    def rows(self, island: int) -> list[dict[str, Any]]:
        return metrics_rows(self.run_dir / f"island-{island}")

    def summary(self, island: int) -> dict[str, Any]:
        return dict(json.loads((self.run_dir / f"island-{island}" / "summary.json").read_text()))


def _finish(*processes: subprocess.Popen[str]) -> list[CliResult]:
    return [finish(process, RUN_S) for process in processes]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_sites_of_two_ranks_agree_and_train_like_one_rank_sites(tmp_path: Path) -> None:
    one = Sites(tmp_path, "one", "data.batch_size=4")
    coordinator = one.coordinator()
    assert_ok(*_finish(one.site(0, 1), one.site(1, 1)), finish(coordinator, 60))

    two = Sites(tmp_path, "two", "data.batch_size=2", "island.parallel=ddp")
    coordinator = two.coordinator()
    assert_ok(*_finish(two.site(0, 2), two.site(1, 2)), finish(coordinator, 60))

    rows = [two.rows(island) for island in (0, 1)]
    assert [r["round"] for r in rows[0]] == [1, 2, 3, 4]
    assert [r["params_sha256"] for r in rows[0]] == [r["params_sha256"] for r in rows[1]]
    for island in (0, 1):
        for row, alone in zip(two.rows(island), one.rows(island), strict=True):
            assert row["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-4)
            sent = row["bytes_sent_per_rank"]
            assert len(sent) == 2 and abs(sent[0] - sent[1]) <= HEADER_BYTES * row["round"]
            # Each rank sends half of what the one-rank site sends (its own header aside).
            assert abs(sum(sent) - alone["bytes_sent"]) <= 2 * HEADER_BYTES * row["round"]
        assert two.summary(island)["island_ranks"] == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_rank_takes_its_site_down_and_the_site_rejoins_from_its_checkpoints(
    tmp_path: Path,
) -> None:
    sites = Sites(
        tmp_path, "run", "data.batch_size=2", "island.parallel=fsdp", "run.checkpoint_every=1",
        "outer.rounds=30", "outer.inner_steps=60", "run.resume=true",
        # The survivor goes on alone while the site is down (rounds close at a short deadline);
        # with min_islands=2 a site that died between its ranks' payloads of one round would
        # leave a shard's group waiting for a payload its restart cannot make.
        "transport.min_islands=1", "transport.grpc.deadline_floor_s=2",
        "transport.grpc.linger_s=20",
    )  # fmt: skip
    coordinator = sites.coordinator()
    survivor = sites.site(0, 2)
    victim = sites.site(1, 2)
    wait_for_rows(sites.run_dir / "island-1", 2, RUN_S)
    kill_worker(victim.pid, index=1)  # rank 1 of site 1
    crashed = finish(victim, RUN_S)
    assert crashed.returncode != 0, crashed.describe()
    restarted = sites.site(1, 2)
    assert_ok(*_finish(survivor, restarted), finish(coordinator, 60))

    final = [sites.rows(island) for island in (0, 1)]
    assert final[0][-1]["round"] == final[1][-1]["round"] == 30
    assert final[0][-1]["params_sha256"] == final[1][-1]["params_sha256"]
    ours = {row["round"]: row["params_sha256"] for row in final[1]}
    theirs = {row["round"]: row["params_sha256"] for row in final[0]}
    for round, sha in ours.items():
        assert sha == theirs[round], f"round {round}"
    # The site came back while the run went on: it trained rounds after its restart.
    assert len([round for round in ours if round > 3]) >= 3, sorted(ours)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_site_launched_with_other_ranks_is_refused(tmp_path: Path) -> None:
    """A site of one rank (main lane) and a site of two (lanes shard-0, shard-1) would each
    wait for the other forever: the coordinator refuses whichever joins second."""
    sites = Sites(tmp_path, "run", "data.batch_size=2")
    coordinator = sites.coordinator()
    processes = [sites.site(0, 2, "island.parallel=ddp"), sites.site(1, 1)]
    deadline = time.monotonic() + RUN_S
    while all(p.poll() is None for p in processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    ended = [p for p in processes if p.poll() is not None]
    for process in [*processes, coordinator]:
        if process.poll() is None:
            process.kill()
    assert ended, "neither site was refused"
    refused = finish(ended[0], 30)
    # The CLI exits 2 on a config error; torchrun reports its workers' failure as 1.
    assert refused.returncode == (2 if ended[0] is processes[1] else 1), refused.describe()
    lines = [line for line in refused.stderr.splitlines() if line.startswith("diloco-island:")]
    assert lines, refused.describe()
    for line in lines:  # one line per rank, no traceback of ours
        assert "config error" in line and "island.ranks, parallel" in line, line
