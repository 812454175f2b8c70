"""Export to a Hugging Face directory and warm start from one: same logits, same weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers", reason='needs the hf extra: pip install -e ".[hf]"')

import torch
from transformers import AutoModelForCausalLM

from diloco.errors import ConfigError
from diloco.models.gpt import GPT, GPTConfig
from diloco.models.hf import HfCausalLM, build_hf_model
from diloco.models.hf_config import HfModelConfig
from diloco.models.hf_export import export_hf, gpt_to_gpt2, load_hf_weights_
from diloco.outer import flatten_params, params_sha256

T, V = 16, 64
LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": T,
    "vocab_size": V,
}
GPT2: dict[str, Any] = {
    "model_type": "gpt2",
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": T,
    "vocab_size": V,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def trained_like(model: torch.nn.Module, seed: int = 5) -> torch.nn.Module:
    """Perturb every weight (norm gains and biases included) away from its initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def small_gpt(seed: int = 0, d_model: int = 32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=4, d_model=d_model, vocab_size=V, context=T))


def sha(model: torch.nn.Module) -> str:
    return params_sha256(flatten_params(list(model.parameters())))


def idx() -> torch.Tensor:
    return torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(2))


def test_built_in_gpt_exports_as_gpt2_with_the_same_logits(tmp_path: Path) -> None:
    gpt = trained_like(small_gpt())
    assert isinstance(gpt, GPT)
    export_hf(gpt, tmp_path, eos_token_id=0)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        ours, theirs = gpt.logits(idx()), loaded(input_ids=idx()).logits
    assert (ours - theirs).abs().max().item() < 1e-5


def test_the_conversion_keeps_the_tied_embedding_and_every_tensor() -> None:
    gpt = trained_like(small_gpt())
    assert isinstance(gpt, GPT)
    gpt2 = gpt_to_gpt2(gpt)
    assert gpt2.lm_head.weight.data_ptr() == gpt2.transformer.wte.weight.data_ptr()
    assert sum(p.numel() for p in gpt2.parameters()) == sum(p.numel() for p in gpt.parameters())


@pytest.mark.parametrize("fields", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_hf_models_export_with_the_same_logits(tmp_path: Path, fields: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = build_hf_model(HfModelConfig(config=fields), seq_len=T, vocab_size=V)
    trained_like(model)
    export_hf(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        ours, theirs = model.logits(idx()), loaded(input_ids=idx()).logits
    assert (ours - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("fields", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_warm_start_from_a_pretrained_directory_has_exactly_its_weights(
    tmp_path: Path, fields: dict[str, Any]
) -> None:
    """model.hf.pretrained: the first round starts from the directory's weights (hash)."""
    torch.manual_seed(0)
    source = trained_like(build_hf_model(HfModelConfig(config=fields), seq_len=T, vocab_size=V))
    assert isinstance(source, HfCausalLM)
    source.model.save_pretrained(tmp_path)
    torch.manual_seed(123)  # another seed: nothing may come from the random init
    warm = build_hf_model(HfModelConfig(pretrained=str(tmp_path)), seq_len=T, vocab_size=V)
    assert sha(warm) == sha(source)
    assert [n for n, _ in warm.named_parameters()] == [n for n, _ in source.named_parameters()]


def test_a_bf16_checkpoint_trains_in_fp32_with_the_same_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_hf_model(HfModelConfig(config=LLAMA), seq_len=T, vocab_size=V)
    source.model.to(torch.bfloat16).save_pretrained(tmp_path)
    warm = build_hf_model(HfModelConfig(pretrained=str(tmp_path)), seq_len=T, vocab_size=V)
    assert all(p.dtype == torch.float32 for p in warm.parameters())
    assert sha(warm) == sha(source)  # bf16 -> fp32 is exact


def test_warm_start_of_the_built_in_gpt_from_its_export(tmp_path: Path) -> None:
    exported = trained_like(small_gpt(seed=0))
    export_hf(exported, tmp_path)
    fresh = small_gpt(seed=1)
    assert sha(fresh) != sha(exported)
    load_hf_weights_(fresh, tmp_path)
    assert sha(fresh) == sha(exported)


def test_warm_start_refuses_a_directory_of_other_sizes(tmp_path: Path) -> None:
    export_hf(small_gpt(), tmp_path)
    with pytest.raises(ConfigError, match=r"^run.init_from: .* n_embd is 32, expected 64"):
        load_hf_weights_(small_gpt(d_model=64), tmp_path)
    with pytest.raises(ConfigError, match=r"^run.init_from: .* holds no config.json"):
        load_hf_weights_(small_gpt(), tmp_path / "missing")


def test_export_refuses_a_model_it_cannot_convert(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^export needs model.name: gpt or hf, got a Linear"):
        export_hf(torch.nn.Linear(2, 2), tmp_path)


class CompiledStandIn(torch.nn.Module):
    """What torch.compile returns, as far as export reads it (the real one: test_inner_compile)."""

    def __init__(self, original: torch.nn.Module):
        super().__init__()
        self._orig_mod = original


def test_a_compiled_model_exports_its_original(tmp_path: Path) -> None:
    gpt = small_gpt()
    export_hf(CompiledStandIn(gpt), tmp_path)
    fresh = small_gpt(seed=1)
    load_hf_weights_(fresh, tmp_path)
    assert sha(fresh) == sha(gpt)


def test_the_tokenizer_is_copied_but_never_a_config(tmp_path: Path) -> None:
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text("{}")
    (tokenizer_dir / "tokenizer_config.json").write_text("{}")
    (tokenizer_dir / "config.json").write_text('{"model_type": "other"}')
    out = tmp_path / "out"
    export_hf(small_gpt(), out, tokenizer=str(tokenizer_dir))
    assert (out / "tokenizer.json").read_text() == "{}"
    assert (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"


def test_warm_start_refuses_a_directory_missing_weights(tmp_path: Path) -> None:
    """A weight absent from the directory would silently start random: refused instead."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    source = build_hf_model(HfModelConfig(config=LLAMA), seq_len=T, vocab_size=V)
    source.model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = sorted(weights)[-1]
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError) as caught:
        build_hf_model(HfModelConfig(pretrained=str(tmp_path)), seq_len=T, vocab_size=V)
    assert str(caught.value).startswith("model.hf.pretrained:") and dropped in str(caught.value)


@pytest.mark.parametrize(
    ("where", "message"),
    [("a-file", "is a file, not a directory"), ("/proc/no-such-dir/out", "cannot be created: ")],
)
def test_export_names_an_out_it_cannot_write_before_building_anything(
    tmp_path: Path, where: str, message: str
) -> None:
    """`diloco-island export --out X`: a wrong X is one line naming --out, not an OSError
    after the model was built (run.dir holds no run: the --out check comes first)."""
    from diloco.config import load_config
    from islands.export import export_run

    out = tmp_path / where  # an absolute `where` replaces tmp_path
    if where == "a-file":
        out.write_text("not a directory")
    config = load_config(None, [f"run.dir={tmp_path / 'no-run'}"])
    with pytest.raises(ConfigError, match=rf"^--out: '{out}' {message}"):
        export_run(config, out)
