"""Load-time checks that no single dataclass can make: numbers that are not numbers, and sizes
that cannot fit the machine.

Two classes of value pass every `__post_init__` range check and fail much later, naming no
key: a non-finite float (`inf > 0` is true, so `outer.lr=inf` trained a round before the codec
refused the pseudo-gradient) and a size that cannot be allocated (`data.seq_len=10**10` ran out
of memory building the model). `check_numbers` walks every typed leaf of the merged config,
wherever its dataclass lives, so a float key added later is covered without anyone remembering;
`check_sizes` estimates what the built-in GPT must hold in memory and refuses what cannot fit.
Paper (the model and its sizes): DiLoCo, Douillard et al. 2023, https://arxiv.org/abs/2311.08105
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.nodes import AnyNode

from diloco.errors import ConfigError

if TYPE_CHECKING:
    from diloco.config.schema import IslandConfig

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FP32_BYTES = 4


def check_numbers(node: DictConfig | ListConfig, prefix: str = "") -> None:
    """Refuse a non-finite float or an integer beyond 64 bits anywhere in a merged config.

    Runs before `OmegaConf.to_object`, so a non-finite value is named here rather than by a
    cross-field `__post_init__` check that would blame the other key. Free-form values
    (`model.args`, `data.args`: typed `Any`) are the factory's own and are not checked.

    Raises:
        ConfigError: naming the full key (`outer.lr`, `leaf.rates[1]`) and the value.
    """
    keys: list[Any] = list(range(len(node))) if isinstance(node, ListConfig) else list(node)
    for key in keys:
        full_key = f"{prefix}[{key}]" if isinstance(node, ListConfig) else f"{prefix}{key}"
        if isinstance(node._get_node(key), AnyNode) or OmegaConf.is_missing(node, key):
            continue  # free-form; a missing value is reported by to_object
        value = node[key]  # resolves an interpolation
        if isinstance(value, DictConfig):
            check_numbers(value, f"{full_key}.")
        elif isinstance(value, ListConfig):
            check_numbers(value, full_key)
        else:
            _check_number(full_key, value)


def _check_number(key: str, value: object) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise ConfigError(f"{key} must fit in a signed 64-bit integer, got {value}")


# --- memory: what the built-in GPT must hold -----------------------------------------------------


@dataclass(frozen=True)
class GptMemory:
    """A lower bound on the memory one process running the built-in GPT needs, in bytes.

    Only what certainly exists at the same time is counted, so that a run this refuses could
    never have fitted; buffers that come and go (codec payloads, the flat pseudo-gradient, the
    JEST reference, allocator slack) are left out, and real runs need more.
    """

    num_params: int
    """Parameters of one model (tied embeddings counted once), the position table included."""
    position_params: int
    """data.seq_len x model.d_model: the learned position table, the part that grows with the
    context."""
    host_weights_bytes: int
    """The model is built on the host first (then copied to its device): one fp32 copy."""
    replica_state_bytes: int
    """fp32 copies per hosted island: weights, gradients, AdamW's two moments (inner loop),
    the anchor (diloco/outer/sync.py), and the error-feedback residual when it is on; the
    outer optimizer's state depends on outer.optimizer and is left out. transport.kind local
    hosts every island in this process."""
    activation_bytes: int
    """One batch's tensors kept for backward (islands train in turn: one batch at a time)."""
    attention_score_bytes: int
    """B x H x T x T scores, only where PyTorch's math attention kernel runs (dropout on cpu)."""

    @property
    def device_bytes(self) -> int:
        """What lives on the training device."""
        return self.replica_state_bytes + self.activation_bytes + self.attention_score_bytes

    @property
    def total_bytes(self) -> int:
        """Everything, when the training device is the host (cpu)."""
        return self.host_weights_bytes + self.device_bytes


def estimate_gpt_memory(config: IslandConfig, *, on_cuda: bool) -> GptMemory:
    """The lower bound `GptMemory` of a run of the built-in GPT (`model.name: gpt`).

    The parameter count is exactly `GPT.num_params()` (diloco/models/gpt.py; a unit test holds
    it). The context T is data.seq_len: the model sees seq_len tokens and predicts the next.
    Activations kept for backward, per layer and token, at least: q, k, v (3 D), the attention
    output (D), the MLP's hidden layer before and after GELU (8 D); and per token the logits
    and their log-softmax (2 V, fp32: the loss upcasts). Their element is 2 bytes under bf16
    autocast (cuda with run.precision auto, or bf16), else 4. Attention scores (B H T^2 fp32)
    exist only on the math kernel: PyTorch's flash and memory-efficient kernels never hold
    them, and on cpu they are used unless dropout is on (measured on cpu, T = 8192, B = H = 1:
    47 MiB peak without dropout, 1,065 MiB with dropout 0.1 where T^2 x 4 B is 256 MiB).
    """
    model, data = config.model, config.data
    L, D, V, T, B = model.n_layer, model.d_model, model.vocab_size, data.seq_len, data.batch_size
    block_params = 12 * D * D + 13 * D  # qkv 3D^2+3D, proj D^2+D, MLP 8D^2+5D, two norms 4D
    position_params = T * D
    num_params = V * D + position_params + L * block_params + 2 * D  # + the final norm
    hosted = config.transport.islands if config.transport.kind.value == "local" else 1
    copies = 5 + (1 if config.outer.error_feedback else 0)
    precision = config.run.precision.value
    bf16 = precision == "bf16" or (precision == "auto" and on_cuda)
    element_bytes = 2 if bf16 else FP32_BYTES
    math_kernel = not on_cuda and model.dropout > 0
    return GptMemory(
        num_params=num_params,
        position_params=position_params,
        host_weights_bytes=FP32_BYTES * num_params,
        replica_state_bytes=FP32_BYTES * num_params * copies * hosted,
        activation_bytes=B * T * (element_bytes * 12 * D * L + 2 * FP32_BYTES * V),
        attention_score_bytes=FP32_BYTES * B * model.n_head * T * T if math_kernel else 0,
    )


def check_gpt_memory(
    config: IslandConfig, *, on_cuda: bool, available_bytes: int, where: str
) -> None:
    """Refuse a built-in GPT run whose lower-bound memory exceeds `available_bytes`.

    Args:
        config: the loaded config (model.name must be gpt).
        on_cuda: the training device is a cuda device (its memory is `available_bytes`).
        available_bytes: the device's memory (cuda), or the host's (cpu).
        where: how the message names that memory ("this machine", "cuda:0").

    Raises:
        ConfigError: one line naming the size key that dominates and the estimate.
    """
    estimate = estimate_gpt_memory(config, on_cuda=on_cuda)
    batch_bytes = estimate.activation_bytes + estimate.attention_score_bytes
    weights_bytes = estimate.replica_state_bytes
    if not on_cuda:
        weights_bytes += estimate.host_weights_bytes
    if weights_bytes + batch_bytes > available_bytes:
        raise ConfigError(
            _too_large(config, estimate, weights_bytes, batch_bytes, available_bytes, where)
        )


def check_sizes(config: IslandConfig) -> None:
    """The load-time size check: what must fit this machine's memory before anything is built.

    With run.device cpu the whole estimate lives on the host. With auto or cuda the device is
    only known once torch is loaded, so here only the host's copy of the weights (the model is
    built there first) is checked; the composition root checks the device with
    `check_gpt_memory`. A `module:factory` model's sizes are unknown until it is built. The
    validation batches of the built-in data sources are held on the host whatever the model.

    Raises:
        ConfigError: one line naming data.seq_len (or the model's width, or eval.batches) and
            the estimate.
    """
    available = host_memory_bytes()
    if available is None:
        return
    if config.model.name == "gpt" and config.run.device.value == "cpu":
        check_gpt_memory(config, on_cuda=False, available_bytes=available, where="this machine")
    elif config.model.name == "gpt":
        estimate = estimate_gpt_memory(config, on_cuda=True)
        if estimate.host_weights_bytes > available:
            host_weights = estimate.host_weights_bytes
            raise ConfigError(
                _too_large(config, estimate, host_weights, 0, available, "this machine")
            )
    _check_validation_batches(config, available)


def _check_validation_batches(config: IslandConfig, available_bytes: int) -> None:
    """The built-in data sources build every validation batch up front and keep them for the
    whole run (diloco/data/windows.py: eval.batches x data.batch_size windows of
    data.seq_len + 1 int64 tokens), whatever the model."""
    data = config.data
    if data.name not in ("stdlib", "text", "tokens"):
        return  # a module:factory source makes its own
    needed = 8 * config.eval.batches * data.batch_size * (data.seq_len + 1)
    if needed > available_bytes:
        raise ConfigError(
            f"eval.batches={config.eval.batches} with data.batch_size={data.batch_size} and "
            f"data.seq_len={data.seq_len} is too large: the validation batches, held in memory, "
            f"need {_size(needed)} (int64 tokens), more than this machine has "
            f"({_size(available_bytes)})"
        )


def host_memory_bytes() -> int | None:
    """Physical memory, or the cgroup's limit when lower (a container); None if unknown."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            return min(physical, int(limit))
    return physical if physical > 0 else None


def _too_large(
    config: IslandConfig,
    estimate: GptMemory,
    weights_bytes: int,
    batch_bytes: int,
    available_bytes: int,
    where: str,
) -> str:
    """One line: the key that dominates with its value, the estimate and its parts, the memory."""
    needed = weights_bytes + batch_bytes
    position_bytes = weights_bytes * estimate.position_params // estimate.num_params
    data = config.data
    if 2 * batch_bytes >= needed:  # one batch: B x T tokens (x T for attention scores)
        key = f"data.batch_size={data.batch_size} with data.seq_len={data.seq_len}"
    elif 2 * (position_bytes + batch_bytes) >= needed:  # grows with the context
        key = f"data.seq_len={data.seq_len}"
    else:
        key = f"model.d_model={config.model.d_model} with model.n_layer={config.model.n_layer}"
    parts = [f"weights and their state {_size(weights_bytes)}"]
    parts.append(f"of which the position table {_size(position_bytes)}")
    if estimate.activation_bytes and batch_bytes:
        parts.append(f"one batch's activations {_size(estimate.activation_bytes)}")
    if estimate.attention_score_bytes and batch_bytes:
        parts.append(f"attention scores {_size(estimate.attention_score_bytes)}")
    return (
        f"{key} is too large: the built-in GPT needs at least {_size(needed)} of memory "
        f"({', '.join(parts)}), more than {where} has ({_size(available_bytes)})"
    )


def _size(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:,.1f} {unit}" if unit != "B" else f"{num_bytes} B"
        value /= 1024
    raise AssertionError("unreachable")
