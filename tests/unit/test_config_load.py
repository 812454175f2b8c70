"""load_config: every user mistake becomes one ConfigError naming the key and what was expected."""

from __future__ import annotations

import dataclasses
import enum
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
from omegaconf import DictConfig, OmegaConf
from omegaconf.nodes import BooleanNode, FloatNode

from diloco.config import IslandConfig, load_config
from diloco.config.checks import (
    check_gpt_memory,
    check_numbers,
    estimate_gpt_memory,
    host_memory_bytes,
)
from diloco.errors import ConfigError


def value_of(member: object) -> object:
    """An enum member's value; the enum classes live with their components (not imported)."""
    assert isinstance(member, enum.Enum), f"{member!r} is not an enum member"
    return member.value


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "island.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    config = load_config(None)
    assert value_of(config.transport.kind) == "local"
    assert config.outer.inner_steps == 50


@pytest.mark.parametrize("text", ["", "\n  \n", "# only a comment\n", "null\n", "~\n", "{}\n"])
def test_a_file_without_settings_is_refused(tmp_path: Path, text: str) -> None:
    """An empty file (a wrong path, a file not written yet) must not start the full default
    run: it is refused, naming the file."""
    path = write(tmp_path, text)
    with pytest.raises(
        ConfigError, match=rf"^config file '{re.escape(str(path))}' holds no settings"
    ):
        load_config(path)


# --- unknown keys ---------------------------------------------------------------------------


def test_unknown_top_level_key_lists_the_sections() -> None:
    with pytest.raises(ConfigError, match="unknown key 'sync_evry'") as caught:
        load_config(None, ["sync_evry=1"])
    assert (
        "Valid keys at the top level: data, eval, inner, island, model, outer, run, transport"
        in str(caught.value)
    )


def test_unknown_nested_key_in_yaml_suggests_and_lists_the_section(tmp_path: Path) -> None:
    path = write(tmp_path, "outer:\n  inner_step: 5\n")
    with pytest.raises(ConfigError, match="unknown key 'outer.inner_step'") as caught:
        load_config(path)
    message = str(caught.value)
    assert "Did you mean 'inner_steps'?" in message
    valid = sorted(field.name for field in dataclasses.fields(IslandConfig().outer))
    assert {"inner_steps", "lr", "momentum", "codec"} <= set(valid)
    assert f"Valid keys in 'outer': {', '.join(valid)}" in message


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
        (
            ["data.name=wikipedia"],
            r"^data\.name must be stdlib, text, tokens, hf or module:factory",
        ),
        (["data.val_fraction=0"], r"^data\.val_fraction must be in \(0, 1\)"),
        (["data.batch_size=0"], r"^data\.batch_size must be >= 1"),
        (["data.seq_len=0"], r"^data\.seq_len must be >= 1"),
        (["model.name=llama"], r"^model\.name must be gpt, hf or module:factory, got 'llama'"),
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
    with pytest.raises(
        ConfigError, match=rf"^config file '{re.escape(str(tmp_path))}' is a directory"
    ):
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
        ConfigError,
        match=rf"config file '{re.escape(str(path))}' must hold a mapping of sections, "
        r"got a YAML list$",
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
    assert config.outer.momentum == 0.0  # unset: the schema's rule for one island


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
    assert value_of(config.run.device) == "cpu"
    assert value_of(config.run.progress) == "lines"
    assert value_of(config.transport.kind) == "torch"
    assert value_of(config.transport.torch.backend) == "gloo"
    assert value_of(config.outer.codec) == "none"
    assert value_of(load_config(None, ["run.device=cuda"]).run.device) == "cuda"


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


# --- numbers: every float finite, every integer within 64 bits --------------------------------


def _keys_of(node_type: type) -> list[str]:
    """Every field of the schema whose node is `node_type`, found by walking it (so a new one
    is covered too)."""
    keys: list[str] = []

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                walk(child, f"{prefix}{key}.")
            elif isinstance(child, node_type):
                keys.append(f"{prefix}{key}")

    walk(OmegaConf.structured(IslandConfig), "")
    return keys


def _float_keys() -> list[str]:
    return _keys_of(FloatNode)


def test_the_schema_has_float_keys_to_check() -> None:
    """The walk below is not vacuous: it finds the float keys the issue named."""
    keys = _float_keys()
    assert {"outer.lr", "inner.lr", "inner.weight_decay", "transport.grpc.retry_s"} <= set(keys)


@pytest.mark.parametrize("key", _float_keys())
def test_every_float_key_refuses_a_non_finite_value(key: str) -> None:
    """inf used to pass `lr > 0` and fail a round later in the codec, naming no key."""
    for value, shown in (("inf", "inf"), ("-inf", "-inf"), ("nan", "nan"), ("1e400", "inf")):
        with pytest.raises(
            ConfigError, match=rf"^{re.escape(key)} must be a finite number, got {shown}$"
        ):
            load_config(None, [f"{key}={value}"])


# --- switches: true or false, never any other number --------------------------------------


def test_the_schema_has_switches_to_check() -> None:
    assert {"transport.grpc.insecure", "outer.eager", "run.resume"} <= set(_keys_of(BooleanNode))


@pytest.mark.parametrize("key", _keys_of(BooleanNode))
def test_every_switch_refuses_a_number_other_than_0_or_1(key: str) -> None:
    """omegaconf reads any number as true: `transport.grpc.insecure=-1` turned TLS off."""
    for value, shown in (("-1", "-1"), ("2", "2"), ("'7'", "'7'")):
        with pytest.raises(
            ConfigError, match=rf"^{re.escape(key)} must be true or false, got {shown}$"
        ):
            load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", False), ("1", True), ("true", True), ("false", False), ("yes", True), ("off", False)],
)
def test_a_switch_takes_true_false_their_words_and_0_or_1(value: str, expected: bool) -> None:
    assert load_config(None, [f"outer.eager={value}"]).outer.eager is expected


def test_a_switch_in_a_yaml_file_given_a_number_is_named(tmp_path: Path) -> None:
    text = "transport:\n  grpc:\n    insecure: 3\n"
    with pytest.raises(
        ConfigError, match=r"^transport\.grpc\.insecure must be true or false, got 3$"
    ):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("text", ["outer:\n  lr: .inf\n", "inner:\n  weight_decay: .nan\n"])
def test_a_non_finite_float_in_a_yaml_file_is_named(tmp_path: Path, text: str) -> None:
    key = "outer.lr" if "outer" in text else "inner.weight_decay"
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be a finite number, got "):
        load_config(write(tmp_path, text))


def test_a_non_finite_float_through_an_interpolation_is_named() -> None:
    with pytest.raises(ConfigError, match=r"^outer\.lr must be a finite number, got inf$"):
        load_config(None, ["inner.lr=inf", "outer.lr=${inner.lr}"])


def test_factory_args_are_the_factorys_own_business() -> None:
    """model.args / data.args are free-form: a factory may give inf a meaning of its own."""
    assert load_config(None, ["model.name=m:f", "model.args.limit=.inf"]).model.args["limit"] == (
        float("inf")
    )


@dataclass
class _Leaf:
    rates: list[float] = field(default_factory=lambda: [0.5, 0.25])
    scale: float = 1.0


@dataclass
class _Root:
    leaf: _Leaf = field(default_factory=_Leaf)
    leaves: list[_Leaf] = field(default_factory=list)
    table: dict[str, float] = field(default_factory=dict)
    maybe: Optional[float] = None  # noqa: UP045 (omegaconf reads the annotation)
    free: dict[str, Any] = field(default_factory=dict)
    count: int = 0


@pytest.mark.parametrize(
    ("dotlist", "key"),
    [
        (["leaf.scale=inf"], "leaf.scale"),
        (["leaf.rates=[0.5, -inf]"], "leaf.rates[1]"),
        (["table.a=1.0", "table.b=nan"], "table.b"),
        (["maybe=inf"], "maybe"),
        (["leaves=[{scale: 2.0}, {scale: inf}]"], "leaves[1].scale"),
    ],
)
def test_the_walk_reaches_nested_sections_lists_and_typed_dicts(
    dotlist: list[str], key: str
) -> None:
    """The check is generic: any float field, wherever its dataclass lives, is checked."""
    config = OmegaConf.merge(OmegaConf.structured(_Root), OmegaConf.from_dotlist(dotlist))
    assert isinstance(config, DictConfig)
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be a finite number, got "):
        check_numbers(config)


def test_the_walk_passes_finite_values_none_and_free_form_data() -> None:
    dotlist = ["maybe=2.5", "free.x=inf", "table.a=3", "count=7", "leaf.rates=[]"]
    config = OmegaConf.merge(OmegaConf.structured(_Root), OmegaConf.from_dotlist(dotlist))
    assert isinstance(config, DictConfig)
    check_numbers(config)  # no error
    check_numbers(OmegaConf.structured(_Root))


@pytest.mark.parametrize("value", [str(2**63), str(-(2**63) - 1), "1" + "0" * 23])
def test_an_integer_beyond_64_bits_is_named(value: str) -> None:
    """torch and numpy hold sizes in 64 bits: a bigger integer would fail later, unnamed."""
    with pytest.raises(
        ConfigError, match=r"^data\.seq_len must fit in a signed 64-bit integer, got "
    ):
        load_config(None, [f"data.seq_len={value}"])


# --- malformed files and overrides -----------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("outer.lr=[0.5", r"^override 'outer\.lr=\[0\.5': the value is not valid YAML \(did not "),
        ("outer.lr={a", r"^override 'outer\.lr=\{a': the value is not valid YAML \("),
        ("outer.lr=a: b: c", r"^override 'outer\.lr=a: b: c': the value is not valid YAML \("),
        (
            "model.args.x=" + "[" * 20000,
            r"^override 'model\.args\.x=\[+…': the value is not valid YAML",
        ),
        ("model.args.x=\x00", r"^override 'model\.args\.x=\\x00': the value is not valid YAML"),
        ("=3", r"^override '=3' must look like key=value \(the key is empty\)"),
        ("outer..lr=1", r"^override 'outer\.\.lr=1' must look like key=value \(the key has an "),
        (".lr=1", r"^override '\.lr=1' must look like key=value \(the key has an empty part\)"),
    ],
)
def test_a_malformed_override_is_one_line_naming_it(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as caught:
        load_config(None, ["outer.rounds=2", override])
    assert "\n" not in str(caught.value)


def test_a_yaml_scalar_is_refused(tmp_path: Path) -> None:
    """A bare word used to become a key of its own ("unknown key 'hello'")."""
    for text, kind in (("hello\n", "str"), ("42\n", "int")):
        path = write(tmp_path, text)
        with pytest.raises(
            ConfigError,
            match=rf"^config file '{re.escape(str(path))}' must hold a mapping of sections, "
            rf"got a YAML {kind}$",
        ):
            load_config(path)


@pytest.mark.parametrize(
    "text",
    ["a: " + "[" * 600 + "\n", "a: " + "[" * 200 + "]" * 200 + "\n"],
    ids=["unclosed", "closed"],
)
def test_deep_nesting_is_refused_in_one_line(tmp_path: Path, text: str) -> None:
    """The YAML parser and omegaconf recurse: a RecursionError used to escape (exit 1)."""
    path = write(tmp_path, text)
    with pytest.raises(
        ConfigError, match=rf"^config file '{re.escape(str(path))}' is not valid YAML: "
    ):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^override 'model\.args\.x=\[+…': the value is not"):
        load_config(None, [f"model.args.x={text[3:-1]}"])


def test_binary_garbage_is_refused_in_one_line(tmp_path: Path) -> None:
    for garbage in (b"\x00\xff\xfe\x01junk", b"outer:\n  lr: \x00\n", bytes(range(256))):
        path = tmp_path / "island.yaml"
        path.write_bytes(garbage)
        with pytest.raises(ConfigError, match=rf"^config file '{re.escape(str(path))}' ") as caught:
            load_config(path)
        assert "\n" not in str(caught.value)


def test_a_huge_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A data file passed as --config by mistake: refused by its size, not read into memory."""
    path = tmp_path / "data.bin"
    with open(path, "wb") as handle:
        handle.truncate(2**30)  # sparse: no disk used
    with pytest.raises(
        ConfigError,
        match=rf"^config file '{re.escape(str(path))}' is 1073741824 bytes; a config is a few ",
    ):
        load_config(path)


def test_a_device_or_pipe_is_not_a_config_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # reading it would block forever
    for path in (Path("/dev/null"), fifo):
        with pytest.raises(
            ConfigError, match=rf"^config file '{re.escape(str(path))}' is not a regular file$"
        ):
            load_config(path)


def test_an_unreadable_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permissions (simulated: these tests may run as root, who reads anything)."""
    path = write(tmp_path, "outer:\n  lr: 0.5\n")

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(
        ConfigError,
        match=rf"^config file '{re.escape(str(path))}' cannot be read: Permission denied$",
    ):
        load_config(path)


# --- sizes that must fit the machine ------------------------------------------------------------


def test_the_estimate_counts_the_built_in_gpts_parameters_exactly() -> None:
    """The estimate's parameter count is GPT.num_params(), position table included."""
    from diloco.models import build_model

    for overrides in ([], ["model.n_layer=2", "model.d_model=48", "model.n_head=3"]):
        config = load_config(None, [*overrides, "data.seq_len=96"])
        estimate = estimate_gpt_memory(config, on_cuda=False)
        model = build_model(config.model, context=config.data.seq_len)
        assert estimate.num_params == sum(p.numel() for p in model.parameters())
        assert estimate.position_params == 96 * config.model.d_model


def test_a_huge_seq_len_is_refused_at_load_time_naming_it() -> None:
    """10^10 positions: the position table alone is 5 TB of fp32 before the first step."""
    with pytest.raises(
        ConfigError,
        match=r"^data\.seq_len=10000000000 is too large: the built-in GPT needs at least "
        r"[\d,.]+ [TP]iB of memory \(",
    ) as caught:
        load_config(None, ["data.seq_len=10000000000"])
    assert "\n" not in str(caught.value)


def test_a_module_factory_model_is_not_estimated() -> None:
    """Only the built-in GPT's sizes are known before it is built (and a factory's data
    source holds its own validation batches)."""
    config = load_config(None, ["model.name=m:f", "data.name=m:f", "data.seq_len=10000000000"])
    assert config.data.seq_len == 10**10


def test_memory_check_against_a_given_budget() -> None:
    """Refused just below the estimate, accepted at it; the message names the device."""
    config = load_config(None, ["run.device=cpu", "data.seq_len=4096", "model.dropout=0.1"])
    estimate = estimate_gpt_memory(config, on_cuda=False)
    # The math attention kernel (dropout on cpu) holds B*H*T*T scores: they dominate here.
    assert estimate.attention_score_bytes == 16 * 4 * 4096 * 4096 * 4
    check_gpt_memory(config, on_cuda=False, available_bytes=estimate.total_bytes, where="cpu")
    with pytest.raises(
        ConfigError,
        match=r"^data\.batch_size=16 with data\.seq_len=4096 is too large: .* this cpu has ",
    ):
        check_gpt_memory(
            config, on_cuda=False, available_bytes=estimate.total_bytes - 1, where="this cpu"
        )
    fused = estimate_gpt_memory(load_config(None, ["data.seq_len=4096"]), on_cuda=True)
    assert fused.attention_score_bytes == 0  # flash / memory-efficient kernels hold no scores


def test_host_memory_is_known_on_linux() -> None:
    host = host_memory_bytes()
    assert host is None or host > 2**20


def test_validation_batches_that_cannot_fit_are_refused() -> None:
    """The built-in data sources hold every validation batch in memory for the whole run:
    10^9 batches of 16 x 129 int64 tokens are 15 TiB, whatever the model."""
    with pytest.raises(
        ConfigError,
        match=r"^eval\.batches=1000000000 with data\.batch_size=16 and data\.seq_len=128 is too "
        r"large: the validation batches, held in memory, need [\d,.]+ TiB \(int64 tokens\)",
    ):
        load_config(None, ["eval.batches=1000000000"])
    # A factory's data source builds its own validation batches: not estimated.
    assert load_config(None, ["data.name=m:f", "eval.batches=1000000000"]).eval.batches == 10**9
