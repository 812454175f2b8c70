"""Checkpoints through the CLI (issue 12, items 13-16): a damaged checkpoint never blocks a
resume, a fresh start never deletes an earlier run, a diverged run stops before it saves itself,
and nothing is ever unpickled."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
from harness import TINY, CliResult, assert_ok, metrics_rows, params_hashes, run_cli

pytestmark = pytest.mark.timeout(240)

ROUNDS = ("outer.rounds=3", "outer.inner_steps=2", "run.keep_checkpoints=2")


CONFIG = "transport: {kind: local, islands: 2}\n"


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "island.yaml"
    path.write_text(CONFIG)
    return str(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished 3-round run, trained once for the tests that only damage or move it."""
    folder = tmp_path_factory.mktemp("finished")
    (folder / "island.yaml").write_text(CONFIG)
    assert_ok(run(str(folder / "island.yaml"), folder / "run"))
    return folder / "run"


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def run(config: str, run_dir: Path, *extra: str) -> CliResult:
    return run_cli(
        ["--config", config, *TINY, *ROUNDS, f"run.dir={run_dir}", *extra], timeout_s=150
    )


def one_line(result: CliResult) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if "WARNING" not in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.describe()
    return lines[0]


# The bit flip runs in make test (the checksum catches it); empty and random files, whose
# header does not even parse, are the same fallback and run in make test-all.
@pytest.mark.parametrize(
    "damage",
    [
        pytest.param("empty", marks=pytest.mark.slow),
        pytest.param("random", marks=pytest.mark.slow),
        "bit-flip",
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    damage: str, config: str, tmp_path: Path
) -> None:
    """Round 3's file is damaged after a finished run; rerunning with more rounds warns,
    naming the file, resumes from round 2 and ends on an uninterrupted run's hashes."""
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    assert_ok(run(config, straight, "outer.rounds=4"))
    assert_ok(run(config, damaged, "outer.rounds=4", "run.checkpoint_every=1"))
    newest = damaged / "checkpoints" / "round-000004.safetensors"
    data = newest.read_bytes()
    broken = {
        "empty": b"",
        "random": bytes((i * 7919) % 256 for i in range(len(data))),
        "bit-flip": data[:-1] + bytes([data[-1] ^ 0x10]),
    }[damage]
    newest.write_bytes(broken)
    result = run(config, damaged, "outer.rounds=4")
    assert_ok(result)
    assert "skipping a damaged checkpoint" in result.stderr
    assert "round-000004.safetensors" in result.stderr
    assert params_hashes(damaged) == params_hashes(straight)


def test_no_intact_checkpoint_is_exit_2_naming_the_folder(
    config: str, tmp_path: Path, finished_run: Path
) -> None:
    run_dir = copy_of(finished_run, tmp_path)
    for path in (run_dir / "checkpoints").glob("*.safetensors"):
        path.write_bytes(b"\x00" * 64)
    result = run(config, run_dir, "outer.rounds=4")
    assert result.returncode == 2, result.describe()
    line = one_line(result)
    assert "no intact checkpoint in" in line and str(run_dir / "checkpoints") in line


def test_resume_false_moves_an_earlier_run_aside(
    config: str, tmp_path: Path, finished_run: Path
) -> None:
    """run.resume=false starts at round 0 and keeps what was there, moved to previous-*/."""
    run_dir = copy_of(finished_run, tmp_path)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    first_rows = metrics_rows(run_dir)
    result = run(config, run_dir, "run.resume=false", "outer.rounds=1")
    assert_ok(result)
    (aside,) = run_dir.glob("previous-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == before
    assert [json.loads(line) for line in (aside / "metrics.jsonl").read_text().splitlines()] == (
        first_rows
    )
    assert [row["round"] for row in metrics_rows(run_dir)] == [1]
    assert str(aside.name) in result.stderr  # the warning says where they went


def test_a_diverged_run_stops_before_saving_and_writes_strict_json(
    config: str, tmp_path: Path
) -> None:
    """outer.lr=1e10: the run stops with exit 1 and one line naming the round; no checkpoint
    of a non-finite state is written (a rerun fails the same clear way, not in a codec);
    metrics.jsonl stays strict JSON (null, never NaN)."""
    run_dir = tmp_path / "run"
    args = ("outer.lr=1e10", "outer.rounds=6")
    result = run(config, run_dir, *args)
    assert result.returncode == 1, result.describe()
    line = one_line(result)
    assert "TrainingDiverged" in line and "round" in line and "outer.lr" in line
    for text in (run_dir / "metrics.jsonl").read_text().splitlines():
        assert "NaN" not in text and "Infinity" not in text
        json.loads(text)
    import torch

    from diloco.checkpoint import list_checkpoints, load_checkpoint

    for round in list_checkpoints(run_dir / "checkpoints"):
        anchor = load_checkpoint(run_dir / "checkpoints", round)["outer"]["anchor"]
        assert torch.isfinite(anchor).all(), f"round {round} saved a non-finite state"
    again = run(config, run_dir, *args)
    assert again.returncode == 1 and "TrainingDiverged" in one_line(again), again.describe()


def test_an_old_pickle_checkpoint_is_refused_not_loaded(config: str, tmp_path: Path) -> None:
    """A round-*.pt (an earlier version's pickle, or a file crafted to run code) is never
    unpickled: the run refuses in one line naming the folder (exit 2)."""
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    marker = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(marker),))  # type: ignore[return-value]

    (checkpoints / "round-000002.pt").write_bytes(pickle.dumps(Evil()))
    result = run(config, run_dir)
    assert result.returncode == 2, result.describe()
    assert "earlier diloco version" in one_line(result) and str(checkpoints) in result.stderr
    assert not marker.exists()


def test_a_pickled_jest_reference_is_never_unpickled(config: str, tmp_path: Path) -> None:
    """data.selector.reference.checkpoint pointing at a pickle that would run code: refused
    (torch.load with weights_only=True), exit 2 naming the key."""
    marker = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(marker),))  # type: ignore[return-value]

    reference = tmp_path / "reference.pt"
    reference.write_bytes(pickle.dumps({"weight": Evil()}))
    result = run(
        config,
        tmp_path / "run",
        "data.selector.name=jest",
        f"data.selector.reference.checkpoint={reference}",
    )
    assert result.returncode == 2, result.describe()
    assert "data.selector.reference.checkpoint" in one_line(result)
    assert not marker.exists()
