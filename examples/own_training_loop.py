"""DiLoCo inside your own training loop, in a few lines.

Keep your model, optimizer and loop; `OuterSync` averages pseudo-gradients with the other
islands every H steps and applies the Nesterov outer step to your parameters in place.

    python examples/own_training_loop.py                          # one island, in-process
    torchrun --standalone --nproc-per-node 2 examples/own_training_loop.py   # two islands
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

from diloco.codecs import NoneCodec
from diloco.outer import OuterHyperparams, OuterSync, SgdOuter
from diloco.transports import LocalGroup, TorchDistributedTransport, Transport


def make_transport(numel: int) -> Transport:
    """torch.distributed under torchrun, else a group of one island in this process."""
    if "WORLD_SIZE" in os.environ:
        return TorchDistributedTransport(
            NoneCodec(),
            numel,
            rank=int(os.environ["RANK"]),
            num_islands=int(os.environ["WORLD_SIZE"]),
            init_method="env://",
        )
    return LocalGroup(1, NoneCodec(), numel).transport(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--inner-steps", type=int, default=20, help="H")
    args = parser.parse_args()

    torch.manual_seed(0)  # the same initial model on every island
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    numel = sum(p.numel() for p in model.parameters())
    transport = make_transport(numel)
    nesterov = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)  # DiLoCo's outer step
    outer = OuterSync(
        model.parameters(),
        transport,
        NoneCodec(),
        nesterov,
        OuterHyperparams(inner_steps=args.inner_steps),
    )

    # Each island sees its own data: a different seed per island, the same target function.
    data = torch.Generator().manual_seed(1000 + transport.rank)
    target = torch.Generator().manual_seed(0)
    w_true = torch.randn(8, 1, generator=target)
    round_loss = 0.0
    for step in range(args.steps):
        x = torch.randn(32, 8, generator=data)
        loss = nn.functional.mse_loss(model(x), torch.tanh(x @ w_true / 2))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        round_loss += loss.item()
        synced = outer.after_inner_step(tokens=len(x))  # the only DiLoCo line in the loop
        if synced is not None:
            mean_loss = round_loss / args.inner_steps
            # One write per line: two islands share the terminal under torchrun.
            sys.stdout.write(
                f"island {transport.rank}  round {synced.round:3d}  step {step + 1:4d}  "
                f"loss {mean_loss:.4f}  islands {synced.participants}  "
                f"params {outer.params_sha256()[:12]}\n"
            )
            sys.stdout.flush()
            round_loss = 0.0
    transport.close()


if __name__ == "__main__":
    main()
