"""The one typed schema of every option: each component owns a small config dataclass.

`IslandConfig` composes them. omegaconf turns it into a structured config, so YAML files and
dotted overrides are checked against these types (unknown keys, wrong types); the
`__post_init__` checks, run by `OmegaConf.to_object`, refuse impossible values and name the
YAML path. The string under each field is its documentation: `docs/config.md` is generated
from it (`make docs`), so write the unit and the paper's symbol there.

Paper: DiLoCo, Douillard et al. 2023, https://arxiv.org/abs/2311.08105
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from diloco.errors import ConfigError


class Device(enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(enum.Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Progress(enum.Enum):
    auto = "auto"
    bar = "bar"
    lines = "lines"
    none = "none"


class TransportKind(enum.Enum):
    local = "local"
    torch = "torch"
    grpc = "grpc"
    hivemind = "hivemind"


class GrpcRole(enum.Enum):
    island = "island"
    coordinator = "coordinator"


class Aggregate(enum.Enum):
    mean = "mean"
    median = "median"
    trimmed_mean = "trimmed_mean"


class TorchBackend(enum.Enum):
    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"


class CodecName(enum.Enum):
    none = "none"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"
    fp8 = "fp8"
    fp4 = "fp4"
    fp4_e2m1 = "fp4_e2m1"
    fp4_e3m0 = "fp4_e3m0"
    topk = "topk"


class SelectorName(enum.Enum):
    uniform = "uniform"
    jest = "jest"


class JestScore(enum.Enum):
    learnability = "learnability"
    hard_learner = "hard_learner"
    easy_reference = "easy_reference"


class TokenDtype(enum.Enum):
    uint16 = "uint16"
    uint32 = "uint32"


def _require(ok: bool, key: str, expected: str, got: object) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {got!r}")


@dataclass(kw_only=True)
class RunConfig:
    dir: str = "runs/default"
    """Output directory: metrics.jsonl, summary.json, checkpoints/ (see docs/output.md).
    Multi-process transports write to run.dir/island-{rank}/."""
    seed: int = 0
    """Seed of model initialisation and of every island's data stream."""
    device: Device = Device.auto
    """auto (cuda when available, else cpu), cpu or cuda."""
    precision: Precision = Precision.auto
    """Inner-loop compute precision: auto (bf16 autocast on cuda, fp32 on cpu), fp32, bf16.
    Parameters, optimizer state and everything the outer loop touches stay fp32."""
    checkpoint_every: int = 1
    """Write a checkpoint every this many outer rounds, and always after the last round
    (0: only after the last round)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep on disk."""
    resume: bool = True
    """Resume from the newest checkpoint in run.dir when there is one (metrics.jsonl rows
    written after it are dropped); false, or no checkpoint: start at round 0 with a new
    metrics.jsonl."""
    progress: Progress = Progress.auto
    """auto (a bar on a terminal, plain lines otherwise), bar, lines or none."""
    tensorboard: bool = False
    """Also write TensorBoard events to run.dir/tensorboard (needs the tensorboard package)."""
    threads: int = 0
    """torch intra-op threads on cpu (0: leave torch's default)."""

    def __post_init__(self) -> None:
        _require(bool(self.dir), "run.dir", "a non-empty path", self.dir)
        _require(self.checkpoint_every >= 0, "run.checkpoint_every", ">= 0", self.checkpoint_every)
        _require(self.keep_checkpoints >= 1, "run.keep_checkpoints", ">= 1", self.keep_checkpoints)
        _require(self.threads >= 0, "run.threads", ">= 0", self.threads)


@dataclass(kw_only=True)
class TorchTransportConfig:
    init_method: str = "env://"
    """torch.distributed rendezvous: env:// (torchrun's MASTER_ADDR/PORT), tcp://host:port or
    file:///shared/path."""
    backend: TorchBackend = TorchBackend.auto
    """auto (nccl on cuda, gloo on cpu), gloo or nccl."""
    timeout_s: float = 600.0
    """Seconds a collective may wait for the slowest island before the run fails."""

    def __post_init__(self) -> None:
        _require(
            self.init_method.startswith(("env://", "tcp://", "file://")),
            "transport.torch.init_method",
            "env://, tcp://host:port or file:///path",
            self.init_method,
        )
        _require(self.timeout_s > 0, "transport.torch.timeout_s", "> 0", self.timeout_s)


@dataclass(kw_only=True)
class GrpcTransportConfig:
    address: str = "127.0.0.1:50051"
    """host:port of the coordinator: where islands connect and, unless grpc.listen is set,
    where the coordinator listens."""
    listen: str = ""
    """host:port the coordinator binds (e.g. 0.0.0.0:50051 behind a public name); empty:
    grpc.address."""
    role: GrpcRole = GrpcRole.island
    """island (train; with grpc.serve also host the coordinator) or coordinator (only average:
    a standalone coordinator started with the same command and config)."""
    serve: bool = False
    """This island also hosts the coordinator, in the same process."""
    token_env: str = "DILOCO_TOKEN"
    """Environment variable holding the run token every call must carry (never logged)."""
    token_file: str = ""
    """File holding the run token; read instead of grpc.token_env when set."""
    tls_cert: str = ""
    """PEM certificate: the coordinator serves with it; with grpc.mutual_tls islands present
    it too (a self-signed pair shared by a run's sites: docs/transports.md)."""
    tls_key: str = ""
    """PEM private key of grpc.tls_cert."""
    tls_ca: str = ""
    """PEM certificate(s) islands trust for the coordinator, and the coordinator trusts for
    islands under mutual TLS; empty: grpc.tls_cert itself (a self-signed pair)."""
    mutual_tls: bool = False
    """The coordinator also requires islands to present a certificate signed by grpc.tls_ca."""
    insecure: bool = False
    """Allow plaintext (no TLS) on the wire, for loopback experiments only; the run token is
    still required."""
    deadline_floor_s: float = 30.0
    """A round waits at least this long after its first payload for the other islands."""
    deadline_ceiling_s: float = 600.0
    """A round waits at most this long after its first payload (once transport.min_islands
    have reported)."""
    deadline_slack: float = 2.0
    """The deadline is this many times the latest arrival seen in recent rounds (measured from
    each round's first payload), kept within the floor and the ceiling."""
    retry_s: float = 300.0
    """How long an island retries an unreachable coordinator (bounded exponential backoff)
    before it fails."""
    linger_s: float = 60.0
    """After the last round the coordinator waits up to this long for every island to leave
    (late ones still need the last mean), and as long again for answers still streaming."""

    def __post_init__(self) -> None:
        for key, value in (("address", self.address), ("listen", self.listen or "h:1")):
            host, _, port = value.rpartition(":")
            _require(bool(host) and port.isdigit(), f"transport.grpc.{key}", "host:port", value)
        _require(
            self.deadline_floor_s > 0,
            "transport.grpc.deadline_floor_s",
            "> 0",
            self.deadline_floor_s,
        )
        _require(
            self.deadline_ceiling_s >= self.deadline_floor_s,
            "transport.grpc.deadline_ceiling_s",
            f">= deadline_floor_s ({self.deadline_floor_s})",
            self.deadline_ceiling_s,
        )
        _require(
            self.deadline_slack >= 1, "transport.grpc.deadline_slack", ">= 1", self.deadline_slack
        )
        _require(self.retry_s > 0, "transport.grpc.retry_s", "> 0", self.retry_s)
        _require(self.linger_s >= 0, "transport.grpc.linger_s", ">= 0", self.linger_s)
        _require(
            bool(self.tls_cert) == bool(self.tls_key),
            "transport.grpc.tls_key",
            "set together with tls_cert",
            self.tls_key,
        )
        if self.mutual_tls and not self.tls_cert:
            raise ConfigError("transport.grpc.mutual_tls needs transport.grpc.tls_cert/tls_key")


@dataclass(kw_only=True)
class HivemindTransportConfig:
    initial_peers: list[str] = field(default_factory=list)
    """Multiaddrs of islands already running (/ip4/HOST/tcp/PORT/p2p/PEER_ID); empty (and no
    hivemind.initial_peers_file): this island starts the group and prints its address."""
    initial_peers_file: str = ""
    """File of multiaddrs, one a line, added to hivemind.initial_peers (e.g. another island's
    hivemind.address_file); waited for up to hivemind.averaging_timeout_s."""
    address_file: str = ""
    """This island writes the multiaddrs others can join it at here once it listens."""
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    """Multiaddrs this island listens on (tcp/0: a free port)."""
    announce_maddrs: list[str] = field(default_factory=list)
    """Multiaddrs announced to peers instead of the listening ones (a public address behind
    NAT or port forwarding)."""
    use_relay: bool = True
    """Reach peers behind NAT, and be reached, through libp2p circuit relays."""
    use_auto_relay: bool = False
    """Behind NAT: find relays among the peers and announce addresses through them."""
    client_mode: bool = False
    """This island accepts no incoming connections: it averages through the others but reduces
    no span of the vector and serves no state."""
    identity_path: str = ""
    """Private key of this island's peer id, created on first use (one per island: never share
    or commit it); empty: <run.dir>/island-<rank>/hivemind.key."""
    matchmaking_s: float = 15.0
    """How long a round's group waits for islands that have not arrived (hivemind's
    min_matchmaking_time); an island later than that catches up from the others."""
    request_timeout_s: float = 3.0
    """Timeout of one matchmaking request to a peer (below hivemind.matchmaking_s)."""
    next_chunk_timeout_s: float = 30.0
    """A peer silent this long in the middle of an all-reduce is dropped; the others average
    again without it."""
    averaging_timeout_s: float = 600.0
    """A round's average (matchmaking, all-reduce and its retries) fails after this long."""
    state_timeout_s: float = 60.0
    """Downloading the group's shared state from a peer gives up after this long without data
    (then the next peer is tried)."""

    def __post_init__(self) -> None:
        for key in ("matchmaking_s", "next_chunk_timeout_s", "averaging_timeout_s"):
            _require(getattr(self, key) > 0, f"transport.hivemind.{key}", "> 0", getattr(self, key))
        _require(
            self.state_timeout_s > 0,
            "transport.hivemind.state_timeout_s",
            "> 0",
            self.state_timeout_s,
        )
        _require(
            0 < self.request_timeout_s < self.matchmaking_s,
            "transport.hivemind.request_timeout_s",
            f"in (0, matchmaking_s={self.matchmaking_s})",
            self.request_timeout_s,
        )
        for key in ("initial_peers", "host_maddrs", "announce_maddrs"):
            for maddr in getattr(self, key):
                _require(
                    str(maddr).startswith("/"),
                    f"transport.hivemind.{key}",
                    "multiaddrs such as /ip4/127.0.0.1/tcp/31337",
                    maddr,
                )


@dataclass(kw_only=True)
class TransportConfig:
    kind: TransportKind = TransportKind.local
    """local (all islands in this process, run in turn), torch (one process per island,
    torch.distributed), grpc (a coordinator averages; TLS and a token), hivemind (peers find
    each other through a DHT and average by butterfly all-reduce, no server)."""
    islands: int = 1
    """Number of islands in the group (k in the paper; the world size for torch)."""
    rank: int = -1
    """This island's index in [0, islands) for multi-process kinds; -1: read torchrun's RANK."""
    run_id: str = "diloco"
    """Name of the run: islands with another run_id are refused (grpc) or never meet."""
    min_islands: int = 1
    """A round closes at its deadline only once this many islands have reported (grpc); the
    smallest group that averages a round (hivemind)."""
    aggregate: Aggregate = Aggregate.mean
    """How the coordinator combines payloads (grpc): mean (weighted by tokens), median or
    trimmed_mean (per coordinate, unweighted: robust to a few semi-trusted sites)."""
    trim_fraction: float = 0.2
    """trimmed_mean drops this fraction of the islands at each end, per coordinate."""
    clip_norm: float = 0.0
    """Scale down any island's pseudo-gradient whose L2 norm exceeds this (0: off; grpc)."""
    torch: TorchTransportConfig = field(default_factory=TorchTransportConfig)
    """Settings of the torch transport (read only when transport.kind is torch)."""
    grpc: GrpcTransportConfig = field(default_factory=GrpcTransportConfig)
    """Settings of the grpc transport (read only when transport.kind is grpc)."""
    hivemind: HivemindTransportConfig = field(default_factory=HivemindTransportConfig)
    """Settings of the hivemind transport (read only when transport.kind is hivemind)."""

    def __post_init__(self) -> None:
        _require(self.islands >= 1, "transport.islands", ">= 1", self.islands)
        _require(self.rank >= -1, "transport.rank", ">= -1", self.rank)
        if self.rank >= self.islands:
            raise ConfigError(
                f"transport.rank must be in [0, transport.islands={self.islands}), got {self.rank}"
            )
        _require(bool(self.run_id), "transport.run_id", "a non-empty name", self.run_id)
        _require(
            1 <= self.min_islands <= self.islands,
            "transport.min_islands",
            f"in [1, transport.islands={self.islands}]",
            self.min_islands,
        )
        _require(
            0 <= self.trim_fraction < 0.5,
            "transport.trim_fraction",
            "in [0, 0.5)",
            self.trim_fraction,
        )
        _require(self.clip_norm >= 0, "transport.clip_norm", ">= 0", self.clip_norm)


@dataclass(kw_only=True)
class OuterConfig:
    rounds: int = 10
    """Outer rounds to run (T in the paper)."""
    inner_steps: int = 50
    """Inner AdamW steps between two synchronisations (H in the paper)."""
    lr: float = 0.7
    """Outer learning rate (the paper's best: 0.7)."""
    momentum: float = 0.9
    """Outer momentum mu in [0, 1) (the paper's best: 0.9)."""
    nesterov: bool = True
    """Nesterov momentum for the outer SGD step (false: heavy-ball momentum)."""
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
        _require(self.rounds >= 1, "outer.rounds", ">= 1", self.rounds)
        _require(self.inner_steps >= 1, "outer.inner_steps", ">= 1 (H)", self.inner_steps)
        _require(self.lr > 0, "outer.lr", "> 0", self.lr)
        _require(0 <= self.momentum < 1, "outer.momentum", "in [0, 1)", self.momentum)
        block_limit = 2**16 if self.codec is CodecName.topk else 2**32 - 1
        _require(
            1 <= self.block_size <= block_limit,
            "outer.block_size",
            f"in [1, {block_limit}]" + (" with codec topk" if block_limit == 2**16 else ""),
            self.block_size,
        )
        _require(
            0 < self.topk_fraction <= 1, "outer.topk_fraction", "in (0, 1]", self.topk_fraction
        )
        _require(
            0 <= self.error_feedback_decay <= 1,
            "outer.error_feedback_decay",
            "in [0, 1]",
            self.error_feedback_decay,
        )


@dataclass(kw_only=True)
class InnerConfig:
    lr: float = 4e-4
    """Peak inner AdamW learning rate (the paper: 4e-4)."""
    warmup_steps: int = 1000
    """Linear warm-up, in inner steps (the paper: 1000)."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr * min_lr_ratio after outer.rounds * outer.inner_steps steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (the paper: 0.1)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2 (the paper: 0.95)."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this (0: no clipping)."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "inner.lr", "> 0", self.lr)
        _require(self.warmup_steps >= 0, "inner.warmup_steps", ">= 0", self.warmup_steps)
        _require(0 <= self.min_lr_ratio <= 1, "inner.min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        _require(self.weight_decay >= 0, "inner.weight_decay", ">= 0", self.weight_decay)
        _require(0 <= self.beta1 < 1, "inner.beta1", "in [0, 1)", self.beta1)
        _require(0 <= self.beta2 < 1, "inner.beta2", "in [0, 1)", self.beta2)
        _require(self.grad_clip >= 0, "inner.grad_clip", ">= 0", self.grad_clip)


@dataclass(kw_only=True)
class ReferenceConfig:
    checkpoint: str = ""
    """jest: the frozen reference's file: a diloco checkpoint (run.dir/checkpoints/round-*.pt)
    or a torch state_dict. Empty: train one first on data.selector.reference.data."""
    data: str = "stdlib"
    """jest: the clean data the reference trains on: stdlib (the built-in corpus's training
    split, without data.noise) or a text file's path (byte tokens)."""
    train_steps: int = 200
    """jest: AdamW steps (batches of data.batch_size) training the reference; its FLOPs are
    counted (reference_flops)."""
    lr: float = 2e-3
    """jest: peak AdamW learning rate of the reference's training."""
    n_layer: int = 0
    """jest, built-in GPT: the reference's blocks (0: model.n_layer). It may be smaller."""
    n_head: int = 0
    """jest, built-in GPT: the reference's attention heads (0: model.n_head)."""
    d_model: int = 0
    """jest, built-in GPT: the reference's width (0: model.d_model)."""

    def __post_init__(self) -> None:
        key = "data.selector.reference"
        _require(self.train_steps >= 1, f"{key}.train_steps", ">= 1", self.train_steps)
        _require(self.lr > 0, f"{key}.lr", "> 0", self.lr)
        for name in ("n_layer", "n_head", "d_model"):
            _require(getattr(self, name) >= 0, f"{key}.{name}", ">= 0", getattr(self, name))


@dataclass(kw_only=True)
class SelectorConfig:
    name: SelectorName = SelectorName.uniform
    """Which examples the inner loop trains on: uniform (all) or jest (the most learnable of a
    super-batch, per the learner and a frozen reference; arXiv 2406.17711)."""
    ratio: float = 0.5
    """jest: the kept fraction; each step draws a super-batch of data.batch_size / ratio
    sequences and trains on data.batch_size of them. 1/ratio must be a whole number."""
    score: JestScore = JestScore.learnability
    """jest: learnability (learner loss - reference loss, the default), hard_learner (learner
    loss) or easy_reference (minus the reference loss; needs no learner forward)."""
    temperature: float = 0.0
    """jest: 0 keeps the data.batch_size best scores; > 0 samples them without replacement
    with probabilities softmax(score / temperature), which is what JEST's chunked joint
    sampling reduces to for per-sequence losses (docs/results/jest.md)."""
    rescore_every: int = 1
    """jest: the learner's losses are computed every this many steps; on the steps between,
    the learner term is dropped (learnability ranks by the reference alone, hard_learner keeps
    the first data.batch_size), saving the learner's scoring forward."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """jest: the frozen reference model (loaded, or trained first on clean data)."""

    def __post_init__(self) -> None:
        key = "data.selector"
        _require(0 < self.ratio <= 1, f"{key}.ratio", "in (0, 1]", self.ratio)
        whole = abs(1 / self.ratio - round(1 / self.ratio)) < 1e-6
        _require(whole, f"{key}.ratio", "1/n for a whole number n (0.5, 0.25, ...)", self.ratio)
        _require(self.temperature >= 0, f"{key}.temperature", ">= 0", self.temperature)
        _require(self.rescore_every >= 1, f"{key}.rescore_every", ">= 1", self.rescore_every)


@dataclass(kw_only=True)
class DataConfig:
    name: str = "stdlib"
    """stdlib (the running Python's standard-library sources), text (data.path is a text
    file), tokens (data.path is a nanoGPT-style .bin token file) or module:factory."""
    path: str = ""
    """The training file for text and tokens."""
    val_path: str = ""
    """A separate validation file; empty: the last data.val_fraction of data.path."""
    val_fraction: float = 0.02
    """Share held out for validation: of the files for stdlib, of the tokens otherwise."""
    token_dtype: TokenDtype = TokenDtype.uint16
    """Element type of a tokens file: uint16 or uint32."""
    batch_size: int = 16
    """Sequences per inner step, per island."""
    seq_len: int = 128
    """Tokens per sequence (the model's context)."""
    noise: float = 0.0
    """Share of training sequences replaced by junk in [0, 1) (not for module:factory): random
    tokens, shuffled or a repeated fragment, a third each. Validation stays clean."""
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    """Data selection in front of each island's inner loop (local, never sent)."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for a module:factory data source (its own options)."""

    def __post_init__(self) -> None:
        known = ("stdlib", "text", "tokens")
        _require(
            self.name in known or ":" in self.name,
            "data.name",
            "stdlib, text, tokens or module:factory",
            self.name,
        )
        if self.name in ("text", "tokens") and not self.path:
            raise ConfigError(f"data.path must name a file when data.name is {self.name!r}")
        _require(0 < self.val_fraction < 1, "data.val_fraction", "in (0, 1)", self.val_fraction)
        _require(self.batch_size >= 1, "data.batch_size", ">= 1", self.batch_size)
        _require(self.seq_len >= 1, "data.seq_len", ">= 1", self.seq_len)
        _require(0 <= self.noise < 1, "data.noise", "in [0, 1)", self.noise)
        if self.noise > 0 and ":" in self.name:
            raise ConfigError(
                "data.noise works with stdlib, text and tokens, not a module:factory source"
            )


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "gpt"
    """gpt (the built-in small GPT) or module:factory returning an nn.Module whose forward
    on a batch returns the scalar loss."""
    n_layer: int = 4
    """GPT: transformer blocks."""
    n_head: int = 4
    """GPT: attention heads per block."""
    d_model: int = 128
    """GPT: width of the residual stream."""
    vocab_size: int = 256
    """GPT: vocabulary size (256 for byte-level data). The built-in data sources (stdlib, text,
    tokens) also refuse token ids at or above it, whatever the model."""
    dropout: float = 0.0
    """GPT: dropout probability."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for a module:factory model."""

    def __post_init__(self) -> None:
        _require(
            self.name == "gpt" or ":" in self.name, "model.name", "gpt or module:factory", self.name
        )
        _require(self.n_layer >= 1, "model.n_layer", ">= 1", self.n_layer)
        _require(self.n_head >= 1, "model.n_head", ">= 1", self.n_head)
        if self.d_model < 1 or self.d_model % self.n_head:
            raise ConfigError(
                f"model.d_model must be a positive multiple of model.n_head={self.n_head}, "
                f"got {self.d_model}"
            )
        _require(self.vocab_size >= 2, "model.vocab_size", ">= 2", self.vocab_size)
        _require(0 <= self.dropout < 1, "model.dropout", "in [0, 1)", self.dropout)


@dataclass(kw_only=True)
class EvalConfig:
    every: int = 1
    """Evaluate the shared parameters every this many rounds, and always after the last
    round (0: only after the last round)."""
    batches: int = 8
    """Validation batches (of data.batch_size sequences) per evaluation."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, "eval.every", ">= 0", self.every)
        _require(self.batches >= 1, "eval.batches", ">= 1", self.batches)


@dataclass(kw_only=True)
class IslandConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Outputs, seed, device, checkpoints and display of this process."""
    transport: TransportConfig = field(default_factory=TransportConfig)
    """How the islands find each other and average their pseudo-gradients."""
    outer: OuterConfig = field(default_factory=OuterConfig)
    """The outer loop: rounds, H, the outer Nesterov SGD step and the codec."""
    inner: InnerConfig = field(default_factory=InnerConfig)
    """The inner AdamW optimizer of each island, and its learning-rate schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """What each island trains on; every island reads its own shard or stream."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model every island trains a replica of."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation loss of the shared parameters, written to metrics.jsonl as val_loss."""

    def __post_init__(self) -> None:
        if self.run.device is Device.cpu and self.transport.torch.backend is TorchBackend.nccl:
            raise ConfigError("transport.torch.backend nccl needs run.device cuda or auto")
