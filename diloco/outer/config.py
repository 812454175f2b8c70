"""The `outer` section: rounds, H, the outer optimizer and the codec; the outer optimizers by name.

`OUTER_OPTIMIZERS` owns the names `outer.optimizer` may take besides a `module:factory`; each
builder imports its optimizer only when called (the config loads without torch).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diloco.codecs.registry import CodecName, CodecOptions, ignored_codec_options
from diloco.errors import ConfigError, require

if TYPE_CHECKING:
    from diloco.outer.schedule import OuterSchedule
    from diloco.shared_state import OuterOptimizer


# The outer step's settings when outer.lr, outer.momentum and outer.nesterov are left unset:
# the DiLoCo paper's best with several islands; with one island (and sgd) plain training, since
# the paper's outer step made one island worse than plain AdamW on every budget measured here
# (docs/results/regime.md, "One island").
STEP_DEFAULTS: dict[str, float | bool] = {"lr": 0.7, "momentum": 0.9, "nesterov": True}
ONE_ISLAND_STEP: dict[str, float | bool] = {"lr": 1.0, "momentum": 0.0, "nesterov": False}


class OuterLrSchedule(enum.Enum):
    constant = "constant"
    cosine = "cosine"


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
    lr: float | None = None
    """Outer learning rate; sgd and adam. Unset (null): the paper's best, 0.7, with several
    islands; 1.0 with one island and sgd (see outer.momentum)."""
    lr_schedule: OuterLrSchedule = OuterLrSchedule.constant
    """constant (the paper: decaying the outer lr gave nothing) or cosine: from outer.lr down to
    outer.lr * outer.min_lr_ratio over the rounds after the warm phase (a factory optimizer's
    own lr is scaled the same way)."""
    min_lr_ratio: float = 0.0
    """cosine: where the outer lr ends, as a share of outer.lr, in [0, 1]."""
    momentum: float | None = None
    """Outer momentum mu in [0, 1); sgd. Unset (null): the paper's best, 0.9, with several
    islands; 0 with one island, where outer.lr 1 and no momentum make the outer step plain
    training: one island with the paper's 0.7 / Nesterov 0.9 trained 4.6 % worse than plain
    AdamW at 400 steps (docs/results/regime.md)."""
    momentum_warmup_rounds: int = 0
    """sgd: the outer momentum ramps linearly from 0 to outer.momentum over this many rounds
    after the warm phase (0: full momentum from the first round)."""
    warmup_rounds: int = 0
    """A synchronous warm phase: the first this-many rounds have one inner step each and apply
    the mean as plain SGD at outer.warmup_lr without momentum, which tracks data-parallel
    training while the loss falls fastest (docs/results/regime.md); then rounds of
    outer.inner_steps. The islands send one payload per warm round."""
    warmup_lr: float = 1.0
    """The outer lr of a warm-phase round (sqrt(transport.islands) tracked the k-times-batch run
    best in docs/results/regime.md)."""
    nesterov: bool | None = None
    """Nesterov momentum for the outer SGD step (false: heavy-ball momentum); sgd. Unset (null):
    true with several islands, false with one."""
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
    offload_state: bool = False
    """Keep the outer optimizer's state (sgd: the momentum, one model's size) in a file between
    outer steps instead of in memory: each island's under run.dir/outer-state/, the grpc
    coordinator's in its folder. One model-sized vector less in an island's memory in every
    phase of the round (64M parameters over grpc: peak 6.2x the payload down to 5.2x) and on
    the coordinator, for a write and a read of it per round; the outer step runs 16 MiB at a
    time (diloco/offload.py): the same bits as in memory, so each site chooses for itself.
    run.dir must be on a disk, not a tmpfs. Needs outer.optimizer sgd, blocking rounds
    (outer.fragments=1, outer.overlap_steps=0) and islands on the CPU."""
    reset_inner_optimizer: bool = False
    """Reset the inner AdamW state at every round (the paper keeps it)."""
    fragments: int = 1
    """P in Streaming DiLoCo (arXiv 2501.18512): the shared parameters are split into P
    fragments of whole tensors, balanced by size; fragment p syncs once every outer.inner_steps
    steps, at its own offset, so one fragment is on the wire at a time and peak bytes per sync
    drop P times. 1: every parameter syncs at the round's end."""
    overlap_steps: int = 0
    """tau: a fragment's exchange runs in the background for this many inner steps before its
    result is merged (0: the island waits for it: blocking DiLoCo). Must be < outer.inner_steps."""
    mix: float = 0.5
    """alpha in [0, 1]: with overlap, the merged fragment is alpha * local + (1 - alpha) *
    shared (the paper's 0.5). Ignored without overlap (the local fragment becomes the shared)."""
    eager: bool = False
    """Eager updates (Kale et al. 2025): at a sync point, merge at once an estimate of the
    shared fragment built from this island's fresh pseudo-gradient and the others' last ones,
    and correct it when the mean arrives (docs/streaming.md). Needs overlap."""

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
        self.unset_step_keys: tuple[str, ...] = tuple(
            key for key in STEP_DEFAULTS if getattr(self, key) is None
        )
        # Settled by adopt_island_count (IslandConfig knows the island count); never here:
        # omegaconf builds its schema from a default instance, which must keep them unset.
        require(self.step_lr > 0, "outer.lr", "> 0", self.lr)
        require(0 <= self.min_lr_ratio <= 1, "outer.min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        require(0 <= self.step_momentum < 1, "outer.momentum", "in [0, 1)", self.momentum)
        require(
            self.momentum_warmup_rounds >= 0,
            "outer.momentum_warmup_rounds",
            ">= 0",
            self.momentum_warmup_rounds,
        )
        require(
            0 <= self.warmup_rounds < self.rounds,
            "outer.warmup_rounds",
            f"in [0, outer.rounds={self.rounds})",
            self.warmup_rounds,
        )
        require(self.warmup_lr > 0, "outer.warmup_lr", "> 0", self.warmup_lr)
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
        require(
            1 <= self.fragments <= self.inner_steps,
            "outer.fragments",
            f"in [1, outer.inner_steps={self.inner_steps}]",
            self.fragments,
        )
        require(
            0 <= self.overlap_steps < self.inner_steps,
            "outer.overlap_steps",
            f"in [0, outer.inner_steps={self.inner_steps}) (tau < H)",
            self.overlap_steps,
        )
        require(0 <= self.mix <= 1, "outer.mix", "in [0, 1]", self.mix)
        if self.offload_state and (self.optimizer != "sgd" or self.streaming):
            raise ConfigError(
                "outer.offload_state works with outer.optimizer=sgd and blocking rounds "
                f"(outer.fragments=1, outer.overlap_steps=0), got optimizer={self.optimizer}, "
                f"fragments={self.fragments}, overlap_steps={self.overlap_steps}"
            )
        if self.streaming and self.warmup_rounds:
            raise ConfigError(
                "outer.warmup_rounds works with blocking rounds only (outer.fragments=1, "
                f"outer.overlap_steps=0), got {self.warmup_rounds} with fragments="
                f"{self.fragments}, overlap_steps={self.overlap_steps}"
            )

    def adopt_island_count(self, islands: int) -> None:
        """Settle the unset outer.lr, outer.momentum and outer.nesterov for `islands` islands:
        one island with sgd gets ONE_ISLAND_STEP (plain training), several keep the paper's."""
        one_island = islands == 1 and self.optimizer == "sgd"
        self._fill_step_defaults(ONE_ISLAND_STEP if one_island else STEP_DEFAULTS)

    def _fill_step_defaults(self, values: dict[str, float | bool]) -> None:
        for key in self.unset_step_keys:
            setattr(self, key, values[key])

    @property
    def step_lr(self) -> float:
        """outer.lr, or its several-islands default while unset."""
        return float(self._settled("lr"))

    @property
    def step_momentum(self) -> float:
        """outer.momentum, or its several-islands default while unset."""
        return float(self._settled("momentum"))

    @property
    def step_nesterov(self) -> bool:
        """outer.nesterov, or its several-islands default while unset."""
        return bool(self._settled("nesterov"))

    def _settled(self, key: str) -> float | bool:
        value: float | bool | None = getattr(self, key)
        return STEP_DEFAULTS[key] if value is None else value

    @property
    def streaming(self) -> bool:
        """Fragments or overlap: the streaming outer loop (P = 1, tau = 0 is the blocking one)."""
        return self.fragments > 1 or self.overlap_steps > 0

    @property
    def codec_options(self) -> CodecOptions:
        return CodecOptions(block_size=self.block_size, topk_fraction=self.topk_fraction)

    def ignored_options(self) -> dict[str, str]:
        """The keys set to non-defaults that the chosen codec, optimizer and schedule never
        read, each with what would read it."""
        default = OuterConfig()
        codec_keys = ignored_codec_options(self.codec.value, self.codec_options)
        ignored = {f"outer.{key}": reason for key, reason in codec_keys.items()}
        if not self.error_feedback and self.error_feedback_decay != default.error_feedback_decay:
            ignored["outer.error_feedback_decay"] = "read only with outer.error_feedback=true"
        reads = _OPTIMIZER_READS.get(self.optimizer, ("optimizer_args",))
        optimizer_keys = ("lr", "momentum", "momentum_warmup_rounds", "nesterov", "betas", "eps")
        unread = {
            key: f"not read by outer.optimizer={self.optimizer}"
            for key in (*optimizer_keys, "optimizer_args")
            if key not in reads
        }
        if self.lr_schedule is OuterLrSchedule.constant:
            unread["min_lr_ratio"] = "read only with an outer.lr_schedule other than constant"
        if self.warmup_rounds == 0:
            unread["warmup_lr"] = "read only with outer.warmup_rounds > 0"
        if self.overlap_steps == 0:
            unread["mix"] = unread["eager"] = "read only with outer.overlap_steps > 0"
        ignored |= {
            f"outer.{key}": reason
            for key, reason in unread.items()
            if key not in self.unset_step_keys and getattr(self, key) != getattr(default, key)
        }
        return ignored

    def schedule(self) -> OuterSchedule:
        """The round-by-round H, outer lr and momentum these settings give."""
        from diloco.outer.schedule import OuterSchedule

        return OuterSchedule(
            rounds=self.rounds,
            inner_steps=self.inner_steps,
            warmup_rounds=self.warmup_rounds,
            warmup_lr=self.warmup_lr,
            lr=self.step_lr,
            lr_schedule=self.lr_schedule.value,
            min_lr_ratio=self.min_lr_ratio,
            momentum=self.step_momentum,
            momentum_warmup_rounds=self.momentum_warmup_rounds,
        )


def _sgd(config: OuterConfig) -> OuterOptimizer:
    from diloco.outer.optimizers import SgdOuter

    return SgdOuter(
        lr=config.step_lr,
        momentum=config.step_momentum,
        nesterov=config.step_nesterov,
        schedule=config.schedule(),
    )


def _adam(config: OuterConfig) -> OuterOptimizer:
    from diloco.outer.optimizers import adam_outer

    return adam_outer(
        lr=config.step_lr, betas=config.betas, eps=config.eps, schedule=config.schedule()
    )


OUTER_OPTIMIZERS: dict[str, Callable[[OuterConfig], OuterOptimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
}
# The options each named optimizer reads (a module:factory reads only outer.optimizer_args).
_OPTIMIZER_READS: dict[str, tuple[str, ...]] = {
    "sgd": ("lr", "momentum", "momentum_warmup_rounds", "nesterov"),
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
    optimizer = factory_outer(
        factory, config.optimizer, dict(config.optimizer_args), schedule=config.schedule()
    )
    probe(optimizer)
    return optimizer
