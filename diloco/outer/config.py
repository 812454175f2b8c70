"""The `outer` section: rounds, H, the outer optimizer and the codec; the outer optimizers by name.

`OUTER_OPTIMIZERS` owns the names `outer.optimizer` may take besides a `module:factory`; each
builder imports its optimizer only when called (the config loads without torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diloco.codecs.registry import CodecName, CodecOptions, ignored_codec_options
from diloco.errors import require

if TYPE_CHECKING:
    from diloco.shared_state import OuterOptimizer


@dataclass(kw_only=True)
class OuterConfig:
    rounds: int = 10
    """Outer rounds to run (T in the paper)."""
    inner_steps: int = 50
    """Inner AdamW steps between two synchronisations (H in the paper)."""
    optimizer: str = "sgd"
    """The outer optimizer: sgd (SGD with outer.momentum, Nesterov by default: the paper's),
    adam (outer.betas, outer.eps), or module:factory, called as factory(params,
    **outer.optimizer_args) with params a one-element list holding the flat anchor (its .grad
    is the averaged pseudo-gradient), returning any torch.optim.Optimizer."""
    lr: float = 0.7
    """Outer learning rate (the paper's best: 0.7); sgd and adam."""
    momentum: float = 0.9
    """Outer momentum mu in [0, 1) (the paper's best: 0.9); sgd."""
    nesterov: bool = True
    """Nesterov momentum for the outer SGD step (false: heavy-ball momentum); sgd."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam's (beta1, beta2), each in [0, 1); adam."""
    eps: float = 1e-8
    """Adam's epsilon, > 0; adam."""
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of a module:factory outer optimizer."""
    codec: CodecName = CodecName.none
    """How pseudo-gradients travel (bytes per element): none (fp32, 4), fp16 or bf16 (2), int8
    (1, absmax scale per block), fp8 (1, e4m3 per block), fp4 (0.5: the 4-bit float format
    chosen in docs/codecs.md, E2M1), fp4_e2m1 or fp4_e3m0 (0.5; E3M0 is Streaming DiLoCo's,
    arXiv 2501.18512), topk (3 or 4 per kept entry: fp16 value and index, a share
    outer.topk_fraction of each block). Byte layouts and error bounds: docs/codecs.md."""
    block_size: int = 256
    """Elements per block: int8, fp8 and fp4 send one fp32 scale per block (4 / block_size
    bytes per element); topk keeps its share of each block, with 1-byte indices up to 256
    and 2-byte ones up to 65536. Ignored by none, fp16 and bf16."""
    topk_fraction: float = 0.1
    """topk: share of each block's entries sent, in (0, 1]; a block keeps
    max(1, ceil(topk_fraction * its size)). SparseLoCo sends 1-3% (arXiv 2508.15706)."""
    error_feedback: bool = False
    """Each island keeps what its codec lost (the residual, saved in checkpoints) and adds it
    to the next round's pseudo-gradient, so a lossy codec's error does not accumulate.
    SparseLoCo pairs it with top-k (arXiv 2508.15706); Streaming DiLoCo sends fp4 without it.
    No effect with codec none."""
    error_feedback_decay: float = 1.0
    """beta in [0, 1]: the residual is multiplied by beta before it is added (1: classic error
    feedback; SparseLoCo uses 0.95). Lower values forget stale residuals sooner."""
    reset_inner_optimizer: bool = False
    """Reset the inner AdamW state at every round (the paper keeps it)."""

    def __post_init__(self) -> None:
        require(self.rounds >= 1, "outer.rounds", ">= 1", self.rounds)
        require(self.inner_steps >= 1, "outer.inner_steps", ">= 1 (H)", self.inner_steps)
        known = ", ".join(OUTER_OPTIMIZERS)
        require(
            self.optimizer in OUTER_OPTIMIZERS or ":" in self.optimizer,
            "outer.optimizer",
            f"{known} or module:factory",
            self.optimizer,
        )
        require(self.lr > 0, "outer.lr", "> 0", self.lr)
        require(0 <= self.momentum < 1, "outer.momentum", "in [0, 1)", self.momentum)
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "outer.betas",
            "two numbers in [0, 1)",
            list(self.betas),
        )
        require(self.eps > 0, "outer.eps", "> 0", self.eps)
        block_limit = 2**16 if self.codec is CodecName.topk else 2**32 - 1
        require(
            1 <= self.block_size <= block_limit,
            "outer.block_size",
            f"in [1, {block_limit}]" + (" with codec topk" if block_limit == 2**16 else ""),
            self.block_size,
        )
        require(0 < self.topk_fraction <= 1, "outer.topk_fraction", "in (0, 1]", self.topk_fraction)
        require(
            0 <= self.error_feedback_decay <= 1,
            "outer.error_feedback_decay",
            "in [0, 1]",
            self.error_feedback_decay,
        )

    @property
    def codec_options(self) -> CodecOptions:
        return CodecOptions(block_size=self.block_size, topk_fraction=self.topk_fraction)

    def ignored_options(self) -> list[str]:
        """The keys set to non-defaults that the chosen codec and optimizer never read."""
        default = OuterConfig()
        codec_keys = ignored_codec_options(self.codec.value, self.codec_options)
        ignored = [f"outer.{key}" for key in codec_keys]
        if not self.error_feedback and self.error_feedback_decay != default.error_feedback_decay:
            ignored.append("outer.error_feedback_decay")
        reads = _OPTIMIZER_READS.get(self.optimizer, ("optimizer_args",))
        ignored += [
            f"outer.{key}"
            for key in ("lr", "momentum", "nesterov", "betas", "eps", "optimizer_args")
            if key not in reads and getattr(self, key) != getattr(default, key)
        ]
        return ignored


def _sgd(config: OuterConfig) -> OuterOptimizer:
    from diloco.outer.optimizers import SgdOuter

    return SgdOuter(lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)


def _adam(config: OuterConfig) -> OuterOptimizer:
    from diloco.outer.optimizers import adam_outer

    return adam_outer(lr=config.lr, betas=config.betas, eps=config.eps)


OUTER_OPTIMIZERS: dict[str, Callable[[OuterConfig], OuterOptimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
}
# The options each named optimizer reads (a module:factory reads only outer.optimizer_args).
_OPTIMIZER_READS: dict[str, tuple[str, ...]] = {
    "sgd": ("lr", "momentum", "nesterov"),
    "adam": ("lr", "betas", "eps"),
}


def build_outer_optimizer(config: OuterConfig) -> OuterOptimizer:
    """The outer optimizer `config.optimizer` names, checked once on a small tensor.

    Raises:
        ConfigError: a module:factory that cannot be imported, or whose optimizer fails.
    """
    if config.optimizer in OUTER_OPTIMIZERS:
        return OUTER_OPTIMIZERS[config.optimizer](config)
    from diloco.outer.optimizers import factory_outer, probe
    from diloco.resolve import resolve_factory

    factory = resolve_factory(config.optimizer, "outer.optimizer")
    optimizer = factory_outer(factory, config.optimizer, dict(config.optimizer_args))
    probe(optimizer)
    return optimizer
