"""`diloco-island` as users run it: a subprocess, its exit code, its stderr and its outputs.

Exit codes (islands/cli.py): 0 success, 1 runtime failure, 2 config error, 130 interrupted.
Every run here uses a tiny model on the built-in corpus (stdlib) and takes a few seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from harness import TINY, CliResult, FaultPlan, finish_all, metrics_rows, run_cli, start_cli

from diloco.config import IslandConfig
from diloco.metrics import REQUIRED_FIELDS


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A minimal island config whose outputs go to tmp_path/run."""
    path = tmp_path / "island.yaml"
    path.write_text(f"run:\n  dir: {tmp_path / 'run'}\n  resume: true\n")
    return path


def assert_config_error(result: CliResult, *fragments: str) -> str:
    """Exit 2, nothing on stdout, one line on stderr with no traceback, naming `fragments`."""
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.describe()
    assert lines[0].startswith("diloco-island: config error: "), result.describe()
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def summary(run_dir: Path) -> dict[str, object]:
    return json.loads((run_dir / "summary.json").read_text())


# --- config errors: exit 2, one line, the key named ------------------------------------------


@pytest.mark.timeout(30)
def test_unknown_key_names_it_and_lists_the_valid_keys(config_file: Path) -> None:
    """An unknown key is named, and every valid key of its section is listed."""
    line = assert_config_error(
        run_cli(["--config", str(config_file), "outer.sync_evry=5"]), "'outer.sync_evry'"
    )
    for field in dataclasses.fields(IslandConfig().outer):
        assert field.name in line, f"valid key {field.name} not listed"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("outer.lr=abc", ("outer.lr", "abc")),
        ("outer.inner_steps=0", ("outer.inner_steps", "got 0")),
        ("transport.islands=0", ("transport.islands", "got 0")),
        ("inner.lr=-1", ("inner.lr", "got -1")),
    ],
    ids=["wrong-type", "inner-steps-0", "islands-0", "negative-lr"],
)
def test_bad_value_names_the_key(config_file: Path, override: str, fragments: tuple[str]) -> None:
    """A value of the wrong type or an impossible value is refused, naming the key."""
    assert_config_error(run_cli(["--config", str(config_file), override]), *fragments)


@pytest.mark.timeout(30)
def test_missing_config_file_is_named(tmp_path: Path) -> None:
    """A config file that does not exist is named in the error."""
    missing = tmp_path / "no-such-island.yaml"
    assert_config_error(run_cli(["--config", str(missing)]), str(missing), "does not exist")


@pytest.mark.timeout(30)
def test_invalid_yaml_is_named(tmp_path: Path) -> None:
    """A config file that is not YAML is named in the error."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("outer: [inner_steps: 5\nrun:\n")
    assert_config_error(run_cli(["--config", str(broken)]), str(broken), "not valid YAML")


@pytest.mark.timeout(60)
def test_missing_text_data_file_names_data_path(config_file: Path, tmp_path: Path) -> None:
    """data.name=text with a data.path that does not exist names data.path and the file."""
    missing = tmp_path / "corpus.txt"
    args = [*TINY, "data.name=text", f"data.path={missing}"]
    result = run_cli(["--config", str(config_file), *args])
    assert_config_error(result, "data.path", str(missing))


@pytest.mark.timeout(60)
def test_torch_transport_without_rank_names_transport_rank(config_file: Path) -> None:
    """transport.kind=torch with neither transport.rank nor torchrun's RANK names
    transport.rank (the harness removes RANK and WORLD_SIZE from the environment)."""
    result = run_cli(
        ["--config", str(config_file), *TINY, "transport.kind=torch", "transport.islands=2"]
    )
    assert_config_error(result, "transport.rank", "RANK")


# --- runs ----------------------------------------------------------------------------------------

LEARN = [*TINY, "transport.islands=2", "inner.lr=3e-3", "inner.warmup_steps=2", "eval.every=1"]


@pytest.mark.timeout(90)
def test_short_run_lowers_val_loss_and_writes_the_output_contract(
    config_file: Path, tmp_path: Path
) -> None:
    """Four rounds on the stdlib corpus: val loss falls well below ln(256) (the loss of a
    uniform guess over bytes) and below the first evaluation; every metrics row has every field
    of the output contract; summary.json holds the last row's params_sha256."""
    rounds = 4
    args = [*LEARN, f"outer.rounds={rounds}", "outer.inner_steps=10", "eval.batches=4"]
    result = run_cli(["--config", str(config_file), *args])
    assert result.returncode == 0, result.describe()
    rows = metrics_rows(tmp_path / "run")
    assert [row["round"] for row in rows] == list(range(1, rounds + 1))
    for row in rows:
        missing = [field for field in REQUIRED_FIELDS if field not in row]
        assert not missing, f"round {row['round']} lacks {missing}"
        assert row["islands"] == 2
    losses = [row["val_loss"] for row in rows if row["val_loss"] is not None]
    assert len(losses) == rounds
    assert losses[-1] < losses[0], losses
    assert losses[-1] < math.log(256) - 1.0, losses
    final = summary(tmp_path / "run")
    assert final["params_sha256"] == rows[-1]["params_sha256"]
    assert final["val_loss"] == rows[-1]["val_loss"]
    assert final["rounds"] == rounds
    assert final["params_sha256"][:16] in result.stdout


RESUMABLE = [*LEARN, "outer.rounds=6", "outer.inner_steps=25", "run.checkpoint_every=1"]


@pytest.mark.slow  # resume bit-exact also runs in tests/e2e/test_streaming_resume.py
@pytest.mark.timeout(120)
def test_resume_after_kill_ends_where_an_uninterrupted_run_ends(
    config_file: Path, tmp_path: Path
) -> None:
    """SIGKILL mid-run, then the same command: the run resumes from its last checkpoint (the
    rows written before the kill are kept), writes exactly one row per round, and ends with
    the params_sha256 of an uninterrupted run, round by round."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run_cli(["--config", str(config_file), *RESUMABLE, f"run.dir={straight}"])
    assert done.returncode == 0, done.describe()
    expected = metrics_rows(straight)

    command = ["--config", str(config_file), *RESUMABLE, f"run.dir={killed}"]
    plan = FaultPlan().kill(island=0, round=2)
    (first,) = plan.run([start_cli(command)], [killed], timeout_s=60)
    assert first.returncode == -9, first.describe()
    before = metrics_rows(killed)
    assert 2 <= len(before) < len(expected), f"the kill came too late: {len(before)} rows"

    second = run_cli(command)
    assert second.returncode == 0, second.describe()
    after = metrics_rows(killed)
    assert [row["round"] for row in after] == [row["round"] for row in expected]
    assert after[0] == before[0], "round 1's row was rewritten: the run restarted"
    assert [r["params_sha256"] for r in after] == [r["params_sha256"] for r in expected]
    assert summary(killed)["params_sha256"] == summary(straight)["params_sha256"]


@pytest.mark.timeout(60)
def test_sigterm_exits_130_and_says_how_to_resume(config_file: Path, tmp_path: Path) -> None:
    """SIGTERM during a run: exit code 130, no traceback, and a line telling how to resume."""
    command = ["--config", str(config_file), *LEARN, "outer.rounds=200", "outer.inner_steps=20"]
    plan = FaultPlan().terminate(island=0, round=1)
    (result,) = plan.run([start_cli(command)], [tmp_path / "run"], timeout_s=45)
    assert plan.fired, f"the run ended before SIGTERM:\n{result.describe()}"
    assert result.returncode == 130, result.describe()
    assert "Traceback" not in result.stderr
    assert "run the same command again to resume" in result.stderr, result.describe()


@pytest.mark.timeout(90)
def test_torch_transport_two_processes(config_file: Path, tmp_path: Path) -> None:
    """Two `diloco-island` processes with transport.kind=torch meet through a file:// store
    and finish with the same params_sha256, round by round, in run.dir/island-<rank>/."""
    store = tmp_path / "store"
    common = [
        "--config",
        str(config_file),
        *TINY,
        "transport.kind=torch",
        "transport.islands=2",
        f"transport.torch.init_method=file://{store}",
        "transport.torch.timeout_s=60",
        "outer.rounds=3",
        "outer.inner_steps=5",
    ]
    islands = [start_cli([*common, f"transport.rank={rank}"]) for rank in (0, 1)]
    results = finish_all(islands, timeout_s=75)
    for result in results:
        assert result.returncode == 0, result.describe()
    run_dir = tmp_path / "run"
    rows = [metrics_rows(run_dir / f"island-{rank}") for rank in (0, 1)]
    assert [row["round"] for row in rows[0]] == [1, 2, 3]
    assert [r["params_sha256"] for r in rows[0]] == [r["params_sha256"] for r in rows[1]]
    hashes = [summary(run_dir / f"island-{rank}")["params_sha256"] for rank in (0, 1)]
    assert hashes[0] == hashes[1] == rows[0][-1]["params_sha256"]


@pytest.mark.timeout(90)
def test_torch_islands_with_different_models_refuse_to_start(
    config_file: Path, tmp_path: Path
) -> None:
    """Two islands whose models differ (d_model) meet, compare fingerprints and both stop with
    exit 2 and one line naming the model, before any training."""
    store = tmp_path / "store"
    common = [
        "--config",
        str(config_file),
        *TINY,
        "transport.kind=torch",
        "transport.islands=2",
        f"transport.torch.init_method=file://{store}",
        "transport.torch.timeout_s=60",
    ]
    widths = ["model.d_model=16", "model.d_model=32"]
    islands = [start_cli([*common, f"transport.rank={r}", widths[r]]) for r in (0, 1)]
    for result in finish_all(islands, timeout_s=75):
        assert result.returncode == 2, result.describe()
        assert "Traceback" not in result.stderr
        assert "islands differ and cannot average together: initial weights:" in result.stderr
        assert "model: island 0" in result.stderr


# --- hardening (issue 12, items 9-12): every user error is exit 2 and at most 2 lines -------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key", ["outer.lr", "inner.lr", "inner.weight_decay"])
def test_an_infinite_float_is_refused_before_training(config_file: Path, key: str) -> None:
    """inf used to pass the schema's `> 0` checks: a round trained, then the codec failed with
    exit 1 naming no key."""
    result = run_cli(["--config", str(config_file), *TINY, "outer.rounds=1", f"{key}=inf"])
    assert_config_error(result, f"{key} must be a finite number, got inf")


@pytest.mark.timeout(30)
def test_a_malformed_override_value_is_one_line_naming_it(config_file: Path) -> None:
    """outer.lr=[0.5 used to exit 1 with yaml's 4-line parser error."""
    result = run_cli(["--config", str(config_file), "outer.lr=[0.5"])
    assert_config_error(result, "override 'outer.lr=[0.5'", "not valid YAML")


@pytest.mark.timeout(30)
def test_an_empty_config_file_is_refused(tmp_path: Path) -> None:
    """An empty file used to start the full default run in runs/default."""
    empty = tmp_path / "island.yaml"
    empty.write_text("")
    result = run_cli(["--config", str(empty)], cwd=tmp_path)
    assert_config_error(result, str(empty), "holds no settings")
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(30)
def test_a_seq_len_that_cannot_fit_is_refused_at_load_time(config_file: Path) -> None:
    """A huge data.seq_len used to run out of memory (exit 1) while building the model."""
    result = run_cli(["--config", str(config_file), *TINY, "data.seq_len=100000000000"])
    assert_config_error(result, "data.seq_len=100000000000 is too large", "of memory")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "the following arguments are required: --config"),
        (["--config"], "argument --config: expected one argument"),
        (["--config", "x.yaml", "--bogus"], "unrecognized arguments: --bogus"),
    ],
    ids=["no-config", "config-without-file", "unknown-option"],
)
def test_usage_errors_fit_in_two_lines(args: list[str], fragment: str) -> None:
    """argparse wrapped its usage line: 3 lines. Now: the error, then the usage on one line."""
    result = run_cli(args)
    assert result.returncode == 2, result.describe()
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 2, result.describe()
    assert lines[0] == f"diloco-island: usage error: {fragment}", result.describe()
    assert lines[1].startswith("usage: diloco-island "), result.describe()


FACTORY_CASES = {
    "model-raises": (
        "def build(**args):\n    raise ValueError('width must be even')\n",
        ["model.name=user_plugin:build"],
        ("model.name: 'user_plugin:build' raised ValueError: width must be even",),
    ),
    "data-raises": (
        "def build(**args):\n    raise FileNotFoundError('shards/ is empty')\n",
        ["data.name=user_plugin:build"],
        ("data.name: 'user_plugin:build' raised FileNotFoundError: shards/ is empty",),
    ),
    "import-fails": (
        "raise RuntimeError('needs a licence server')\n",
        ["model.name=user_plugin:build"],
        ("model.name: module 'user_plugin' failed to import: RuntimeError: needs a licence",),
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(FACTORY_CASES))
def test_a_failing_plugin_names_its_key_and_module(tmp_path: Path, case: str) -> None:
    """A user's factory that raises, or a module that fails at import, is exit 2 naming
    model.name / data.name and module:factory; --debug adds the factory's traceback."""
    source, overrides, fragments = FACTORY_CASES[case]
    (tmp_path / "user_plugin.py").write_text(source)
    config = tmp_path / "island.yaml"
    config.write_text(f"run:\n  dir: {tmp_path / 'run'}\n")
    # A factory model reads none of the GPT's keys (each would add a warning line).
    tiny = [
        arg for arg in TINY if not (arg.startswith("model.") and "model.name" in str(overrides))
    ]
    command = ["--config", str(config), *tiny, *overrides]
    result = run_cli(command, cwd=tmp_path)
    line = assert_config_error(result, *fragments)
    assert line.endswith("(run with --debug for the traceback)"), line
    debug = run_cli([*command, "--debug"], cwd=tmp_path)
    assert debug.returncode == 2, debug.describe()
    assert "Traceback" in debug.stderr and "user_plugin.py" in debug.stderr, debug.describe()
    assert debug.stderr.strip().splitlines()[-1].startswith("diloco-island: config error: ")


@pytest.mark.timeout(30)
def test_a_multi_line_runtime_error_is_one_line(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Library errors (torch's, yaml's) can span many lines: the CLI prints the first, exit 1
    (in process: the runtime is replaced by one that fails)."""
    from islands import cli

    def fail(config: object) -> int:
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB\nSee the docs")

    monkeypatch.setattr(cli, "_run", fail)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # keep pytest's SIGTERM
    assert cli.main(["--config", str(config_file)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "diloco-island: RuntimeError: CUDA out of memory. […2 more lines] "
        "(run with --debug for the traceback)"
    ]


# --- regime advice (issue 15) ------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("overrides", "warned"),
    [
        # 4 islands of 32 tokens a step, H = 5, no warm phase
        (["transport.islands=4", "outer.inner_steps=5"], True),
        # (a warm phase that silences it: tests/unit/test_advice.py)
        (["outer.inner_steps=5"], False),  # one island: nothing to trail
    ],
)
def test_the_cli_warns_once_where_the_regime_map_saw_diloco_trail(
    config_file: Path, overrides: list[str], warned: bool
) -> None:
    result = run_cli(["--config", str(config_file), *TINY, "outer.rounds=1", *overrides], 50)
    assert result.returncode == 0, result.describe()
    lines = [line for line in result.stderr.splitlines() if "regime:" in line]
    advice = summary(config_file.parent / "run")["regime_advice"]
    if not warned:
        assert lines == [] and advice is None, result.describe()
        return
    assert len(lines) == 1, result.describe()
    assert "outer.warmup_rounds" in lines[0] and "data.batch_size" in lines[0]
    # summary.json keeps it, and the printed summary ends with it
    assert isinstance(advice, str) and advice in lines[0]
    assert result.stdout.strip().splitlines()[-1].strip() == advice


@pytest.mark.timeout(90)
def test_one_island_with_the_default_outer_step_trains_exactly_as_plain_adamw(
    config_file: Path, tmp_path: Path
) -> None:
    """outer.lr, outer.momentum and outer.nesterov left unset give one island plain training:
    the same parameters, bit for bit, as the plain-AdamW settings spelled out (issue 15)."""
    common = [*TINY, "transport.islands=1", "outer.rounds=2", "outer.inner_steps=5"]
    plain = ["outer.lr=1", "outer.momentum=0", "outer.nesterov=false"]
    hashes = []
    for name, extra in (("defaults", []), ("plain", plain)):
        out = tmp_path / name
        result = run_cli(["--config", str(config_file), *common, *extra, f"run.dir={out}"])
        assert result.returncode == 0, result.describe()
        hashes.append(summary(out)["params_sha256"])
    # (That a value set by hand is kept: tests/unit/test_outer_step_defaults.py.)
    assert hashes[0] == hashes[1]
