"""The model.hf, data.hf and run.wandb sections as omegaconf structured configs, without torch."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from omegaconf import OmegaConf

from diloco.data.hf_config import HfDataConfig
from diloco.errors import ConfigError
from diloco.metrics.wandb_config import WandbConfig, WandbMode
from diloco.models.hf_config import HfModelConfig


@dataclass(kw_only=True)
class Model:
    name: str = "gpt"
    hf: HfModelConfig = field(default_factory=HfModelConfig)


@dataclass(kw_only=True)
class Sections:
    model: Model = field(default_factory=Model)
    data: HfDataConfig = field(default_factory=HfDataConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def load(yaml: str, overrides: tuple[str, ...] = ()) -> Sections:
    merged = OmegaConf.merge(
        OmegaConf.structured(Sections),
        OmegaConf.create(yaml),
        OmegaConf.from_dotlist(list(overrides)),
    )
    loaded = OmegaConf.to_object(merged)
    assert isinstance(loaded, Sections)
    return loaded


def test_model_hf_config_holds_a_mapping_or_a_directory() -> None:
    inline = load("model: {hf: {config: {model_type: llama, hidden_size: 64}}}")
    assert inline.model.hf.config == {"model_type": "llama", "hidden_size": 64}
    assert type(inline.model.hf.config) is dict
    overridden = load(
        "model: {hf: {config: {model_type: llama, hidden_size: 64}}}",
        ("model.hf.config.hidden_size=128",),
    )
    assert overridden.model.hf.config == {"model_type": "llama", "hidden_size": 128}
    assert load("model: {hf: {config: /models/tiny}}").model.hf.config == "/models/tiny"
    assert load("model: {hf: {pretrained: /models/tiny}}").model.hf.pretrained == "/models/tiny"


def test_section_errors_name_the_yaml_key() -> None:
    with pytest.raises(ConfigError, match=r"^model.hf.config: an inline config needs model_type"):
        load("model: {hf: {config: {hidden_size: 64}}}")
    with pytest.raises(ConfigError, match=r"^model.hf.config and model.hf.pretrained"):
        load("model: {hf: {config: /a, pretrained: /b}}")
    with pytest.raises(ConfigError, match=r"^data.hf.field must name"):
        load("data: {field: ''}")


def test_data_hf_and_wandb_defaults() -> None:
    loaded = load("data: {files: 'docs/*.jsonl', tokenizer: tok.json}\nwandb: {project: p}")
    assert loaded.data == HfDataConfig(files="docs/*.jsonl", field="text", tokenizer="tok.json")
    assert loaded.wandb.mode is WandbMode.online and loaded.wandb.enabled
    assert not load("wandb: {project: p, mode: disabled}").wandb.enabled
    assert not WandbConfig().enabled


def test_the_config_modules_do_not_import_torch() -> None:
    """A config error must answer without loading torch (or transformers, datasets, wandb)."""
    code = (
        "import sys, diloco.models.hf_config, diloco.data.hf_config, diloco.metrics.wandb_config\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'wandb') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""
