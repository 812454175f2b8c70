"""`diloco-island status`'s logic (`islands/status.py:run_status`): a table and exit code 0 when
the run is reachable, exit code 1 and one line saying why when it is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from status_fixtures import scripted_snapshot

from diloco.config import IslandConfig, load_config
from diloco.status import RunUnreachable, StatusSnapshot, StatusUnavailable
from islands.status import outer_settings, run_status


def config_for(kind: str, run_dir: Path, islands: int = 2) -> IslandConfig:
    overrides = [f"transport.kind={kind}", f"transport.islands={islands}", f"run.dir={run_dir}"]
    if kind != "local":
        overrides.append("transport.rank=0")
    return load_config(None, overrides)


def write_local_run(run_dir: Path, rounds: int) -> None:
    run_dir.mkdir(parents=True)
    rows = [
        {
            "round": r,
            "tokens": 64 * r,
            "train_loss": 3.0,
            "val_loss": None,
            "bytes_sent": 10 * r,
            "bytes_received": 10 * r,
            "sync_s": 0.1,
            "compute_s": 0.2,
            "islands": 2,
            "params_sha256": "ab" * 32,
            "time": 1.0 * r,
        }
        for r in range(1, rounds + 1)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def no_fetch(config: IslandConfig) -> StatusSnapshot:
    raise AssertionError("a local run must not be fetched")


def test_local_run_prints_the_table(tmp_path: Path) -> None:
    write_local_run(tmp_path / "run", rounds=3)
    config = config_for("local", tmp_path / "run")
    code, text = run_status(config, fetch_coordinator=no_fetch, fetch_hivemind=no_fetch)
    assert code == 0
    assert text.startswith("diloco run 'diloco' · local · round 3 · running")
    assert "settings: outer.rounds=10, outer.inner_steps=50" in text
    assert len([line for line in text.splitlines() if line.startswith(("   0 ", "   1 "))]) == 2


def test_as_json_answers_the_snapshot_document(tmp_path: Path) -> None:
    write_local_run(tmp_path / "run", rounds=2)
    config = config_for("local", tmp_path / "run")
    code, text = run_status(config, fetch_coordinator=None, fetch_hivemind=None, as_json=True)
    assert code == 0
    snapshot = StatusSnapshot.from_json(text)
    assert (snapshot.round, len(snapshot.islands)) == (2, 2)


@pytest.mark.parametrize(
    ("kind", "prepare", "message"),
    [
        ("local", False, "status: run.dir {run} does not exist (has the run started?)"),
        ("local", True, "status: no metrics yet in {run}/metrics.jsonl"),
        ("torch", True, "status: no metrics yet in {run}/island-<rank>/metrics.jsonl"),
    ],
)
def test_unreadable_run_dir_is_one_line(
    tmp_path: Path, kind: str, prepare: bool, message: str
) -> None:
    run = tmp_path / "run"
    if prepare:
        run.mkdir()
    code, text = run_status(config_for(kind, run), fetch_coordinator=None, fetch_hivemind=None)
    assert (code, text) == (1, message.format(run=run))


def test_grpc_and_hivemind_use_their_fetchers(tmp_path: Path) -> None:
    asked: list[str] = []

    def fetch(kind: str) -> object:
        def fetcher(config: IslandConfig) -> StatusSnapshot:
            asked.append(kind)
            return scripted_snapshot(2, 4, transport=config.transport.kind.value)

        return fetcher

    grpc = config_for("grpc", tmp_path)
    code, text = run_status(grpc, fetch_coordinator=fetch("grpc"), fetch_hivemind=no_fetch)  # type: ignore[arg-type]
    assert code == 0 and "· grpc · round 4" in text and "site-1.example.org" in text
    hivemind = config_for("hivemind", tmp_path)
    code, text = run_status(hivemind, fetch_coordinator=no_fetch, fetch_hivemind=fetch("dht"))  # type: ignore[arg-type]
    assert code == 0 and "· hivemind · round 4" in text
    assert asked == ["grpc", "dht"]


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            ConnectionRefusedError(111, "Connection refused"),
            "status: grpc run 'diloco' unreachable: [Errno 111] Connection refused",
        ),
        (TimeoutError(), "status: grpc run 'diloco' unreachable: TimeoutError"),
        (
            StatusUnavailable("the coordinator refused the run token\n(check token_env)"),
            "status: the coordinator refused the run token (check token_env)",
        ),
    ],
)
def test_an_unreachable_coordinator_is_one_line(
    tmp_path: Path, error: Exception, line: str
) -> None:
    def failing(config: IslandConfig) -> StatusSnapshot:
        raise error

    code, text = run_status(
        config_for("grpc", tmp_path), fetch_coordinator=failing, fetch_hivemind=None
    )
    assert (code, text) == (1, line)
    assert "\n" not in text


def test_without_a_fetcher_the_command_says_so(tmp_path: Path) -> None:
    code, text = run_status(
        config_for("hivemind", tmp_path), fetch_coordinator=None, fetch_hivemind=None
    )
    assert (code, text) == (1, "status: reading a hivemind run is not available in this build")


def test_outer_settings_are_flat_and_follow_the_optimizer(tmp_path: Path) -> None:
    sgd = outer_settings(config_for("grpc", tmp_path))
    assert sgd["outer.lr"] == 0.7 and sgd["outer.momentum"] == 0.9
    assert sgd["transport.aggregate"] == "mean"
    assert all(isinstance(value, str | int | float | bool) for value in sgd.values())
    adam = outer_settings(load_config(None, ["outer.optimizer=adam"]))
    assert "outer.momentum" not in adam and "transport.aggregate" not in adam


def write_finished_grpc_run(run_dir: Path, rounds: int, finished: bool) -> None:
    for rank in (0, 1):
        write_local_run(run_dir / f"island-{rank}", rounds)
        if finished:
            (run_dir / f"island-{rank}" / "summary.json").write_text(json.dumps({"rounds": rounds}))


@pytest.mark.parametrize("kind", ["grpc", "hivemind"])
def test_once_nothing_answers_a_finished_run_is_read_from_run_dir(
    tmp_path: Path, kind: str
) -> None:
    def gone(config: IslandConfig) -> StatusSnapshot:
        raise RunUnreachable("the coordinator at 127.0.0.1:1 is unreachable: connection refused")

    write_finished_grpc_run(tmp_path / "run", rounds=3, finished=True)
    code, text = run_status(
        config_for(kind, tmp_path / "run"), fetch_coordinator=gone, fetch_hivemind=gone
    )
    assert code == 0
    assert text.startswith(f"diloco run 'diloco' · {kind} · round 3 · finished")


def test_a_run_still_going_or_a_refusal_is_not_read_from_run_dir(tmp_path: Path) -> None:
    def gone(config: IslandConfig) -> StatusSnapshot:
        raise RunUnreachable("the coordinator at 127.0.0.1:1 is unreachable: connection refused")

    def refused(config: IslandConfig) -> StatusSnapshot:
        raise StatusUnavailable("the coordinator at 127.0.0.1:1 refused the run token")

    write_finished_grpc_run(tmp_path / "run", rounds=3, finished=False)
    config = config_for("grpc", tmp_path / "run")
    assert run_status(config, fetch_coordinator=gone, fetch_hivemind=None) == (
        1,
        "status: the coordinator at 127.0.0.1:1 is unreachable: connection refused",
    )
    write_finished_grpc_run(tmp_path / "done", rounds=3, finished=True)
    config = config_for("grpc", tmp_path / "done")
    assert run_status(config, fetch_coordinator=refused, fetch_hivemind=None) == (
        1,
        "status: the coordinator at 127.0.0.1:1 refused the run token",
    )
