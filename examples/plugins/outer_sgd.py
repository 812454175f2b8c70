"""An outer-optimizer plug-in: `outer.optimizer: outer_sgd:build` (docs/plugins.md, "An outer
optimizer"). Called as `build(params, **outer.optimizer_args)` with `params` a one-element list
holding the flat anchor; the anchor's `.grad` is the averaged pseudo-gradient at each step."""

from __future__ import annotations

import torch


def build(params: list[torch.Tensor], lr: float = 0.7, momentum: float = 0.9) -> torch.optim.SGD:
    # DiLoCo's own outer step, written as a user would: the same anchor as outer.optimizer=sgd.
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True)
