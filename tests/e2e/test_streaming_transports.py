"""Streaming DiLoCo on the networked transports: islands that stream with the same P, tau and
alpha end on the local transport's hashes, round by round (slow: real processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import TINY, assert_ok, finish_all, metrics_rows, run_cli, start_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
STREAM = (
    "outer.fragments=2",
    "outer.overlap_steps=2",
    "outer.mix=0.5",
    "outer.rounds=3",
    "outer.inner_steps=6",
    "transport.islands=2",
)


def reference(tmp_path: Path) -> list[str]:
    config = tmp_path / "local.yaml"
    config.write_text("run: {seed: 0}\n")
    run_dir = tmp_path / "local"
    assert_ok(run_cli(["--config", str(config), *TINY, *STREAM, f"run.dir={run_dir}"], 150))
    return [row["params_sha256"] for row in metrics_rows(run_dir)]


def test_hivemind_islands_stream_to_the_local_hashes(tmp_path: Path) -> None:
    pytest.importorskip("hivemind")
    config, peers = tmp_path / "island.yaml", tmp_path / "peers.txt"
    config.write_text("run: {seed: 0}\n")
    common = [
        "--config",
        str(config),
        *TINY,
        *STREAM,
        f"run.dir={tmp_path / 'run'}",
        "transport.kind=hivemind",
        "transport.min_islands=2",
        "transport.run_id=stream",
        "transport.hivemind.host_maddrs=[/ip4/127.0.0.1/tcp/0]",
        "transport.hivemind.use_relay=false",
        "transport.hivemind.averaging_timeout_s=120",
    ]
    islands = [
        start_cli([*common, "transport.rank=0", f"transport.hivemind.address_file={peers}"]),
        start_cli([*common, "transport.rank=1", f"transport.hivemind.initial_peers_file={peers}"]),
    ]
    assert_ok(*finish_all(islands, timeout_s=360))
    hashes = [
        [row["params_sha256"] for row in metrics_rows(tmp_path / "run" / f"island-{rank}")]
        for rank in (0, 1)
    ]
    assert hashes[0] == hashes[1] == reference(tmp_path)
