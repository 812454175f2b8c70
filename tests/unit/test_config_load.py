"""load_config: every user mistake becomes one ConfigError naming the key and what was expected."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from diloco.config import load_config
from diloco.config.schema import CodecName, Device, Progress, TorchBackend, TransportKind
from diloco.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "island.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    config = load_config(None)
    assert config.transport.kind is TransportKind.local
    assert config.outer.inner_steps == 50


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == load_config(None)


# --- unknown keys ---------------------------------------------------------------------------


def test_unknown_top_level_key_lists_the_sections() -> None:
    with pytest.raises(ConfigError, match="unknown key 'sync_evry'") as caught:
        load_config(None, ["sync_evry=1"])
    assert "Valid keys at the top level: data, eval, inner, model, outer, run, transport" in str(
        caught.value
    )


def test_unknown_nested_key_in_yaml_suggests_and_lists_the_section(tmp_path: Path) -> None:
    path = write(tmp_path, "outer:\n  inner_step: 5\n")
    with pytest.raises(ConfigError, match="unknown key 'outer.inner_step'") as caught:
        load_config(path)
    message = str(caught.value)
    assert "Did you mean 'inner_steps'?" in message
    assert (
        "Valid keys in 'outer': block_size, codec, error_feedback, error_feedback_decay, "
        "inner_steps, lr, momentum, nesterov, reset_inner_optimizer, rounds, topk_fraction"
        in message
    )


def test_unknown_key_two_levels_deep() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'transport\.torch\.bogus'.*"
        r"Valid keys in 'transport\.torch': backend, init_method, timeout_s",
    ):
        load_config(None, ["transport.torch.bogus=1"])


# --- wrong types ----------------------------------------------------------------------------


def test_wrong_type_in_yaml_names_the_full_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^outer\.lr: Value 'fast'.*Float"):
        load_config(write(tmp_path, "outer:\n  lr: fast\n"))


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("outer.lr=abc", r"^outer\.lr: .*'abc'"),
        ("outer.rounds=2.5", r"^outer\.rounds: .*Integer"),
        ("outer.nesterov=maybe", r"^outer\.nesterov: .*not a valid bool"),
        ("transport.islands=many", r"^transport\.islands: "),
    ],
)
def test_wrong_type_override_names_the_full_key(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("transport.kind=foo", r"transport\.kind: Invalid value 'foo', expected one of "),
        (
            "run.device=gpu",
            r"run\.device: Invalid value 'gpu', expected one of \[auto, cpu, cuda\]",
        ),
        ("run.device=CPU", r"run\.device: Invalid value 'CPU'"),
        (
            "outer.codec=int4",
            r"outer\.codec: Invalid value 'int4', expected one of \[none, fp16, bf16, int8, fp8, "
            r"fp4, fp4_e2m1, fp4_e3m0, topk\]",
        ),
    ],
)
def test_unknown_enum_value_lists_the_choices(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


# --- impossible values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["outer.rounds=0"], r"^outer\.rounds must be >= 1, got 0"),
        (["outer.inner_steps=0"], r"^outer\.inner_steps must be >= 1 \(H\), got 0"),
        (["outer.lr=0"], r"^outer\.lr must be > 0"),
        (["outer.momentum=1.5"], r"^outer\.momentum must be in \[0, 1\), got 1\.5"),
        (["outer.momentum=1"], r"^outer\.momentum must be in \[0, 1\)"),
        (["outer.momentum=-0.1"], r"^outer\.momentum must be in \[0, 1\)"),
        (["outer.block_size=0"], r"^outer\.block_size must be in \[1, 4294967295\], got 0"),
        (
            ["outer.codec=topk", "outer.block_size=65537"],
            r"^outer\.block_size must be in \[1, 65536\] with codec topk, got 65537",
        ),
        (["outer.topk_fraction=0"], r"^outer\.topk_fraction must be in \(0, 1\], got 0\.0"),
        (["outer.topk_fraction=1.5"], r"^outer\.topk_fraction must be in \(0, 1\]"),
        (["transport.islands=0"], r"^transport\.islands must be >= 1, got 0"),
        (["transport.rank=-2"], r"^transport\.rank must be >= -1, got -2"),
        (
            ["transport.islands=2", "transport.rank=2"],
            r"^transport\.rank must be in \[0, transport\.islands=2\), got 2",
        ),
        (
            ["transport.torch.init_method=http://host:1"],
            r"^transport\.torch\.init_method must be env://, tcp://host:port or file:///path",
        ),
        (["transport.torch.timeout_s=0"], r"^transport\.torch\.timeout_s must be > 0"),
        (
            ["run.device=cpu", "transport.torch.backend=nccl"],
            r"^transport\.torch\.backend nccl needs run\.device cuda or auto",
        ),
        (["run.checkpoint_every=-1"], r"^run\.checkpoint_every must be >= 0"),
        (["run.keep_checkpoints=0"], r"^run\.keep_checkpoints must be >= 1"),
        (["run.threads=-1"], r"^run\.threads must be >= 0"),
        (["inner.lr=-1"], r"^inner\.lr must be > 0, got -1\.0"),
        (["inner.warmup_steps=-1"], r"^inner\.warmup_steps must be >= 0"),
        (["inner.min_lr_ratio=1.5"], r"^inner\.min_lr_ratio must be in \[0, 1\]"),
        (["inner.weight_decay=-0.1"], r"^inner\.weight_decay must be >= 0"),
        (["inner.beta1=1"], r"^inner\.beta1 must be in \[0, 1\)"),
        (["inner.beta2=1"], r"^inner\.beta2 must be in \[0, 1\)"),
        (["inner.grad_clip=-1"], r"^inner\.grad_clip must be >= 0"),
        (["data.name=text"], r"^data\.path must name a file when data\.name is 'text'"),
        (["data.name=tokens"], r"^data\.path must name a file when data\.name is 'tokens'"),
        (["data.name=wikipedia"], r"^data\.name must be stdlib, text, tokens or module:factory"),
        (["data.val_fraction=0"], r"^data\.val_fraction must be in \(0, 1\)"),
        (["data.batch_size=0"], r"^data\.batch_size must be >= 1"),
        (["data.seq_len=0"], r"^data\.seq_len must be >= 1"),
        (["model.name=llama"], r"^model\.name must be gpt or module:factory, got 'llama'"),
        (["model.n_layer=0"], r"^model\.n_layer must be >= 1"),
        (["model.n_head=0"], r"^model\.n_head must be >= 1"),
        (
            ["model.d_model=130"],
            r"^model\.d_model must be a positive multiple of model\.n_head=4, got 130",
        ),
        (["model.vocab_size=1"], r"^model\.vocab_size must be >= 2"),
        (["model.dropout=1"], r"^model\.dropout must be in \[0, 1\)"),
        (["eval.every=-1"], r"^eval\.every must be >= 0"),
        (["eval.batches=0"], r"^eval\.batches must be >= 1"),
    ],
)
def test_impossible_value_is_refused_with_its_yaml_path(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_impossible_value_in_a_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^outer\.momentum must be in \[0, 1\), got 1\.5"):
        load_config(write(tmp_path, "outer:\n  momentum: 1.5\n"))


def test_hivemind_kind_loads_and_names_bad_settings() -> None:
    config = load_config(None, ["transport.kind=hivemind", "transport.islands=3"])
    assert config.transport.hivemind.host_maddrs == ["/ip4/0.0.0.0/tcp/0"]
    with pytest.raises(ConfigError, match=r"^transport\.hivemind\.request_timeout_s must be in"):
        load_config(None, ["transport.kind=hivemind", "transport.hivemind.request_timeout_s=20"])
    peers_error = r"^transport\.hivemind\.initial_peers must be multiaddrs"
    with pytest.raises(ConfigError, match=peers_error):
        load_config(None, ["transport.hivemind.initial_peers=[127.0.0.1:5000]"])


# --- files and overrides --------------------------------------------------------------------


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(
        ConfigError, match=rf"config file '{re.escape(str(missing))}' does not exist"
    ):
        load_config(missing)


def test_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path)


def test_invalid_yaml_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "outer: [1\n")
    with pytest.raises(
        ConfigError, match=rf"config file '{re.escape(str(path))}' is not valid YAML: "
    ):
        load_config(path)


def test_yaml_list_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(
        ConfigError, match=rf"config file '{re.escape(str(path))}' must hold a mapping of sections$"
    ):
        load_config(path)


def test_override_without_equals_sign() -> None:
    with pytest.raises(
        ConfigError,
        match=r"override 'outer\.lr' must look like key=value \(e\.g\. outer\.lr=0\.5\)",
    ):
        load_config(None, ["outer.lr"])


def test_overrides_beat_the_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "outer:\n  lr: 0.5\n  inner_steps: 20\nrun:\n  seed: 3\n")
    config = load_config(path, ["outer.lr=0.25", "run.seed=7"])
    assert config.outer.lr == 0.25
    assert config.run.seed == 7
    assert config.outer.inner_steps == 20  # from the YAML
    assert config.outer.momentum == 0.9  # from the schema


def test_last_override_wins() -> None:
    assert load_config(None, ["outer.rounds=3", "outer.rounds=4"]).outer.rounds == 4


def test_override_can_fix_a_yaml_value(tmp_path: Path) -> None:
    path = write(tmp_path, "outer:\n  momentum: 1.5\n")
    assert load_config(path, ["outer.momentum=0.5"]).outer.momentum == 0.5


def test_enum_values_parse_from_strings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "run:\n  device: cpu\n  progress: lines\ntransport:\n  kind: torch\n"
        "  torch:\n    backend: gloo\nouter:\n  codec: none\n",
    )
    config = load_config(path)
    assert config.run.device is Device.cpu
    assert config.run.progress is Progress.lines
    assert config.transport.kind is TransportKind.torch
    assert config.transport.torch.backend is TorchBackend.gloo
    assert config.outer.codec is CodecName.none
    assert load_config(None, ["run.device=cuda"]).run.device is Device.cuda


def test_int_is_accepted_for_a_float_key() -> None:
    config = load_config(None, ["outer.lr=1"])
    assert config.outer.lr == 1.0
    assert isinstance(config.outer.lr, float)


def test_factory_args_are_free_form() -> None:
    config = load_config(None, ["data.name=my_data:build", "data.args.path=/x", "model.args.n=3"])
    assert config.data.args == {"path": "/x"}
    assert config.model.args == {"n": 3}


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("run: 3\n", r"^run must be a section of keys \(checkpoint_every, .*\), got 3$"),
        ("transport:\n  torch: 5\n", r"^transport\.torch must be a section of keys \(backend, "),
    ],
)
def test_a_section_given_a_scalar_names_the_section(
    tmp_path: Path, text: str, pattern: str
) -> None:
    path = tmp_path / "island.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^run must be a section"):
        load_config(None, ["run=3"])
