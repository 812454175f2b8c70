"""A user's own model: a small CNN that tells which way a bar in a noisy image points.

Nothing here knows about diloco: a plain `nn.Module` whose forward takes a batch and returns
the scalar loss, and a factory the config names (`model.name: bar_cnn:build`).

Shapes: B batch, C channels, S image side, K classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BarCNN(nn.Module):
    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(2 * channels, classes)

    def logits(self, images_B1SS: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images_B1SS).flatten(1))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # diloco trains on whatever the forward returns: the batch's mean cross-entropy.
        return F.cross_entropy(self.logits(inputs["images"]), inputs["labels"])


def build(channels: int = 16, classes: int = 4) -> nn.Module:
    """Called as build(**model.args), after torch.manual_seed(run.seed): same weights everywhere."""
    return BarCNN(channels, classes)
