"""data.noise (junk sequences, clean validation), the reference model and the jest options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diloco.config import load_config
from diloco.data.config import DataConfig
from diloco.data.noise import NoisyWindows, corrupt, junk
from diloco.data.reference import build_reference, load_reference_, reference_model_config
from diloco.data.selectors.config import SelectorConfig
from diloco.data.selectors.jest_config import ReferenceConfig
from diloco.data.windows import TokenWindows
from diloco.errors import ConfigError
from diloco.models import build_model
from diloco.models.config import ModelConfig

TEXT = np.frombuffer(b"def f(x):\n    return x + 1\n" * 200, dtype=np.uint8)


def windows(seed: int = 0) -> TokenWindows:
    return TokenWindows(
        TEXT, TEXT, batch_size=64, seq_len=32, island=0, num_islands=1, seed=seed, vocab_size=256
    )


def test_junk_kinds() -> None:
    generator = torch.Generator().manual_seed(0)
    window = torch.arange(40)
    random = junk(window, "random", 256, generator)
    shuffled = junk(window, "shuffled", 256, generator)
    repeated = junk(window, "repeated", 256, generator)
    assert random.shape == shuffled.shape == repeated.shape == window.shape
    assert int(random.max()) < 256
    assert sorted(shuffled.tolist()) == window.tolist() and not torch.equal(shuffled, window)
    period = next(p for p in range(4, 17) if torch.equal(repeated[p:], repeated[:-p]))
    assert 4 <= period <= 16
    with pytest.raises(ValueError, match="unknown noise kind"):
        junk(window, "loud", 256, generator)


def test_corrupt_replaces_about_the_noise_share_and_nothing_else() -> None:
    tokens = torch.from_numpy(np.tile(np.arange(33), (2_000, 1)))
    out, noisy = corrupt(tokens, 0.5, 256, torch.Generator().manual_seed(1))
    assert 0.45 < noisy.float().mean() < 0.55
    assert torch.equal(out[~noisy], tokens[~noisy])
    assert (out[noisy] != tokens[noisy]).any(dim=1).float().mean() > 0.9


def test_noisy_windows_keep_the_clean_stream_and_validation() -> None:
    clean, noisy = windows(), NoisyWindows(windows(), noise=0.5, vocab_size=256, seed=0, island=0)
    batch, reference = noisy.next_batch(), clean.next_batch()
    assert batch.noisy.dtype == torch.bool and batch.noisy.any() and not batch.noisy.all()
    assert torch.equal(batch.inputs[~batch.noisy], reference.inputs[~batch.noisy])
    assert batch.num_tokens == reference.num_tokens
    for mine, theirs in zip(noisy.val_batches(2), clean.val_batches(2), strict=True):
        assert torch.equal(mine.inputs, theirs.inputs) and mine.noisy is None
    state = noisy.state_dict()
    following = noisy.next_batch()
    noisy.load_state_dict(state)
    assert torch.equal(noisy.next_batch().inputs, following.inputs)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.selector.ratio=0.3", "data.selector.ratio must be 1/n"),
        ("data.selector.ratio=0", "data.selector.ratio must be in (0, 1]"),
        ("data.selector.temperature=-1", "data.selector.temperature must be >= 0"),
        ("data.selector.rescore_every=0", "data.selector.rescore_every must be >= 1"),
        ("data.selector.reference.train_steps=0", "data.selector.reference.train_steps"),
        ("data.selector.reference.d_model=-1", "data.selector.reference.d_model"),
        ("data.noise=1.0", "data.noise must be in [0, 1)"),
        ("data.selector.score=best", "data.selector.score"),
    ],
)
def test_bad_options_name_their_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_noise_refuses_a_factory_source() -> None:
    with pytest.raises(ConfigError, match="data.noise works with stdlib"):
        DataConfig(name="my_data:build", noise=0.1)


def test_reference_sizes_default_to_the_learner_and_must_fit() -> None:
    learner = ModelConfig(n_layer=4, n_head=4, d_model=128)
    small = reference_model_config(learner, ReferenceConfig(n_layer=2, d_model=64))
    assert (small.n_layer, small.n_head, small.d_model) == (2, 4, 64)
    assert reference_model_config(learner, ReferenceConfig()) == learner
    with pytest.raises(ConfigError, match="data.selector.reference.d_model must be a multiple"):
        reference_model_config(learner, ReferenceConfig(d_model=66))


def test_reference_loads_a_state_dict_or_a_diloco_checkpoint(tmp_path: Path) -> None:
    config = ModelConfig(n_layer=1, n_head=2, d_model=16)
    source = build_model(config, context=8)
    plain = tmp_path / "reference.pt"
    torch.save(source.state_dict(), plain)
    flat = torch.cat([p.detach().reshape(-1) for p in source.parameters()])
    diloco = tmp_path / "round-3.pt"
    torch.save({"numel": flat.numel(), "outer": {"anchor": flat}}, diloco)
    for path in (plain, diloco):
        target = build_model(config, context=8)
        load_reference_(target, str(path))
        assert all(
            torch.equal(a, b) for a, b in zip(target.parameters(), source.parameters(), strict=True)
        )
    with pytest.raises(ConfigError, match=r"reference.checkpoint: file .* does not exist"):
        load_reference_(target, str(tmp_path / "missing.pt"))
    bigger = build_model(ModelConfig(n_layer=2, n_head=2, d_model=16), context=8)
    with pytest.raises(ConfigError, match="reference.checkpoint: .* does not fit"):
        load_reference_(bigger, str(diloco))


def test_trained_reference_is_frozen_and_counts_its_flops(tmp_path: Path) -> None:
    text = tmp_path / "clean.txt"
    text.write_bytes(TEXT.tobytes())
    data = DataConfig(
        batch_size=4,
        seq_len=16,
        selector=SelectorConfig(
            reference=ReferenceConfig(data=str(text), train_steps=3, n_layer=1, d_model=16)
        ),
    )
    before = torch.get_rng_state()
    model, flops = build_reference(
        data, ModelConfig(n_head=2), device=torch.device("cpu"), bf16=False, seed=0
    )
    assert torch.equal(torch.get_rng_state(), before)  # the learner's RNG is left alone
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert flops == 3 * 4 * 16 * model.flops_per_token()
    with pytest.raises(ConfigError, match="reference.data must be stdlib or an existing text"):
        build_reference(
            DataConfig(selector=SelectorConfig(reference=ReferenceConfig(data="nope.txt"))),
            ModelConfig(),
            device=torch.device("cpu"),
            bf16=False,
            seed=0,
        )
