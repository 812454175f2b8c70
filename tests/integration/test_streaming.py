"""Streaming DiLoCo through the runtime: P = 1, tau = 0 is the blocking round bit for bit; the
local and torch transports give the same hashes for the same P, tau and alpha; the rounds,
bytes and utilization it reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from harness import TINY, connect_store, spawn_children, tcp_store

from diloco.config import load_config
from diloco.errors import ConfigError
from diloco.metrics import read_metrics
from diloco.outer.config import OuterConfig
from islands.island import run_island

pytestmark = pytest.mark.timeout(180)
COMMON = [
    *TINY,
    "outer.rounds=3",
    "outer.inner_steps=8",
    "inner.warmup_steps=2",
    "inner.lr=3e-3",
    "eval.every=1",
    "transport.islands=2",
    "transport.torch.timeout_s=60",
]
STREAM = ["outer.fragments=3", "outer.overlap_steps=2", "outer.mix=0.5"]


def hashes(rows: list[dict[str, Any]]) -> list[str]:
    return [row["params_sha256"] for row in rows]


def local(run_dir: Path, *extra: str) -> list[dict[str, Any]]:
    run_island(load_config(None, [*COMMON, *extra, f"run.dir={run_dir}"]))
    return read_metrics(run_dir / "metrics.jsonl")


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_one_fragment_without_overlap_is_the_blocking_round(
    codec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The streaming loop forced on with P = 1, tau = 0: every round's hash is the blocking
    loop's (error feedback on for the lossy codec: the residual follows the same path)."""
    extra = (f"outer.codec={codec}", f"outer.error_feedback={codec != 'none'}")
    blocking = local(tmp_path / "blocking", *extra)
    monkeypatch.setattr(OuterConfig, "streaming", property(lambda self: True))
    streaming = local(tmp_path / "streaming", *extra)
    assert hashes(streaming) == hashes(blocking)
    assert [r["val_loss"] for r in streaming] == [r["val_loss"] for r in blocking]
    assert [r["bytes_sent"] for r in streaming] == [r["bytes_sent"] for r in blocking]


def test_rows_say_what_streaming_did(tmp_path: Path) -> None:
    rows = local(tmp_path, *STREAM)
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert [row["inner_step"] for row in rows] == [10, 18, 24]  # H + tau, ..., the end
    per_fragment = rows[-1]["bytes_sent_per_fragment"]
    assert len(per_fragment) == 3 and sum(per_fragment) == rows[-1]["bytes_sent"]
    assert all(0 < row["compute_utilization"] <= 1 and row["blocked_s"] >= 0 for row in rows)
    # One fragment on the wire at a time: each sync event sends about a third.
    blocking = local(tmp_path / "blocking")
    assert max(per_fragment) < 0.6 * blocking[-1]["bytes_sent"]


def test_eager_moves_the_replicas_not_the_shared_state_rules(tmp_path: Path) -> None:
    """Eager updates change the trajectory (the replicas move earlier) and keep every
    island's shared parameters equal."""
    plain = local(tmp_path / "plain", *STREAM)
    eager = local(tmp_path / "eager", *STREAM, "outer.eager=true")
    assert hashes(plain)[0] == hashes(eager)[0]  # no last exchange yet: nothing to estimate
    assert hashes(plain)[-1] != hashes(eager)[-1]


def _torch_island(port: int, rank: int, run_dir: str) -> list[dict[str, Any]]:
    config = load_config(
        None,
        [*COMMON, *STREAM, "transport.kind=torch", f"transport.rank={rank}", f"run.dir={run_dir}"],
    )
    run_island(config, store=connect_store(port))
    return read_metrics(Path(run_dir) / f"island-{rank}" / "metrics.jsonl")


def test_torch_islands_stream_to_the_local_transports_hashes(tmp_path: Path) -> None:
    store = tcp_store()
    islands = spawn_children(
        _torch_island, [(store.port, rank, str(tmp_path / "torch")) for rank in (0, 1)], 150
    )
    reference = local(tmp_path / "local", *STREAM)
    assert hashes(islands[0]) == hashes(islands[1]) == hashes(reference)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("outer.overlap_steps=8", "outer.overlap_steps must be in [0, outer.inner_steps=8)"),
        ("outer.fragments=9", "outer.fragments must be in [1, outer.inner_steps=8]"),
        ("outer.mix=1.5", "outer.mix must be in [0, 1]"),
    ],
)
def test_impossible_streaming_settings_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        load_config(None, [*COMMON, override])


def test_more_fragments_than_tensors_is_refused(tmp_path: Path) -> None:
    config = load_config(
        None, [*COMMON, "outer.inner_steps=100", "outer.fragments=90", f"run.dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match="outer.fragments must be at most the model's"):
        run_island(config)
