"""`diloco-island export --config FILE [key=value ...] --out DIR`: the run's shared model as a
Hugging Face directory (config.json + model.safetensors) that `from_pretrained` loads.

The model is the config's (the built-in GPT becomes a GPT2LMHeadModel with the same logits; an
`hf` model is saved as itself), holding the shared parameters of the newest intact checkpoint
of this island's run.dir.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diloco.checkpoint import list_checkpoints, newest_intact
from diloco.config import IslandConfig
from diloco.errors import ConfigError, make_directory
from diloco.models.build import build_model
from diloco.models.hf_export import export_hf
from diloco.outer.pseudo_gradient import copy_flat_into_
from diloco.parallel.config import Parallelism
from diloco.parallel.stitch import stitch_island_anchor
from diloco.transports.config import hosts_every_island


def export_run(config: IslandConfig, out: Path) -> tuple[Path, int]:
    """Write the run's newest shared model to `out`; returns (out, the round it holds).

    Raises:
        ConfigError: `out` cannot be a directory, no intact checkpoint in run.dir, or a model
            export cannot write.
    """
    make_directory("--out", out)  # before the model is built: a wrong --out is said at once
    run_dir = Path(config.run.dir)
    if not hosts_every_island(config.transport.kind):
        run_dir = run_dir / f"island-{max(config.transport.rank, 0)}"
    checkpoints = run_dir / "checkpoints"
    torch.manual_seed(config.run.seed)
    tokenizer = config.data.hf.tokenizer if config.data.name == "hf" else ""
    vocab = None
    if tokenizer:
        from diloco.data.hf_tokenizer import load_tokenizer

        vocab = load_tokenizer(tokenizer).vocab_size
    model = build_model(config.model, context=config.data.seq_len, data_vocab_size=vocab)
    params = list(model.parameters())
    round, anchor = _newest_anchor(checkpoints, [p.shape for p in params])
    if anchor.numel() != sum(p.numel() for p in params):
        raise ConfigError(
            f"export: the checkpoint in {checkpoints} holds {anchor.numel()} parameters, the "
            "config's model another number: export with the run's own config"
        )
    copy_flat_into_(params, anchor)
    _quiet_transformers()
    return export_hf(model, out, tokenizer=tokenizer), round


def _newest_anchor(checkpoints: Path, shapes: list[torch.Size]) -> tuple[int, torch.Tensor]:
    """The newest intact round's shared vector: one checkpoint, or on an island of several
    ranks (checkpoints/rank-<r>/) the newest round every rank holds intact, stitched."""
    rank_dirs = sorted(checkpoints.glob("rank-*"), key=lambda path: int(path.name[5:]))
    if not rank_dirs:
        found = newest_intact(checkpoints, list_checkpoints(checkpoints))
        if found is None:
            raise ConfigError(
                f"export: no intact checkpoint in {checkpoints} (run the config first, or set "
                "run.dir / transport.rank to the island whose model to export)"
            )
        return found[0], found[1]["outer"]["anchor"]
    common = set.intersection(*(set(list_checkpoints(d)) for d in rank_dirs))
    for round in sorted(common, reverse=True):
        states = [newest_intact(d, [round]) for d in rank_dirs]
        if all(state is not None for state in states):
            shards = [state[1]["outer"]["anchor"] for state in states if state is not None]
            parallel = Parallelism(states[0][1]["config"]["island"]["parallel"])  # type: ignore[index]
            return round, stitch_island_anchor(parallel, shapes, shards)
    raise ConfigError(
        f"export: no round that every rank of the island holds intact in {checkpoints}/rank-*"
    )


def _quiet_transformers() -> None:
    """transformers draws progress bars on stderr while it saves: the CLI's output is its own."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return  # export_hf says which extra is missing
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
