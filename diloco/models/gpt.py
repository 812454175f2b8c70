"""A small GPT (decoder-only transformer) whose forward returns the next-token loss.

Shape legend: B batch, T time (sequence), D model width, H heads, V vocabulary.
After nanoGPT (https://github.com/karpathy/nanoGPT): pre-norm blocks, tied input and output
embeddings, scaled init of residual projections (GPT-2 paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    vocab_size: int = 256
    context: int = 128
    dropout: float = 0.0


class _Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).split(D, dim=2)
        q_BHTd, k_BHTd, v_BHTd = (
            t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v)
        )
        y_BHTd = F.scaled_dot_product_attention(
            q_BHTd, k_BHTd, v_BHTd, is_causal=True, dropout_p=self.dropout if self.training else 0
        )
        out_BTD: torch.Tensor = self.proj(y_BHTd.transpose(1, 2).contiguous().view(B, T, D))
        return out_BTD


class _Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = _Attention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, 4 * config.d_model),
            nn.GELU(),
            nn.Linear(4 * config.d_model, config.d_model),
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self.drop(self.attn(self.ln_1(x_BTD)))
        out_BTD: torch.Tensor = x_BTD + self.drop(self.mlp(self.ln_2(x_BTD)))
        return out_BTD


class GPT(nn.Module):
    """forward(tokens_BT1) -> mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1]."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.context, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        blocks = [_Block(config) for _ in range(config.n_layer)]
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix, counted once
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(cast(nn.Linear, block.mlp[2]).weight, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def logits(self, idx_BT: torch.Tensor) -> torch.Tensor:
        T = idx_BT.shape[1]
        if self.config.context < T:
            raise ValueError(
                f"sequence of {T} tokens is longer than the context {self.config.context}"
            )
        pos_T = torch.arange(T, device=idx_BT.device)
        x_BTD = self.drop(self.wte(idx_BT) + self.wpe(pos_T))
        for block in self.blocks:
            x_BTD = block(x_BTD)
        logits_BTV: torch.Tensor = self.lm_head(self.ln_f(x_BTD))
        return logits_BTV

    def forward(self, tokens_BT1: torch.Tensor) -> torch.Tensor:
        logits_BTV = self.logits(tokens_BT1[:, :-1])
        targets_BT = tokens_BT1[:, 1:]
        return F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 N plus attention (PaLM appendix B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.d_model * c.context
