"""Hugging Face models and data through the CLI (issue 16), from files the test makes itself:
a tokenizer trained by examples/train_tokenizer.py on a generated jsonl, a tiny Llama and a
tiny GPT-2 trained by DiLoCo on 2 islands, resume, export, warm start, wandb and loss.png."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import FaultPlan, assert_ok, metrics_rows, run_cli, start_cli

pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")
pytest.importorskip("datasets", reason="the hf extra: pip install -e '.[hf]'")
pytest.importorskip("tokenizers", reason="the hf extra: pip install -e '.[hf]'")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)
QUIET = ("run.progress=none", "run.threads=1", "run.device=cpu")
LLAMA = (
    "model.name=hf",
    "model.hf.config={model_type: llama, hidden_size: 48, intermediate_size: 96, "
    "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, "
    "max_position_embeddings: 64}",
)
GPT2 = (
    "model.name=hf",
    "model.hf.config={model_type: gpt2, n_embd: 48, n_layer: 2, n_head: 4, n_positions: 64, "
    "resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A jsonl of built-in documents and a BPE tokenizer trained on it by the example."""
    folder = tmp_path_factory.mktemp("hf-data")
    jsonl, tokenizer = folder / "docs.jsonl", folder / "tokenizer.json"
    done = subprocess.run(
        [
            sys.executable,
            "examples/train_tokenizer.py",
            "--out",
            str(tokenizer),
            "--vocab-size",
            "512",
            "--max-mb",
            "0.5",
            "--write-jsonl",
            str(jsonl),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert jsonl.stat().st_size > 10_000 and tokenizer.is_file()
    return {"jsonl": jsonl, "tokenizer": tokenizer}


def data(corpus: dict[str, Path]) -> tuple[str, ...]:
    return (
        "data.name=hf",
        f"data.hf.files={corpus['jsonl']}",
        f"data.hf.tokenizer={corpus['tokenizer']}",
        "data.seq_len=32",
        "data.batch_size=4",
        "data.val_fraction=0.2",
    )


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "island.yaml"
    path.write_text(
        "transport: {kind: local, islands: 2}\n"
        "outer: {rounds: 4, inner_steps: 5}\n"
        "inner: {lr: 3.0e-3, warmup_steps: 2}\n"
        "eval: {every: 1, batches: 2}\n"
    )
    return str(path)


@pytest.mark.parametrize(
    # make test runs the HF path through the export round trip; both learners: make test-all
    "model",
    [pytest.param(LLAMA, marks=pytest.mark.slow), pytest.param(GPT2, marks=pytest.mark.slow)],
    ids=["llama", "gpt2"],
)
def test_a_tiny_hf_model_learns_on_two_islands_and_resumes_bit_exactly(
    model: tuple[str, ...], corpus: dict[str, Path], config: str, tmp_path: Path
) -> None:
    common = ["--config", config, *QUIET, *model, *data(corpus)]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert_ok(run_cli([*common, f"run.dir={straight}"], timeout_s=240))
    rows = metrics_rows(straight)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]  # it learns
    assert rows[-1]["islands"] == 2
    command = [*common, f"run.dir={killed}"]
    (first,) = FaultPlan().kill(island=0, round=2).run([start_cli(command)], [killed], 200)
    assert first.returncode == -9, first.describe()
    assert_ok(run_cli(command, timeout_s=240))
    assert [r["params_sha256"] for r in metrics_rows(killed)] == [r["params_sha256"] for r in rows]


@pytest.mark.slow
def test_two_torch_islands_hold_the_same_hash(
    corpus: dict[str, Path], config: str, tmp_path: Path
) -> None:
    from harness import finish_all, free_port

    common = [
        "--config",
        config,
        *QUIET,
        *LLAMA,
        *data(corpus),
        "transport.kind=torch",
        "outer.rounds=2",
        f"transport.torch.init_method=tcp://127.0.0.1:{free_port()}",
        f"run.dir={tmp_path}",
    ]
    islands = [start_cli([*common, f"transport.rank={rank}"]) for rank in (0, 1)]
    assert_ok(*finish_all(islands, timeout_s=240))
    hashes = [metrics_rows(tmp_path / f"island-{rank}")[-1]["params_sha256"] for rank in (0, 1)]
    assert hashes[0] == hashes[1]


def test_export_loads_with_from_pretrained_and_gives_the_same_logits(
    corpus: dict[str, Path], config: str, tmp_path: Path
) -> None:
    """The built-in GPT on hf data, exported: from_pretrained's logits equal ours (1e-5), and a
    warm start from the exported directory starts from exactly those weights."""
    import transformers

    from diloco.checkpoint import list_checkpoints, load_checkpoint
    from diloco.config import load_config
    from diloco.models.build import build_model
    from diloco.outer.pseudo_gradient import copy_flat_into_, flatten_params
    from diloco.shared_state import params_sha256

    gpt = (
        "model.name=gpt",
        "model.n_layer=2",
        "model.d_model=32",
        "model.n_head=2",
        "model.vocab_size=512",
    )
    run_dir, out = tmp_path / "run", tmp_path / "exported"
    args = [*QUIET, *gpt, *data(corpus), f"run.dir={run_dir}"]
    assert_ok(run_cli(["--config", config, *args, "outer.rounds=2"]))
    result = run_cli(["export", "--config", config, *args, "--out", str(out)])
    assert_ok(result)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert result.stderr == ""  # no progress bars: the CLI's output is its own

    settings = load_config(config, [*args])
    ours = build_model(settings.model, context=settings.data.seq_len)
    checkpoints = run_dir / "checkpoints"
    anchor = load_checkpoint(checkpoints, max(list_checkpoints(checkpoints)))["outer"]["anchor"]
    copy_flat_into_(list(ours.parameters()), anchor)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokens = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        expected = ours.logits(tokens) if hasattr(ours, "logits") else None
        got = theirs(tokens).logits
    assert expected is not None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    warm = tmp_path / "warm"
    assert_ok(
        run_cli(
            [
                "--config",
                config,
                *QUIET,
                *gpt,
                *data(corpus),
                f"run.dir={warm}",
                "outer.rounds=1",
                f"run.init_from={out}",
            ]
        )
    )
    fingerprint = json.loads((warm / "fingerprint.json").read_text())
    assert fingerprint["initial weights"] == params_sha256(anchor)[:16]
    assert (
        params_sha256(flatten_params(list(ours.parameters())))[:16]
        == fingerprint["initial weights"]
    )


@pytest.mark.slow  # about 15 s; tests/unit/test_plots_wandb.py covers both writers in make test
def test_wandb_offline_and_loss_png(config: str, tmp_path: Path) -> None:
    pytest.importorskip("wandb", reason="the wandb extra: pip install -e '.[wandb]'")
    pytest.importorskip("matplotlib", reason="the plots extra: pip install -e '.[plots]'")
    from harness import TINY

    run_dir = tmp_path / "run"
    result = run_cli(
        [
            "--config",
            config,
            *TINY,
            "outer.rounds=2",
            f"run.dir={run_dir}",
            "run.wandb.project=diloco-test",
            "run.wandb.mode=offline",
        ],
        timeout_s=240,
    )
    assert_ok(result)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())
    png = run_dir / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[0] > 100
