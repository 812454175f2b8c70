"""`diloco-island status` for a hivemind run (issue 17): two `diloco-island` processes with a run
token on loopback publish their status records in their DHT; the command joins it as a client,
prints the table during the run (its figures checked against the islands' metrics.jsonl),
refuses a wrong token in one line, and after the run reads the finished run from run.dir.
Slow: hivemind groups take tens of seconds to form on this machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("hivemind")

from harness import (  # noqa: E402
    TINY,
    CliResult,
    assert_ok,
    cli_command,
    cli_env,
    finish,
    metrics_rows,
    start_cli,
)

from diloco.status import StatusSnapshot  # noqa: E402

TOKEN = "e2e-hivemind-status-token-0123456789"
ROUNDS = 60


def status(args: list[str], token: str) -> CliResult:
    env = {**cli_env(), "DILOCO_TOKEN": token}
    done = subprocess.run(
        [*cli_command(), "status", *args], capture_output=True, text=True, timeout=120, env=env
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_status_of_a_hivemind_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DILOCO_TOKEN", TOKEN)
    run_dir, peers = tmp_path / "run", tmp_path / "peers.txt"
    (tmp_path / "island.yaml").write_text(f"run:\n  dir: {run_dir}\n")
    common = [
        "--config", str(tmp_path / "island.yaml"), *TINY,
        "transport.kind=hivemind", "transport.islands=2", "transport.run_id=e2e-status",
        "transport.hivemind.host_maddrs=[/ip4/127.0.0.1/tcp/0]",
        "transport.hivemind.use_relay=false", "transport.hivemind.token_env=DILOCO_TOKEN",
        "transport.hivemind.matchmaking_s=20", "transport.hivemind.averaging_timeout_s=120",
        f"outer.rounds={ROUNDS}", "outer.inner_steps=20",
    ]  # fmt: skip
    islands = [
        start_cli([*common, "transport.rank=0", f"transport.hivemind.address_file={peers}"]),
        start_cli([*common, "transport.rank=1", f"transport.hivemind.initial_peers_file={peers}"]),
    ]
    reader = [*common, "transport.rank=1", f"transport.hivemind.initial_peers_file={peers}"]
    try:
        deadline = time.monotonic() + 300
        while len(metrics_rows(run_dir / "island-1")) < 3:
            assert time.monotonic() < deadline, "the islands did not reach round 3"
            for island in islands:
                assert island.poll() is None, finish(island, 10).describe()
            time.sleep(0.5)
        began = time.monotonic()
        wrong = status(reader, "not-the-run-token-0123456789")
        during = status([*reader, "--json"], TOKEN)
        table = status(reader, TOKEN)
        took_s = (time.monotonic() - began) / 3
    finally:
        results = [finish(island, 400) for island in islands]
    assert_ok(*results)
    print(f"a status read of the DHT took {took_s:.1f} s")

    assert during.returncode == 0, during.describe()
    snapshot = StatusSnapshot.from_json(during.stdout)
    rows = {r: {row["round"]: row for row in metrics_rows(run_dir / f"island-{r}")} for r in (0, 1)}
    assert snapshot.transport == "hivemind" and not snapshot.finished
    assert 3 <= snapshot.round < ROUNDS
    assert [island.rank for island in snapshot.islands] == [0, 1]
    for island in snapshot.islands:
        row = rows[island.rank][island.last_round]
        assert (island.tokens, island.train_loss) == (row["tokens"], row["train_loss"])
        assert island.bytes_sent == row["bytes_sent"]
    for record in snapshot.rounds:
        assert record.params_sha256 in (None, rows[0][record.round]["params_sha256"])
        assert record.tokens == sum(rows[r][record.round]["tokens"] for r in (0, 1))
    assert any(record.params_sha256 for record in snapshot.rounds)

    assert table.returncode == 0, table.describe()
    assert re.search(r"diloco run 'e2e-status' · hivemind · round \d+ · running", table.stdout)
    assert wrong.returncode == 1 and wrong.stdout == ""
    (line,) = wrong.stderr.strip().splitlines()
    assert "no island of run 'e2e-status' published its status yet;" in line
    assert "carry no valid tag for this run token" in line and TOKEN not in line

    after = status(reader, TOKEN)
    assert after.returncode == 0, after.describe()
    assert f"· hivemind · round {ROUNDS} · finished" in after.stdout
    summary = json.loads((run_dir / "island-0" / "summary.json").read_text())
    assert summary["params_sha256"][:16] in after.stdout
    assert os.environ["DILOCO_TOKEN"] == TOKEN
