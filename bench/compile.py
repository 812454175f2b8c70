"""`run.compile` against eager: inner-loop tokens/s of the demo GPT through `InnerTrainer`.

Both loops train the same model (the demo's sizes by default) on the same pre-drawn batches
with the project's inner AdamW step (schedule, clipping, two parameter groups). The compiled
loop's first steps compile the graphs and are left out, as the eager loop's warm-up is; the
compile time is printed separately. The loops alternate in blocks, each first in every other
pair, so that a load change on a shared machine hits both alike: the ratio is the median
over pairs of blocks, the tokens/s each loop's median block.

    python bench/compile.py [--steps 20] [--blocks 6] [--batch 8] [--seq-len 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

from diloco.inner import InnerTrainer
from diloco.inner.compile import compile_inner_model
from diloco.inner.config import InnerConfig
from diloco.models.gpt import GPT, GPTConfig


def timed_steps(trainer: InnerTrainer, batches: list[torch.Tensor], device: torch.device) -> float:
    """Seconds for one inner step on each batch (waits for the device at the end)."""
    start = time.perf_counter()
    for inputs in batches:
        loss = trainer.train_step(inputs)
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per block")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compiles)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on cpu (0: keep)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    torch.manual_seed(0)
    model = GPT(GPTConfig(context=args.seq_len)).to(device)
    shape = (args.batch, args.seq_len + 1)
    batches = [torch.randint(0, 256, shape, device=device) for _ in range(args.steps)]
    inner = InnerConfig(lr=2e-3, warmup_steps=50)
    total = (args.warmup + args.steps * args.blocks) * 2
    trainers = {}
    compile_s = {}
    for name, enabled in (("eager", False), ("torch.compile", True)):
        replica = compile_inner_model(copy.deepcopy(model), enabled)
        trainers[name] = InnerTrainer(replica, inner, total, device, bf16)
        compile_s[name] = timed_steps(trainers[name], batches[: args.warmup], device)
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for block in range(args.blocks):
        order = list(trainers) if block % 2 == 0 else list(reversed(trainers))
        for name in order:
            seconds[name].append(timed_steps(trainers[name], batches, device))
    tokens = args.steps * args.batch * args.seq_len
    rate = {name: tokens / statistics.median(values) for name, values in seconds.items()}
    paired = [e / c for e, c in zip(seconds["eager"], seconds["torch.compile"], strict=True)]
    ratio = {"eager": 1.0, "torch.compile": statistics.median(paired)}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"\ndevice: {device} ({where or platform.machine()}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, bf16 {bf16}"
    )
    print(
        f"model: demo GPT, {sum(p.numel() for p in model.parameters()):,} parameters, batch "
        f"{args.batch} x {args.seq_len}; {args.blocks} blocks of {args.steps} steps, median"
    )
    print("| inner loop | tokens/s | ratio to eager (median of pairs) | first steps (s) |")
    print("| --- | --- | --- | --- |")
    for name in trainers:
        print(
            f"| {name} | {rate[name]:,.0f} | {ratio[name]:.2f} | "
            f"{compile_s[name]:.1f} ({args.warmup} steps) |"
        )


if __name__ == "__main__":
    main()
