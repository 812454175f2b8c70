"""model.name hf: the adapter's loss, padding, refusals, fingerprints, FLOPs, bf16, training."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers", reason='needs the hf extra: pip install -e ".[hf]"')

import torch
import torch.nn.functional as F

from diloco.errors import ConfigError
from diloco.extras import require_extra
from diloco.models.hf import HfCausalLM, build_hf_model
from diloco.models.hf_config import HfModelConfig
from diloco.outer import flatten_params, params_sha256

T, V = 16, 96

LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
    "vocab_size": V,
}
GPT2: dict[str, Any] = {
    "model_type": "gpt2",
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 32,
    "vocab_size": V,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def build(fields: dict[str, Any], seed: int = 0, **overrides: Any) -> HfCausalLM:
    torch.manual_seed(seed)
    config = HfModelConfig(config={**fields, **overrides})
    return build_hf_model(config, seq_len=T, vocab_size=V)


def tokens(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, V, (batch, T + 1), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fields", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_loss_is_the_next_token_cross_entropy(fields: dict[str, Any]) -> None:
    """forward(x) = mean CE of x[:, 1:] given x[:, :-1], by hand and as HF's own .loss."""
    model = build(fields).eval()
    x_BT1 = tokens()
    with torch.no_grad():
        loss = model(x_BT1)
        logits_BTV = model.model(input_ids=x_BT1[:, :-1]).logits
        log_probs = torch.log_softmax(logits_BTV.double(), dim=-1)
        by_hand = -log_probs.gather(2, x_BT1[:, 1:, None]).mean()
        # HF shifts labels inside: fed all T + 1 tokens, it predicts the same T targets.
        hf_loss = model.model(input_ids=x_BT1, labels=x_BT1).loss
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert abs(loss.item() - by_hand.item()) < 1e-5
    assert abs(loss.item() - hf_loss.item()) < 1e-5


def test_padding_targets_are_left_out() -> None:
    """With pad id 5 (not the separator), padded targets do not count in the mean."""
    model = build(LLAMA, pad_token_id=5, eos_token_id=2).eval()
    assert model.pad_token_id == 5
    x_BT1 = tokens()
    x_BT1[x_BT1 == 5] = 6
    x_BT1[0, 10:] = 5  # right padding of the first window
    with torch.no_grad():
        logits_BTV = model.model(input_ids=x_BT1[:, :-1]).logits
        targets_BT = x_BT1[:, 1:]
        keep = targets_BT != 5
        by_hand = F.cross_entropy(logits_BTV[keep], targets_BT[keep])
        unmasked = F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())
        loss = model(x_BT1)
    assert abs(loss.item() - by_hand.item()) < 1e-6
    assert abs(loss.item() - unmasked.item()) > 1e-3


def test_a_pad_id_that_is_the_separator_is_not_masked() -> None:
    """Packed data separates documents with end-of-text; masking it would hide every border."""
    assert build(LLAMA, pad_token_id=2, eos_token_id=2).pad_token_id is None
    assert build(GPT2).pad_token_id is None


def test_same_seed_same_fingerprint_other_seed_other_weights() -> None:
    """What group_fingerprint hashes (names, shapes, weights) is a function of the seed."""
    first, again, other = build(LLAMA, seed=3), build(LLAMA, seed=3), build(LLAMA, seed=4)

    def shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()]

    def weights(model: torch.nn.Module) -> str:
        return params_sha256(flatten_params(list(model.parameters())))

    assert shapes(first) == shapes(again) == shapes(copy.deepcopy(first))
    assert all(dtype == torch.float32 for _, _, dtype in shapes(first))
    assert weights(first) == weights(again) == weights(copy.deepcopy(first))
    assert weights(first) != weights(other)


def test_flops_per_token_is_what_jest_counts() -> None:
    """6 N + 12 L D T, as the built-in GPT's, and train_flops_per_token reads it."""
    from diloco.models import train_flops_per_token

    model = build(LLAMA)
    params = sum(p.numel() for p in model.parameters())
    expected = 6 * params + 12 * LLAMA["num_hidden_layers"] * LLAMA["hidden_size"] * T
    assert model.flops_per_token() == expected
    assert train_flops_per_token(model) == expected


def test_bf16_autocast_gives_an_fp32_loss_and_gradients() -> None:
    model = build(LLAMA)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens())
    loss.backward()  # type: ignore[no-untyped-call]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_inner_trainer_lowers_the_loss_of_a_repeated_batch() -> None:
    from diloco.inner import InnerTrainer
    from diloco.inner.config import InnerConfig

    model = build(GPT2)
    trainer = InnerTrainer(model, InnerConfig(lr=1e-2, warmup_steps=0), 20, torch.device("cpu"))
    x_BT1 = tokens()
    losses = [trainer.train_step(x_BT1).item() for _ in range(12)]
    assert losses[-1] < losses[0] - 0.5


def test_inline_config_without_vocab_size_takes_the_tokenizers() -> None:
    fields = {key: value for key, value in LLAMA.items() if key != "vocab_size"}
    torch.manual_seed(0)
    model = build_hf_model(HfModelConfig(config=fields), seq_len=T, vocab_size=50)
    assert model.vocab_size == 50


def test_config_directory_gives_random_weights_of_that_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    torch.manual_seed(0)
    model = build_hf_model(HfModelConfig(config=str(tmp_path)), seq_len=T, vocab_size=V)
    assert model.vocab_size == V and model.model.config.hidden_size == 32


def refusal(config: HfModelConfig, seq_len: int = T, vocab_size: int | None = V) -> str:
    with pytest.raises(ConfigError) as caught:
        build_hf_model(config, seq_len=seq_len, vocab_size=vocab_size)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_refuses_a_directory_without_config_json(tmp_path: Path) -> None:
    message = refusal(HfModelConfig(config=str(tmp_path)))
    assert "model.hf.config" in message and "config.json" in message
    message = refusal(HfModelConfig(pretrained=str(tmp_path / "missing")))
    assert "model.hf.pretrained" in message and "not a directory" in message


def test_refuses_a_pretrained_directory_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    message = refusal(HfModelConfig(pretrained=str(tmp_path)))
    assert "model.hf.pretrained" in message and "safetensors" in message


def test_refuses_a_sequence_longer_than_the_context() -> None:
    message = refusal(HfModelConfig(config=LLAMA), seq_len=64)
    assert message.startswith("data.seq_len") and "32 positions" in message and "64" in message
    message = refusal(HfModelConfig(config=GPT2), seq_len=33)
    assert message.startswith("data.seq_len") and "32 positions" in message


def test_refuses_a_vocabulary_smaller_than_the_datas() -> None:
    message = refusal(HfModelConfig(config=LLAMA), vocab_size=V + 1)
    assert "model.hf.config" in message and f"{V} tokens" in message and str(V + 1) in message


def test_refuses_an_unknown_model_type() -> None:
    message = refusal(HfModelConfig(config={**LLAMA, "model_type": "lama"}))
    assert "model.hf.config" in message and "'lama'" in message


def test_section_checks() -> None:
    with pytest.raises(ConfigError, match=r"^model.hf.config and model.hf.pretrained"):
        HfModelConfig(config=LLAMA, pretrained="dir")
    with pytest.raises(ConfigError, match=r"^model.hf.config: an inline config needs model_type"):
        HfModelConfig(config={"hidden_size": 8})
    with pytest.raises(ConfigError, match=r"^model.hf.config must be a directory"):
        HfModelConfig(config=3)
    with pytest.raises(ConfigError, match=r"^model.name hf needs model.hf.config"):
        HfModelConfig().require()
    HfModelConfig(pretrained="dir").require()


def test_a_missing_extra_names_the_key_and_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises ImportError
    with pytest.raises(ConfigError) as caught:
        require_extra("transformers", key="model.name hf", extra="hf")
    assert str(caught.value).startswith("model.name hf needs the transformers package")
    assert 'pip install -e ".[hf]"' in str(caught.value)
    with pytest.raises(ConfigError, match=r"^model.name hf needs the transformers"):
        build_hf_model(HfModelConfig(config=LLAMA), seq_len=T, vocab_size=V)


def test_default_special_ids_past_a_small_vocabulary_are_unset() -> None:
    """GPT-2's default bos/eos 50256 would point past a 96-token vocabulary: they become None."""
    fields = {k: v for k, v in GPT2.items() if k not in ("bos_token_id", "eos_token_id")}
    config = build(fields).model.config
    assert config.bos_token_id is None and config.eos_token_id is None
    assert build(fields, eos_token_id=3).model.config.eos_token_id == 3
