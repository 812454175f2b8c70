"""The HF adapter's inner-loop tokens/s against a plain Hugging Face training loop, same run.

`ours` is a tiny Llama built by `build_hf_model` (model.name: hf) and trained by the project's
`InnerTrainer` (lr schedule, two AdamW groups, clipping 1.0, bf16 autocast on a GPU); `plain`
is the loop a user writes around the same `LlamaForCausalLM`: `model(input_ids, labels)`,
`loss.backward()`, clipping 1.0, `AdamW.step()`. Both start from the same weights and train
on the same pre-drawn batches of T + 1 tokens (plain feeds the first T as input_ids and as
labels, which HF shifts inside: the same forward, one fewer target). The two loops alternate
in short blocks, each first in every other pair, so that a load change on a shared machine
hits both alike: the ratio is the median over pairs of blocks, the tokens/s the median block
of each loop.

    python bench/hf_throughput.py [--steps 4] [--blocks 8] [--hidden 128] [--layers 4]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch

from diloco.inner import InnerTrainer
from diloco.inner.config import InnerConfig
from diloco.models.hf import HfCausalLM, build_hf_model
from diloco.models.hf_config import HfModelConfig


def plain_step_fn(
    model: torch.nn.Module, lr: float, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """One step of the plain HF loop (the baseline), as a closure over its own AdamW."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda"
    )
    bf16 = device.type == "cuda"

    def step(tokens_BT1: torch.Tensor) -> torch.Tensor:
        model.train()
        input_ids = tokens_BT1[:, :-1]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss: torch.Tensor = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def timed(
    step: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor], device: torch.device
) -> float:
    start = time.perf_counter()
    for tokens in batches:
        loss = step(tokens)
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def tiny_llama(args: argparse.Namespace) -> HfCausalLM:
    fields = {
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": 4 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden // 32),
        "max_position_embeddings": args.seq_len,
        "vocab_size": args.vocab,
    }
    torch.manual_seed(0)
    return build_hf_model(HfModelConfig(config=fields), seq_len=args.seq_len, vocab_size=None)


def alternate(
    steps: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    batches: list[torch.Tensor],
    blocks: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """Seconds of each block of each loop; each loop runs first in every other pair."""
    for step in steps.values():
        timed(step, batches[:3], device)  # warm-up: allocator, kernels, lazy inits
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for block in range(blocks):
        order = list(steps) if block % 2 == 0 else list(reversed(steps))
        for name in order:
            seconds[name].append(timed(steps[name], batches, device))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per block")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on cpu (0: keep)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ours = tiny_llama(args)
    plain = torch.nn.Module.to(copy.deepcopy(ours.model), device)
    ours.to(device)
    trainer = InnerTrainer(
        ours, InnerConfig(lr=1e-3, warmup_steps=10), 10**6, device, bf16=device.type == "cuda"
    )
    steps = {
        "plain HF loop": plain_step_fn(plain, 1e-3, device),
        "diloco InnerTrainer + HfCausalLM": trainer.train_step,
    }
    shape = (args.batch, args.seq_len + 1)
    batches = [torch.randint(0, args.vocab, shape, device=device) for _ in range(args.steps)]
    seconds = alternate(steps, batches, args.blocks, device)
    tokens = args.steps * args.batch * args.seq_len
    rate = {name: tokens / statistics.median(values) for name, values in seconds.items()}
    names = list(steps)
    paired = [p / o for p, o in zip(seconds[names[0]], seconds[names[1]], strict=True)]
    ratio = {names[0]: 1.0, names[1]: statistics.median(paired)}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"\ndevice: {device} ({where or platform.machine()}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"model: LlamaForCausalLM {HfCausalLM.num_params(ours):,} parameters "
        f"(hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}), batch "
        f"{args.batch} x {args.seq_len}; {args.blocks} blocks of {args.steps} steps, median"
    )
    print("| loop | tokens/s | ratio to plain (median of pairs) | blocks (s) |")
    print("| --- | --- | --- | --- |")
    for name in steps:
        blocks = ", ".join(f"{s:.2f}" for s in seconds[name])
        print(f"| {name} | {rate[name]:,.0f} | {ratio[name]:.3f} | {blocks} |")


if __name__ == "__main__":
    main()
