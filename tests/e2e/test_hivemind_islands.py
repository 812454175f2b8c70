"""The hivemind transport as sites run it: `diloco-island` processes on loopback that find each
other through island 0's address file, with no server.

The invariant is the design's: after every round the islands that averaged together hold the
same shared parameters (`params_sha256` in metrics.jsonl), also after one was killed and
restarted; an island with another model never averages with them; no p2pd outlives its island.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("hivemind")

from harness import (  # noqa: E402
    TINY,
    assert_ok,
    finish,
    finish_all,
    metrics_rows,
    start_cli,
    wait_for_rows,
)

# make test-all: hivemind processes take a minute to form groups
# (tests/integration/test_hivemind_average.py runs in make test).
pytestmark = pytest.mark.slow


class Group:
    """The command lines of one hivemind run of `islands` islands."""

    def __init__(self, tmp_path: Path, islands: int, *extra: str):
        self.run_dir = tmp_path / "run"
        self.peers_file = tmp_path / "peers.txt"
        (tmp_path / "island.yaml").write_text(f"run:\n  dir: {self.run_dir}\n")
        self.common = [
            "--config",
            str(tmp_path / "island.yaml"),
            *TINY,
            "transport.kind=hivemind",
            f"transport.islands={islands}",
            "transport.run_id=e2e",
            "transport.hivemind.host_maddrs=[/ip4/127.0.0.1/tcp/0]",
            "transport.hivemind.use_relay=false",
            "transport.hivemind.next_chunk_timeout_s=5",
            "transport.hivemind.averaging_timeout_s=90",
            *extra,
        ]

    def island(self, rank: int, *extra: str) -> subprocess.Popen[str]:
        joins = (
            f"transport.hivemind.address_file={self.peers_file}"
            if rank == 0
            else f"transport.hivemind.initial_peers_file={self.peers_file}"
        )
        return start_cli([*self.common, f"transport.rank={rank}", joins, *extra])

    def island_dir(self, rank: int) -> Path:
        return self.run_dir / f"island-{rank}"

    def hashes(self, rank: int) -> dict[int, str]:
        return {row["round"]: row["params_sha256"] for row in metrics_rows(self.island_dir(rank))}

    def p2pd_of(self, rank: int) -> list[int]:
        """Pids of p2pd daemons started with this island's identity key."""
        key = str(self.island_dir(rank) / "hivemind.key")
        return _p2pd_pids(key)


def _p2pd_pids(needle: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "p2pd" in command and needle in command:
            pids.append(int(entry.name))
    return pids


def wait_until_gone(group: Group, rank: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while group.p2pd_of(rank) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group.p2pd_of(rank), f"island {rank}'s p2pd outlived it"


@pytest.mark.timeout(300)
def test_three_islands_agree_and_a_fourth_with_another_model_stays_apart(
    tmp_path: Path,
) -> None:
    # A generous matchmaking window: the processes start seconds apart on a loaded machine.
    group = Group(tmp_path, 3, "outer.rounds=4", "outer.inner_steps=3")
    window = "transport.hivemind.matchmaking_s=40"
    islands = [group.island(rank, window) for rank in range(3)]
    # Same run id, another model: it must never join the three (and, alone, waits 2 x 2 s).
    other_dir = tmp_path / "other"
    stranger = start_cli(
        [
            *group.common,
            "transport.rank=0",
            f"transport.hivemind.initial_peers_file={group.peers_file}",
            "transport.hivemind.matchmaking_s=2",
            "transport.hivemind.request_timeout_s=1",
            "model.n_layer=2",
            "outer.rounds=100",
            f"run.dir={other_dir}",
        ]
    )
    assert_ok(*finish_all(islands, 240))

    hashes = [group.hashes(rank) for rank in range(3)]
    assert sorted(hashes[0]) == [1, 2, 3, 4]
    assert hashes[0] == hashes[1] == hashes[2]
    for rank in range(3):
        rows = metrics_rows(group.island_dir(rank))
        assert [row["islands"] for row in rows] == [3, 3, 3, 3]
        assert rows[-1]["bytes_sent"] > 0 and rows[-1]["bytes_received"] > 0
        wait_until_gone(group, rank, 10)

    # The stranger averaged alone every round, was told why, and leaves cleanly on SIGTERM.
    wait_for_rows(other_dir / "island-0", 1, 120)
    stranger.send_signal(signal.SIGTERM)
    result = finish(stranger, 30)
    strange_rows = metrics_rows(other_dir / "island-0")
    assert strange_rows and all(row["islands"] == 1 for row in strange_rows)
    assert not set(row["params_sha256"] for row in strange_rows) & set(hashes[0].values())
    assert "differ in: " in result.stderr and "model" in result.stderr, result.describe()
    assert not _p2pd_pids(str(other_dir)), "the stranger's p2pd outlived it"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_island_catches_up_from_its_peers(tmp_path: Path) -> None:
    """SIGKILL island 2 after round 2: the other two go on (each round waits the matchmaking
    window for it, then averages in two); its p2pd goes with it; restarted, it loads the
    group's shared state from its peers, averages with them again, and ends on their hash."""
    group = Group(
        tmp_path,
        3,
        "outer.rounds=14",
        "outer.inner_steps=20",
        "transport.hivemind.matchmaking_s=6",
    )
    survivors = [group.island(rank) for rank in range(2)]
    victim = group.island(2)
    wait_for_rows(group.island_dir(2), 2, 240)
    victim.kill()
    victim.wait(timeout=10)
    wait_until_gone(group, 2, 10)
    killed_at = len(metrics_rows(group.island_dir(2)))
    restarted = group.island(2)
    results = finish_all([*survivors, restarted], 480)
    assert_ok(*results)

    final = [group.hashes(rank) for rank in range(3)]
    assert final[0] == final[1], results[1].describe()
    assert final[2][14] == final[0][14], results[2].describe()
    for round, sha in final[2].items():
        assert sha == final[0][round], f"round {round}"
    rows = {row["round"]: row["islands"] for row in metrics_rows(group.island_dir(0))}
    assert 2 in rows.values(), "the survivors never averaged without the killed island"
    assert rows[14] == 3, "the restarted island was not in the last round"
    rejoined = [round for round in final[2] if round > killed_at + 1]
    assert len(rejoined) >= 2, f"the restarted island did not rejoin: {sorted(final[2])}"


TOKEN_ENV = "DILOCO_HIVEMIND_E2E_TOKEN"


@pytest.mark.timeout(120)
def test_a_configured_run_token_that_is_missing_stops_the_island(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    group = Group(tmp_path, 2, f"transport.hivemind.token_env={TOKEN_ENV}")
    result = finish(group.island(0), 90)
    assert result.returncode == 2, result.describe()
    assert f"no run token: ${TOKEN_ENV} (transport.hivemind.token_env) is empty" in result.stderr
    assert "Traceback" not in result.stderr, result.describe()
    assert not list(group.run_dir.glob("island-0/metrics.jsonl"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_islands_holding_the_run_token_average_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "e2e-hivemind-run-token-0123456789")
    group = Group(
        tmp_path,
        2,
        "outer.rounds=2",
        "outer.inner_steps=2",
        "transport.hivemind.matchmaking_s=30",
        f"transport.hivemind.token_env={TOKEN_ENV}",
    )
    results = finish_all([group.island(rank) for rank in range(2)], 240)
    assert_ok(*results)
    assert group.hashes(0) == group.hashes(1) and sorted(group.hashes(0)) == [1, 2]
    for rank in range(2):
        assert [row["islands"] for row in metrics_rows(group.island_dir(rank))] == [2, 2]
        assert "e2e-hivemind-run-token" not in results[rank].stdout + results[rank].stderr
