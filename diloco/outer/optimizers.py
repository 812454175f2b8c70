"""Outer optimizers: the rule that turns the averaged pseudo-gradient into the next anchor.

Each implements `diloco.shared_state.OuterOptimizer` and keeps no state of its own (the state
travels in `SharedState.outer_state`), so the one object the composition root builds can
advance any copy of the shared state: an island's, the grpc coordinator's, a hivemind peer's.

- `sgd`: SGD with (Nesterov) momentum, DiLoCo's choice (lr 0.7, momentum 0.9, Nesterov;
  https://arxiv.org/abs/2311.08105 Sec. 3): `nesterov_step_`, bit-identical to
  `torch.optim.SGD`.
- `adam` and `module:factory`: any `torch.optim.Optimizer` over a one-element parameter list
  holding the flat anchor, whose `.grad` is set to the averaged pseudo-gradient before
  `step()` (torchft lets users pass any outer optimizer the same way).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from diloco.errors import ConfigError
from diloco.outer.nesterov import nesterov_step_
from diloco.outer.schedule import OuterSchedule

TorchOptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


@torch.no_grad()
def warm_step_(anchor_N: torch.Tensor, mean_pseudo_grad_N: torch.Tensor, lr: float) -> None:
    """A warm-phase round's step: plain SGD, no momentum, the optimizer's state untouched."""
    anchor_N.add_(mean_pseudo_grad_N, alpha=-lr)


class SgdOuter:
    """SGD with momentum on the flat anchor; the state is one `momentum` buffer.

    With a `schedule`, the learning rate and momentum of each round come from it (and its warm
    phase takes plain SGD steps); without one, they are `lr` and `momentum` every round.
    """

    name = "sgd"

    def __init__(
        self,
        *,
        lr: float,
        momentum: float,
        nesterov: bool,
        schedule: OuterSchedule | None = None,
    ):
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.schedule = schedule

    def init_state(self, anchor_N: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"momentum": torch.zeros_like(anchor_N)}

    def step_(
        self,
        anchor_N: torch.Tensor,
        mean_pseudo_grad_N: torch.Tensor,
        state: dict[str, torch.Tensor],
        round: int,
    ) -> None:
        lr, mu = self.lr, self.momentum
        if self.schedule is not None:
            if self.schedule.is_warm(round):
                warm_step_(anchor_N, mean_pseudo_grad_N, self.schedule.lr_at(round))
                return
            lr, mu = self.schedule.lr_at(round), self.schedule.momentum_at(round)
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(anchor_N)
        nesterov_step_(
            anchor_N, mean_pseudo_grad_N, state["momentum"], lr=lr, mu=mu, nesterov=self.nesterov
        )


class TorchOuter:
    """Any `torch.optim.Optimizer`, built by `factory([anchor_N])` for each step.

    The optimizer is rebuilt around whichever anchor it is asked to advance and loaded with
    that copy's state, so one `TorchOuter` serves every copy of the shared state. Its
    per-parameter state must be tensors (every torch optimizer's is).
    """

    def __init__(
        self,
        factory: TorchOptimizerFactory,
        *,
        name: str,
        key: str = "outer.optimizer",
        schedule: OuterSchedule | None = None,
    ):
        self.factory = factory
        self.name = name
        self._key = key
        self.schedule = schedule

    def init_state(self, anchor_N: torch.Tensor) -> dict[str, torch.Tensor]:
        del anchor_N
        return {}  # torch optimizers create their state at the first step

    def step_(
        self,
        anchor_N: torch.Tensor,
        mean_pseudo_grad_N: torch.Tensor,
        state: dict[str, torch.Tensor],
        round: int,
    ) -> None:
        schedule = self.schedule
        if schedule is not None and schedule.is_warm(round):
            warm_step_(anchor_N, mean_pseudo_grad_N, schedule.lr_at(round))
            return
        optimizer = self.build([anchor_N])
        if state:
            loaded = optimizer.state_dict()
            loaded["state"] = {0: dict(state)}
            optimizer.load_state_dict(loaded)
        if schedule is not None and schedule.lr_schedule != "constant":
            # The schedule scales the optimizer's own learning rate (outer.lr at its peak).
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * schedule.lr_at(round) / schedule.lr
        anchor_N.grad = mean_pseudo_grad_N
        try:
            optimizer.step()
        finally:
            anchor_N.grad = None
        new_state = optimizer.state[anchor_N]
        odd = [name for name, value in new_state.items() if not isinstance(value, torch.Tensor)]
        if odd:
            raise ConfigError(
                f"{self._key}: {self.name}'s state holds non-tensor entries {odd}: an outer "
                "optimizer's state must be tensors (it travels between islands)"
            )
        state.clear()
        state.update(new_state)

    def build(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        optimizer = self.factory(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"{self._key}: {self.name} returned {type(optimizer).__name__}, "
                "not a torch.optim.Optimizer"
            )
        return optimizer


def adam_outer(
    *,
    lr: float,
    betas: Sequence[float],
    eps: float,
    schedule: OuterSchedule | None = None,
) -> TorchOuter:
    """Adam as the outer optimizer (the DiLoCo paper found it worse than Nesterov SGD)."""
    beta1, beta2 = betas

    def build(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=lr, betas=(beta1, beta2), eps=eps)

    return TorchOuter(build, name="adam", schedule=schedule)


def factory_outer(
    factory: Callable[..., Any],
    path: str,
    args: dict[str, Any],
    *,
    key: str = "outer.optimizer",
    schedule: OuterSchedule | None = None,
) -> TorchOuter:
    """A user's `module:factory`, called as `factory(params, **outer.optimizer_args)`."""

    def build(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return factory(params, **args)  # type: ignore[no-any-return]

    return TorchOuter(build, name=path, key=key, schedule=schedule)


def probe(optimizer: TorchOuter) -> None:
    """One step on a small tensor, so that a broken factory fails at start, naming the key."""
    anchor_N = torch.zeros(4)
    unscheduled = TorchOuter(optimizer.factory, name=optimizer.name)  # its own first step
    try:
        unscheduled.step_(anchor_N, torch.ones(4), {}, 0)
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(
            f"outer.optimizer: {optimizer.name} failed on a test step "
            f"({type(error).__name__}: {error})"
        ) from None
