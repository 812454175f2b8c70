"""Train a byte-level BPE tokenizer on local text, in seconds, with no download.

The tokenizer (GPT-2's scheme: bytes mapped to printable characters, merges learned by BPE, an
`<|endoftext|>` special token that separates packed documents) is written as a
`tokenizer.json` for `data.hf.tokenizer`. By default it learns from the built-in corpus (the
Python standard library's sources); `--files` trains it on your own text or jsonl files.
`--write-jsonl` also writes built-in corpus documents as a jsonl file (one {"text", "path"}
object per source file), so that a subword run works end to end:

    python examples/train_tokenizer.py --out runs/tokenizer --write-jsonl runs/stdlib.jsonl
    diloco-island --config configs/hf-tiny-llama.yaml

`--out` ending in .json writes that file; any other path is a directory that gets
tokenizer.json and a tokenizer_config.json (AutoTokenizer can then load it too).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from diloco.data.corpus import stdlib_files, stdlib_root

END_OF_TEXT = "<|endoftext|>"


def corpus_documents(max_bytes: int) -> Iterator[tuple[str, str]]:
    """(relative path, text) of standard-library files, spread evenly, up to `max_bytes`."""
    root = stdlib_root()
    files = stdlib_files(root)
    total = sum(path.stat().st_size for path in files)
    stride = max(1, math.ceil(total / max(1, max_bytes)))
    used = 0
    for path in files[::stride]:
        text = path.read_bytes().decode("utf-8", errors="replace")
        if used + len(text) > max_bytes and used > 0:
            return
        used += len(text)
        yield path.relative_to(root).as_posix(), text


def file_documents(patterns: list[str], field: str) -> Iterator[str]:
    """Texts of the user's files: a jsonl file's `field` per line, any other file whole."""
    paths = sorted({Path(p) for pattern in patterns for p in glob.glob(pattern, recursive=True)})
    if not paths:
        raise SystemExit(f"--files: nothing matches {patterns}")
    for path in paths:
        if path.suffix == ".jsonl":
            with open(path) as handle:
                for line in handle:
                    if line.strip():
                        yield str(json.loads(line).get(field) or "")
        else:
            yield path.read_text(errors="replace")


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save(tokenizer: Tokenizer, out: Path) -> Path:
    """Write tokenizer.json (and, for a directory, tokenizer_config.json); returns the json."""
    if out.suffix == ".json":
        out.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(out))
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": END_OF_TEXT,
        "bos_token": END_OF_TEXT,
        "unk_token": END_OF_TEXT,
        "model_max_length": 1_000_000,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out / "tokenizer.json"


def write_jsonl(path: Path, max_bytes: int) -> int:
    """Built-in corpus documents as jsonl; returns how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w") as handle:
        for relative, text in corpus_documents(max_bytes):
            handle.write(json.dumps({"text": text, "path": relative}) + "\n")
            count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="tokenizer.json path, or a directory")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--files", nargs="*", default=[], help="globs of .txt/.py/.jsonl files")
    parser.add_argument("--field", default="text", help="the text field of jsonl files")
    parser.add_argument("--max-mb", type=float, default=8.0, help="built-in corpus to read")
    parser.add_argument("--write-jsonl", type=Path, help="write built-in documents here")
    args = parser.parse_args(argv)
    if args.out is None and args.write_jsonl is None:
        parser.error("give --out, --write-jsonl or both")
    max_bytes = int(args.max_mb * 1e6)
    if args.write_jsonl is not None:
        count = write_jsonl(args.write_jsonl, max_bytes)
        print(f"wrote {count} documents to {args.write_jsonl}")
    if args.out is not None:
        start = time.perf_counter()
        if args.files:
            texts = file_documents(args.files, args.field)
        else:
            texts = (text for _, text in corpus_documents(max_bytes))
        tokenizer = train_tokenizer(texts, args.vocab_size)
        written = save(tokenizer, args.out)
        print(
            f"trained a {tokenizer.get_vocab_size()}-token BPE tokenizer in "
            f"{time.perf_counter() - start:.1f} s: {written}"
        )


if __name__ == "__main__":
    main()
