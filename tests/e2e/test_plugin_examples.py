"""The plug-in examples of docs/plugins.md are files under examples/plugins/; each runs here for
at least one round, and the page shows exactly those files."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from harness import assert_ok, metrics_rows, run_cli

from diloco.codecs import NoneCodec
from diloco.data.base import Batch
from diloco.data.selectors.base import Selector
from diloco.data.windows import TokenWindows
from diloco.inner.config import InnerConfig
from diloco.inner.trainer import InnerTrainer
from diloco.models.gpt import GPT, GPTConfig
from diloco.outer.optimizers import SgdOuter
from diloco.outer.pseudo_gradient import flatten_params
from diloco.outer.sync import OuterHyperparams, OuterSync
from diloco.transports.local import LocalGroup

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "examples" / "plugins"
QUIET = ("run.progress=none", "run.threads=1", "run.device=cpu")

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def plugins() -> Iterator[None]:
    sys.path.insert(0, str(PLUGINS))
    try:
        yield
    finally:
        sys.path.remove(str(PLUGINS))


def load(name: str) -> ModuleType:
    return importlib.import_module(name)


def test_the_page_shows_the_files_that_run() -> None:
    result = subprocess.run(
        [sys.executable, "tools/include_examples.py", "--check", "docs/plugins.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    page = (ROOT / "docs" / "plugins.md").read_text()
    shown = {line.split()[2] for line in page.splitlines() if line.startswith("<!-- example:")}
    files = {
        f"examples/plugins/{p.name}" for p in PLUGINS.iterdir() if p.suffix in (".py", ".yaml")
    }
    assert shown == files


def test_model_and_data_factories_train_through_the_cli(tmp_path: Path) -> None:
    """island.yaml with my_model:build and my_data:build, run from the examples folder."""
    run_dir = tmp_path / "run"
    result = run_cli(
        ["--config", "island.yaml", "outer.rounds=2", f"run.dir={run_dir}", *QUIET],
        cwd=PLUGINS,
        timeout_s=150,
    )
    assert_ok(result)
    rows = metrics_rows(run_dir)
    assert [row["round"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["val_loss"]) for row in rows)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]  # it learns the linear map


def test_an_outer_optimizer_factory_gives_the_default_sgds_anchor(tmp_path: Path) -> None:
    """outer.optimizer=outer_sgd:build (torch.optim.SGD, Nesterov, lr 0.7, momentum 0.9) ends
    on exactly the parameters of the built-in sgd."""
    hashes = []
    for name, extra in (("sgd", []), ("factory", ["outer.optimizer=outer_sgd:build"])):
        run_dir = tmp_path / name
        args = ["--config", "island.yaml", "outer.rounds=2", f"run.dir={run_dir}", *QUIET]
        assert_ok(run_cli([*args, *extra], cwd=PLUGINS, timeout_s=150))
        hashes.append(metrics_rows(run_dir)[-1]["params_sha256"])
    assert hashes[0] == hashes[1]


def test_the_codec_plugin_averages_two_islands(plugins: None) -> None:
    """HalfCodec through a LocalGroup and OuterSync: both islands hold the same anchor after a
    round, which is the fp16-rounded mean of their moves (outer lr 1, no momentum)."""
    codec = load("half_codec").HalfCodec()
    numel = 50
    group = LocalGroup(2, codec, numel, timeout_s=30)
    plain = SgdOuter(lr=1.0, momentum=0.0, nesterov=False)
    params = [torch.nn.Parameter(torch.zeros(numel)) for _ in range(2)]
    syncs = [
        OuterSync([p], group.transport(rank), codec, plain, OuterHyperparams(inner_steps=1))
        for rank, p in enumerate(params)
    ]
    moves = [torch.linspace(-1, 1, numel) * (rank + 1) for rank in range(2)]
    for param, move in zip(params, moves, strict=True):
        with torch.no_grad():
            param.add_(move)
    threads = [threading.Thread(target=sync.sync, args=(100.0,)) for sync in syncs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert torch.equal(syncs[0].anchor_N, syncs[1].anchor_N)
    mean = (moves[0] + moves[1]) / 2
    torch.testing.assert_close(syncs[0].anchor_N, mean, rtol=1e-3, atol=1e-3)
    assert syncs[0].params_sha256() == syncs[1].params_sha256()


def test_the_transport_plugin_runs_a_round(plugins: None) -> None:
    """SoloTransport under OuterSync: with outer lr 1 and no momentum, the anchor becomes the
    island's own parameters (DiLoCo alone is plain training)."""
    numel = 20
    transport = load("solo_transport").SoloTransport(NoneCodec(), numel)
    param = torch.nn.Parameter(torch.zeros(numel))
    plain = SgdOuter(lr=1.0, momentum=0.0, nesterov=False)
    outer = OuterSync([param], transport, NoneCodec(), plain, OuterHyperparams(inner_steps=1))
    assert transport.join([3, 5], {}) == 5
    with torch.no_grad():
        param.add_(torch.arange(numel, dtype=torch.float32))
    result = outer.after_inner_step(tokens=10)
    assert result is not None and result.participants == 1 and result.bytes_sent == 0
    assert torch.equal(outer.anchor_N, torch.arange(numel, dtype=torch.float32))


def test_the_selector_plugin_trains_a_round(plugins: None) -> None:
    """KeepFirstHalf in front of the built-in GPT: a round of inner steps on its choices, its
    state saved and restored."""
    selector: Selector = load("keep_first_selector").KeepFirstHalf()
    tokens = torch.randint(0, 256, (20_000,)).numpy().astype("uint16")
    source = TokenWindows(
        tokens[:18_000],
        tokens[18_000:],
        batch_size=4,
        seq_len=16,
        island=0,
        num_islands=1,
        seed=0,
        vocab_size=256,
    )
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, vocab_size=256, context=16))
    trainer = InnerTrainer(model, InnerConfig(lr=1e-3, warmup_steps=1), 5, torch.device("cpu"))
    before = flatten_params(list(model.parameters()))
    for _ in range(5):
        parts = [source.next_batch() for _ in range(selector.super_batch_factor)]
        inputs = torch.cat([part.inputs for part in parts])
        batch = selector.select(Batch(inputs, sum(p.num_tokens for p in parts)), model)
        assert batch.inputs.shape[0] == 4
        trainer.train_step(batch.inputs)
    assert not torch.equal(before, flatten_params(list(model.parameters())))
    state = selector.state_dict()
    fresh: Selector = load("keep_first_selector").KeepFirstHalf()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state == {"steps": 5}
