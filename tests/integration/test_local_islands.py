"""Four local islands through the real runtime: one shared state, one row per round.

The runtime's pieces (`build_runtime`, `resume`, `run_rounds`, `write_summary`) run here with an
events hook that, after every round, captures the anchor and outer momentum of each hosted
island: the DESIGN invariant is that they are bit-identical on every island, every round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from harness import TINY

from diloco.codecs import NoneCodec
from diloco.config import load_config
from diloco.metrics import REQUIRED_FIELDS, read_metrics
from diloco.outer import params_sha256
from diloco.transports import ring_allreduce_bytes
from islands.island import Runtime, build_runtime, resume, run_rounds
from islands.outputs import write_summary

NUM_ISLANDS = 4
ROUNDS = 3


class SharedStateRecorder:
    """RunEvents that snapshots every hosted island's shared state after each round."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.rows: list[dict[str, Any]] = []
        self.anchors: list[list[bytes]] = []
        self.momenta: list[list[bytes]] = []
        self.rounds: list[list[int]] = []

    def on_start(self, total_steps: int, done_steps: int) -> None:
        return None

    def on_step(self) -> None:
        return None

    def on_announce(self, message: str) -> None:
        return None

    def on_round(self, row: dict[str, Any]) -> None:
        hosted = self.runtime.hosted
        self.rows.append(row)
        self.anchors.append([island.outer.anchor_N.numpy().tobytes() for island in hosted])
        self.momenta.append(
            [island.outer.outer_state["momentum"].numpy().tobytes() for island in hosted]
        )
        self.rounds.append([island.outer.round for island in hosted])


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("four-islands")
    config = load_config(
        None,
        [
            *TINY,
            "transport.kind=local",
            f"transport.islands={NUM_ISLANDS}",
            f"outer.rounds={ROUNDS}",
            "outer.inner_steps=3",
            "inner.warmup_steps=1",
            "eval.every=1",
            f"run.dir={run_dir}",
        ],
    )
    runtime = build_runtime(config)
    recorder = SharedStateRecorder(runtime)
    try:
        run_rounds(runtime, resume(runtime), recorder)
        summary = write_summary(runtime)
    finally:
        runtime.abort()
    return {
        "recorder": recorder,
        "numel": runtime.numel,
        "summary": summary,
        "rows": read_metrics(Path(run_dir) / "metrics.jsonl"),
    }


def test_every_island_holds_the_same_anchor_after_every_round(local_run: dict[str, Any]) -> None:
    """After each round all four islands' anchors and outer momenta are bit-identical, the
    anchor moves every round, and the row's params_sha256 is the hash of that anchor."""
    recorder: SharedStateRecorder = local_run["recorder"]
    assert len(recorder.anchors) == ROUNDS
    for index, (anchors, momenta, rounds) in enumerate(
        zip(recorder.anchors, recorder.momenta, recorder.rounds, strict=True)
    ):
        assert len(anchors) == NUM_ISLANDS
        assert len(set(anchors)) == 1, f"round {index + 1}: anchors differ across islands"
        assert len(set(momenta)) == 1, f"round {index + 1}: outer momenta differ"
        assert rounds == [index + 1] * NUM_ISLANDS
        expected_hash = params_sha256(torch.frombuffer(bytearray(anchors[0]), dtype=torch.float32))
        assert recorder.rows[index]["params_sha256"] == expected_hash
    assert len({anchors[0] for anchors in recorder.anchors}) == ROUNDS, "the anchor did not move"


def test_one_metrics_row_per_round(local_run: dict[str, Any]) -> None:
    """metrics.jsonl has exactly one row per round, rounds 1..R, every contract field, all
    four islands counted, and summary's params_sha256 is the last row's."""
    rows = local_run["rows"]
    assert [row["round"] for row in rows] == list(range(1, ROUNDS + 1))
    for row in rows:
        assert set(REQUIRED_FIELDS) <= set(row), set(REQUIRED_FIELDS) - set(row)
        assert row["islands"] == NUM_ISLANDS
        assert row["inner_step"] == 3 * row["round"]
    assert local_run["summary"]["params_sha256"] == rows[-1]["params_sha256"]


def test_bytes_are_a_ring_all_reduce_of_the_payload_per_round(local_run: dict[str, Any]) -> None:
    """bytes_sent and bytes_received grow by ring_allreduce_bytes(payload) each round, where
    the payload is the fp32 pseudo-gradient plus the codec header."""
    payload = NoneCodec().payload_bytes(local_run["numel"])
    per_round = ring_allreduce_bytes(payload, NUM_ISLANDS)
    assert per_round == 2 * 3 * payload // 4
    for row in local_run["rows"]:
        assert row["bytes_sent"] == row["round"] * per_round
        assert row["bytes_received"] == row["round"] * per_round
