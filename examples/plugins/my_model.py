"""A model plug-in: `model.name: my_model:build` (docs/plugins.md, "A model")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Regressor(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(self.net(inputs["x"]).squeeze(-1), inputs["y"])  # the scalar loss


def build(dim: int = 16, hidden: int = 64) -> nn.Module:
    return Regressor(dim, hidden)
