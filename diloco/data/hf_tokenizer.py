"""A tokenizer from local files: a `tokenizer.json` (tokenizers) or a directory (AutoTokenizer).

Documents are encoded without special tokens and packed with one separator token between them
(the end-of-text token, as GPT-2 packs its training data), so the tokenizer must have one.
Nothing is downloaded: AutoTokenizer runs with `local_files_only=True`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diloco.errors import ConfigError
from diloco.extras import require_extra

KEY = "data.hf.tokenizer"
SEPARATOR_TOKENS = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|eos|>",
    "<|end|>",
)
"""End-of-text tokens looked up, in this order, when a tokenizer does not name its own."""


@dataclass(frozen=True)
class TextTokenizer:
    """What packing needs from a tokenizer."""

    encode_batch: Callable[[Sequence[str]], list[list[int]]]
    """Token ids of each text, without special tokens."""
    vocab_size: int
    """Token ids are below this (added tokens included)."""
    separator_id: int
    """The end-of-text id written after every document."""
    fingerprint: str
    """sha256 of everything that decides the ids (the tokenizer's full serialization)."""


def load_tokenizer(path: str) -> TextTokenizer:
    """The tokenizer at `path`: a tokenizer.json file or a tokenizer directory.

    Raises:
        ConfigError: the path is missing, the file is not a tokenizer, the hf extra is not
            installed, or the tokenizer has no end-of-text token.
    """
    location = Path(path)
    if location.is_file():
        return _from_tokenizer_json(location)
    if location.is_dir():
        return _from_directory(location)
    raise ConfigError(f"{KEY}: {path!r} is neither a tokenizer.json file nor a directory")


def _from_tokenizer_json(path: Path) -> TextTokenizer:
    tokenizers = require_extra("tokenizers", key=KEY, extra="hf")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust parser raises a bare Exception on a bad file
        raise ConfigError(f"{KEY}: {path} is not a tokenizer.json: {_first_line(error)}") from None
    separator = _separator_from_vocabulary(backend.get_vocab(with_added_tokens=True), path)
    return _from_backend(backend, separator, extra="")


def _from_directory(directory: Path) -> TextTokenizer:
    transformers = require_extra("transformers", key=KEY, extra="hf")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        if (directory / "tokenizer.json").is_file():
            return _from_tokenizer_json(directory / "tokenizer.json")
        raise ConfigError(
            f"{KEY}: {directory} is not a tokenizer directory: {_first_line(error)}"
        ) from None
    separator = tokenizer.eos_token_id
    if separator is None:
        separator = _separator_from_vocabulary(tokenizer.get_vocab(), directory)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return _from_backend(backend, int(separator), extra=str(len(tokenizer)))
    return TextTokenizer(  # a tokenizer without a Rust backend (sentencepiece, custom)
        encode_batch=lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"],
        vocab_size=len(tokenizer),
        separator_id=int(separator),
        fingerprint=_hash_files(directory, int(separator)),
    )


def _from_backend(backend: Any, separator_id: int, extra: str) -> TextTokenizer:
    # encode_batch_fast (newer tokenizers) skips character offsets: 8 MB in 5.5 s, not 8.3.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def encode_batch(texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in encode(list(texts), add_special_tokens=False)]

    vocab_size = max(backend.get_vocab_size(with_added_tokens=True), separator_id + 1)
    serialized = f"{backend.to_str()}\n{separator_id}\n{extra}"
    return TextTokenizer(
        encode_batch=encode_batch,
        vocab_size=vocab_size,
        separator_id=separator_id,
        fingerprint=hashlib.sha256(serialized.encode()).hexdigest(),
    )


def _separator_from_vocabulary(vocabulary: dict[str, int], where: Path) -> int:
    for token in SEPARATOR_TOKENS:
        if token in vocabulary:
            return vocabulary[token]
    raise ConfigError(
        f"{KEY}: {where} has no end-of-text token to separate documents (looked for "
        f"{', '.join(SEPARATOR_TOKENS)}); add one as a special token"
    )


def _hash_files(directory: Path, separator_id: int) -> str:
    digest = hashlib.sha256(json.dumps(separator_id).encode())
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix in (".json", ".model", ".txt"):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
