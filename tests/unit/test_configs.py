"""The shipped configs load, the option list is frozen, and docs/config.md matches the schema."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from diloco.config import load_config, schema
from diloco.config.docs import all_field_docs, config_markdown, field_docs, iter_fields, main
from diloco.config.run import Device
from diloco.config.schema import IslandConfig
from diloco.transports.config import TransportConfig, TransportKind

ROOT = Path(__file__).resolve().parents[2]
YAML_FILES = sorted(
    path
    for folder in ("configs", "examples")
    for pattern in ("*.yaml", "*.yml")
    for path in (ROOT / folder).rglob(pattern)
)

# Every dotted key a user can set. Adding, renaming or removing an option is a reviewed
# decision (torchtitan's test_no_new_cli_options.py): change this list in the same commit.
FROZEN_KEYS = [
    "run.dir",
    "run.seed",
    "run.device",
    "run.precision",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.init_from",
    "run.resume",
    "run.progress",
    "run.tensorboard",
    "run.threads",
    "run.compile",
    "run.wandb.project",
    "run.wandb.name",
    "run.wandb.mode",
    "transport.kind",
    "transport.islands",
    "transport.rank",
    "transport.run_id",
    "transport.min_islands",
    "transport.aggregate",
    "transport.trim_fraction",
    "transport.clip_norm",
    "transport.torch.init_method",
    "transport.torch.backend",
    "transport.torch.timeout_s",
    "transport.grpc.address",
    "transport.grpc.listen",
    "transport.grpc.role",
    "transport.grpc.serve",
    "transport.grpc.token_env",
    "transport.grpc.token_file",
    "transport.grpc.tls_cert",
    "transport.grpc.tls_key",
    "transport.grpc.tls_ca",
    "transport.grpc.mutual_tls",
    "transport.grpc.insecure",
    "transport.grpc.deadline_floor_s",
    "transport.grpc.deadline_ceiling_s",
    "transport.grpc.deadline_slack",
    "transport.grpc.stream_idle_s",
    "transport.grpc.fingerprint_file",
    "transport.grpc.retry_s",
    "transport.grpc.linger_s",
    "transport.grpc.dataplane.enabled",
    "transport.grpc.dataplane.listen",
    "transport.grpc.dataplane.max_connections",
    "transport.grpc.dataplane.max_pending",
    "transport.grpc.dataplane.max_connections_per_island",
    "transport.grpc.dataplane.hello_timeout_s",
    "transport.grpc.dataplane.inactivity_timeout_s",
    "transport.grpc.dataplane.chunk_bytes",
    "transport.grpc.dataplane.socket_buffer_bytes",
    "transport.grpc.dataplane.ticket_ttl_s",
    "transport.grpc.dataplane.replay_cache_size",
    "transport.grpc.max_lanes",
    "transport.grpc.status_listen",
    "transport.hivemind.initial_peers",
    "transport.hivemind.initial_peers_file",
    "transport.hivemind.address_file",
    "transport.hivemind.host_maddrs",
    "transport.hivemind.announce_maddrs",
    "transport.hivemind.use_relay",
    "transport.hivemind.use_auto_relay",
    "transport.hivemind.client_mode",
    "transport.hivemind.identity_path",
    "transport.hivemind.matchmaking_s",
    "transport.hivemind.request_timeout_s",
    "transport.hivemind.next_chunk_timeout_s",
    "transport.hivemind.averaging_timeout_s",
    "transport.hivemind.state_timeout_s",
    "transport.hivemind.token_env",
    "transport.hivemind.token_file",
    "outer.rounds",
    "outer.inner_steps",
    "outer.optimizer",
    "outer.lr",
    "outer.lr_schedule",
    "outer.min_lr_ratio",
    "outer.momentum",
    "outer.momentum_warmup_rounds",
    "outer.warmup_rounds",
    "outer.warmup_lr",
    "outer.nesterov",
    "outer.betas",
    "outer.eps",
    "outer.optimizer_args",
    "outer.codec",
    "outer.block_size",
    "outer.topk_fraction",
    "outer.error_feedback",
    "outer.error_feedback_decay",
    "outer.offload_state",
    "outer.reset_inner_optimizer",
    "outer.fragments",
    "outer.overlap_steps",
    "outer.mix",
    "outer.eager",
    "inner.lr",
    "inner.warmup_steps",
    "inner.min_lr_ratio",
    "inner.weight_decay",
    "inner.beta1",
    "inner.beta2",
    "inner.grad_clip",
    "inner.grad_accum",
    "data.name",
    "data.path",
    "data.val_path",
    "data.val_fraction",
    "data.token_dtype",
    "data.batch_size",
    "data.seq_len",
    "data.noise",
    "data.selector.name",
    "data.selector.ratio",
    "data.selector.score",
    "data.selector.temperature",
    "data.selector.rescore_every",
    "data.selector.reference.checkpoint",
    "data.selector.reference.data",
    "data.selector.reference.train_steps",
    "data.selector.reference.lr",
    "data.selector.reference.n_layer",
    "data.selector.reference.n_head",
    "data.selector.reference.d_model",
    "data.args",
    "data.hf.files",
    "data.hf.field",
    "data.hf.tokenizer",
    "model.name",
    "model.n_layer",
    "model.n_head",
    "model.d_model",
    "model.vocab_size",
    "model.dropout",
    "model.args",
    "model.hf.config",
    "model.hf.pretrained",
    "eval.every",
    "eval.batches",
    "island.parallel",
    "island.ranks",
]

# The public contract (README, docs/config.md): these keys must keep existing.
CONTRACT_KEYS = [
    "run.dir",
    "run.seed",
    "run.device",
    "transport.kind",
    "transport.islands",
    "outer.rounds",
    "outer.inner_steps",
    "outer.lr",
    "outer.lr_schedule",
    "outer.min_lr_ratio",
    "outer.momentum",
    "outer.momentum_warmup_rounds",
    "outer.warmup_rounds",
    "outer.warmup_lr",
    "outer.nesterov",
    "outer.codec",
    "inner.lr",
    "data.name",
    "data.batch_size",
    "data.seq_len",
    "model.name",
]


def schema_keys() -> list[str]:
    """Dotted keys of every settable leaf of the schema, in declaration order."""
    keys: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[item.name]):
                walk(hints[item.name], f"{prefix}{item.name}.")
            else:
                keys.append(f"{prefix}{item.name}")

    walk(IslandConfig, "")
    return keys


def test_shipped_yaml_files_are_found() -> None:
    assert ROOT / "configs" / "demo.yaml" in YAML_FILES
    assert ROOT / "configs" / "torch-2-islands.yaml" in YAML_FILES


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_loads(path: Path) -> None:
    assert isinstance(load_config(path), IslandConfig)


def test_demo_config_is_four_local_islands() -> None:
    config = load_config(ROOT / "configs" / "demo.yaml")
    assert config.transport.kind is TransportKind.local
    assert config.transport.islands == 4
    assert config.data.name == "stdlib"


def test_torch_example_is_two_torch_islands() -> None:
    config = load_config(ROOT / "configs" / "torch-2-islands.yaml")
    assert config.transport.kind is TransportKind.torch
    assert config.transport.islands == 2
    assert config.transport.rank == -1  # torchrun's RANK, or transport.rank=<r> per site


def test_config_keys_are_frozen() -> None:
    keys = schema_keys()
    added = sorted(set(keys) - set(FROZEN_KEYS))
    removed = sorted(set(FROZEN_KEYS) - set(keys))
    assert keys == FROZEN_KEYS, (
        f"the config keys changed (added {added}, removed {removed}, or reordered). "
        "Adding or removing an option is a reviewed decision: update FROZEN_KEYS in "
        "tests/unit/test_configs.py in the same change, and run `make docs`."
    )


def test_docs_generator_walks_the_same_keys() -> None:
    leaves = [key for key, _, _, kind in iter_fields() if not dataclasses.is_dataclass(kind)]
    assert leaves == schema_keys()


@pytest.mark.parametrize("key", CONTRACT_KEYS)
def test_public_contract_key_exists(key: str) -> None:
    assert key in schema_keys()


def test_public_contract_enum_values() -> None:
    assert [d.value for d in Device] == ["auto", "cpu", "cuda"]
    assert [k.value for k in TransportKind] == ["local", "torch", "grpc", "hivemind"]


def test_outer_defaults_are_the_papers_with_several_islands() -> None:
    """(One island: plain training, tests/unit/test_outer_step_defaults.py.)"""
    outer = IslandConfig(transport=TransportConfig(islands=4)).outer
    assert outer.lr == 0.7
    assert outer.momentum == 0.9
    assert outer.nesterov is True


def test_every_field_has_a_docstring() -> None:
    docs = all_field_docs()
    missing = [
        key for key, owner, item, _ in iter_fields() if not docs.get((owner.__name__, item.name))
    ]
    assert not missing, (
        f"fields without a docstring: {missing}; write the string literal under each field "
        "(its unit and paper symbol) in its section's module, then run `make docs`"
    )


def test_the_docstring_reader_reads_each_section_from_its_own_module() -> None:
    """A field's docstring comes from the module that defines its section (not schema.py)."""
    docs = field_docs(inspect.getsource(schema))
    assert ("IslandConfig", "outer") in docs and ("OuterConfig", "lr") not in docs
    assert all_field_docs()[("OuterConfig", "lr")].startswith("Outer learning rate")


def test_registries_own_the_names_the_config_offers() -> None:
    """Each closed set of the config lists exactly its registry's names (one place to add one)."""
    from diloco.aggregate import AGGREGATES
    from diloco.codecs.registry import CODECS, CodecName
    from diloco.data.selectors.config import SELECTORS, SelectorName
    from diloco.outer.config import OUTER_OPTIMIZERS
    from diloco.transports.config import TRANSPORTS, Aggregate

    assert [name.value for name in CodecName] == list(CODECS)
    assert [name.value for name in SelectorName] == list(SELECTORS)
    assert list(TransportKind) == list(TRANSPORTS)
    assert [name.value for name in Aggregate] == list(AGGREGATES)
    assert list(OUTER_OPTIMIZERS) == ["sgd", "adam"]


def test_loading_a_config_does_not_import_torch() -> None:
    """Config errors answer at once: the schema and every section's module stay light."""
    code = (
        "import sys; from diloco.config import load_config; load_config('configs/demo.yaml');"
        "heavy = [m for m in ('torch', 'grpc', 'hivemind', 'numpy') if m in sys.modules];"
        "print(heavy)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_config_md_is_up_to_date() -> None:
    page = ROOT / "docs" / "config.md"
    assert page.is_file() and page.read_text() == config_markdown(), (
        "docs/config.md is stale: run `make docs` "
        "(python -m diloco.config.docs > docs/config.md) and commit the result"
    )


def test_config_md_documents_every_key_and_enum_value() -> None:
    page = config_markdown()
    for key in schema_keys():
        assert f"| `{key}` |" in page
    assert "`local` \\| `torch` \\| `grpc` \\| `hivemind`" in page
    assert "H in the paper" in page


def test_docs_main_prints_the_page(capsys: pytest.CaptureFixture[str]) -> None:
    main()
    assert capsys.readouterr().out == config_markdown()
