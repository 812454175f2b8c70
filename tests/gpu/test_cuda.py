"""The CUDA path: bf16 autocast, fused AdamW, local islands on one GPU. Skipped without one."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

from diloco.config import load_config  # noqa: E402
from diloco.inner import InnerTrainer  # noqa: E402
from diloco.inner.config import InnerConfig  # noqa: E402
from diloco.models import GPT, GPTConfig  # noqa: E402
from islands.island import run_island  # noqa: E402

TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=2",
    "data.batch_size=4",
    "data.seq_len=32",
    "eval.batches=2",
]


def test_trainer_uses_bf16_autocast_and_fused_adamw() -> None:
    device = torch.device("cuda")
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=32, vocab_size=64, context=16)).to(device)
    trainer = InnerTrainer(model, InnerConfig(warmup_steps=0), 10, device, bf16=True)
    assert trainer.optimizer.defaults["fused"] is True
    seen: list[torch.dtype] = []
    model.blocks[0].mlp[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    batch = torch.randint(0, 64, (2, 17))
    losses = [trainer.train_step(batch).item() for _ in range(20)]
    assert seen[0] == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32
    assert losses[-1] < losses[0]


def test_local_islands_on_gpu_agree_and_train(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = load_config(
        None,
        [
            *TINY,
            f"run.dir={tmp_path}",
            "run.device=cuda",
            "run.progress=none",
            "transport.islands=2",
            "outer.rounds=3",
            "outer.inner_steps=10",
            "inner.warmup_steps=5",
            "inner.lr=3e-3",
        ],
    )
    summary = run_island(config)
    assert summary["device"].startswith("cuda")
    assert summary["val_loss"] < 4.5  # ln(256) = 5.55 at init
    assert summary["rounds"] == 3
