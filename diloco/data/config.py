"""The `data` section: which tokens each island trains on, in what batches."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from diloco.data.hf_config import HfDataConfig
from diloco.data.selectors.config import SelectorConfig
from diloco.errors import ConfigError, require


class TokenDtype(enum.Enum):
    uint16 = "uint16"
    uint32 = "uint32"


@dataclass(kw_only=True)
class DataConfig:
    name: str = "stdlib"
    """stdlib (the running Python's standard-library sources), text (data.path is a text
    file), tokens (data.path is a nanoGPT-style .bin token file), hf (local jsonl, parquet, txt
    or datasets files and a tokenizer: data.hf) or module:factory."""
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
    hf: HfDataConfig = field(default_factory=HfDataConfig)
    """data.name hf: documents from local files, tokenized once into a cache under run.dir
    (needs the hf extra: pip install -e ".[hf]")."""

    def __post_init__(self) -> None:
        known = ("stdlib", "text", "tokens", "hf")
        require(
            self.name in known or ":" in self.name,
            "data.name",
            "stdlib, text, tokens, hf or module:factory",
            self.name,
        )
        if self.name == "hf":
            self.hf.require()
        if self.name in ("text", "tokens") and not self.path:
            raise ConfigError(f"data.path must name a file when data.name is {self.name!r}")
        require(0 < self.val_fraction < 1, "data.val_fraction", "in (0, 1)", self.val_fraction)
        require(self.batch_size >= 1, "data.batch_size", ">= 1", self.batch_size)
        require(self.seq_len >= 1, "data.seq_len", ">= 1", self.seq_len)
        require(0 <= self.noise < 1, "data.noise", "in [0, 1)", self.noise)
        if self.noise > 0 and ":" in self.name:
            raise ConfigError(
                "data.noise works with stdlib, text and tokens, not a module:factory source"
            )

    def ignored_options(self) -> dict[str, str]:
        """The keys set to non-defaults that this data source never reads, each with what
        would read it."""
        ignored: dict[str, str] = {}
        if ":" not in self.name and self.args:
            ignored["data.args"] = "read only by a factory (data.name=module:function)"
        if self.name != "hf" and self.hf != DataConfig().hf:
            ignored["data.hf"] = "read only by data.name=hf"
        if self.name == "hf" and (self.path or self.val_path):
            ignored |= {
                key: "data.name=hf reads its files from data.hf"
                for key in ("data.path", "data.val_path")
                if getattr(self, key[5:])
            }
        if self.val_path and self.val_fraction != DataConfig().val_fraction:
            ignored["data.val_fraction"] = "data.val_path is set: no split of data.path is held out"
        return ignored | self.selector.ignored_options()
