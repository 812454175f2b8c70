"""The `data.hf` section: local text files read with `datasets`, tokenized by a local tokenizer.

`data.name: hf` reads jsonl, json, parquet or txt files (or a directory written by
`datasets.Dataset.save_to_disk`), takes one text field, tokenizes every document once with a
`tokenizer.json` (the `tokenizers` library) or a tokenizer directory (`AutoTokenizer`), and
trains on windows of the packed tokens. Nothing is downloaded. Standard library only, so that
a config error answers without importing torch or datasets.
"""

from __future__ import annotations

from dataclasses import dataclass

from diloco.errors import ConfigError

KEY = "data.hf"


@dataclass(kw_only=True)
class HfDataConfig:
    files: str = ""
    """The documents: a file, a glob (data/*.jsonl, data/**/*.parquet) or a directory written
    by datasets' save_to_disk. Formats by suffix: .jsonl/.json (one object per line),
    .parquet, .txt (one document per paragraph: blank lines separate documents); .gz
    compressed jsonl, json and txt work too. All files of one run have the same format."""
    field: str = "text"
    """The field holding each document's text (jsonl, json, parquet and saved datasets; txt
    files have only `text`)."""
    tokenizer: str = ""
    """A tokenizer.json file (the tokenizers library, e.g. written by
    examples/train_tokenizer.py) or a local tokenizer directory (AutoTokenizer, with
    local_files_only). Its vocabulary must fit the model's."""

    def __post_init__(self) -> None:
        if not self.field:
            raise ConfigError(f"{KEY}.field must name the text field, got {self.field!r}")

    def require(self) -> None:
        """Refuse a section without files or tokenizer (called when data.name is hf).

        Raises:
            ConfigError: data.hf.files or data.hf.tokenizer is empty.
        """
        for key in ("files", "tokenizer"):
            if not getattr(self, key):
                raise ConfigError(f"data.name hf needs {KEY}.{key}, got an empty value")
