"""loss.png from metrics rows, and wandb logging of the same rows (offline: no network)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from diloco.errors import ConfigError
from diloco.metrics import plots
from diloco.metrics.plots import write_loss_plot
from diloco.metrics.wandb_config import WandbConfig, WandbMode
from diloco.metrics.wandb_log import RUN_ID_FILE, WandbLogger

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rows(count: int = 12) -> list[dict[str, Any]]:
    """metrics.jsonl-like rows; validation every other round, as eval.every 2 writes them."""
    return [
        {
            "round": r,
            "inner_step": 50 * r,
            "tokens": 51_200 * r,
            "train_loss": 3.0 / (1 + 0.3 * r),
            "val_loss": 3.1 / (1 + 0.3 * r) if r % 2 == 0 else None,
            "bytes_sent": 3_400_000 * r,
            "bytes_received": 3_400_000 * r,
            "sync_s": 0.01,
            "compute_s": 1.5,
            "islands": 4,
            "params_sha256": "ab" * 32,
        }
        for r in range(1, count + 1)
    ]


def test_loss_png_is_a_real_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason='needs the plots extra: pip install -e ".[plots]"')
    from matplotlib.image import imread

    path = tmp_path / "loss.png"
    assert write_loss_plot(rows(), path) is True
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    pixels = imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 2 * pixels.shape[0] - 100
    assert pixels[..., :3].std() > 0.05  # lines and text, not a blank canvas
    assert not list(tmp_path.glob(".*.tmp"))


def test_nothing_is_written_without_rows_or_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert write_loss_plot([], tmp_path / "loss.png") is False
    monkeypatch.setattr(plots, "plots_available", lambda: False)
    assert write_loss_plot(rows(), tmp_path / "loss.png") is False
    assert not (tmp_path / "loss.png").exists()


def test_points_skip_missing_and_non_finite_values() -> None:
    table = [{"tokens": 1, "val_loss": None}, {"tokens": 2, "val_loss": float("nan")}]
    table += [{"tokens": 3, "val_loss": 2.5}, {"val_loss": 1.0}]
    assert plots._points(table, "tokens", "val_loss") == [(3.0, 2.5)]


def test_wandb_offline_writes_its_run_under_run_dir(tmp_path: Path) -> None:
    wandb = pytest.importorskip("wandb", reason='needs the wandb extra: pip install -e ".[wandb]"')
    config = WandbConfig(project="diloco-test", mode=WandbMode.offline)
    logger = WandbLogger.open(config, tmp_path, {"outer": {"inner_steps": 50}})
    assert logger is not None
    for row in rows(3):
        logger.log(row)
    logger.close()
    # wandb's service process writes the file; its buffer may still be open after finish()
    # (seen once on a loaded machine). teardown waits for it, as wandb does at process exit.
    wandb.teardown()
    run_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    data = run_files[0].read_bytes()
    assert b"val_loss" in data and b"bytes_sent" in data and b"train_loss" in data
    assert b"params_sha256" not in data  # text fields stay in metrics.jsonl
    run_id = (tmp_path / RUN_ID_FILE).read_text().strip()
    assert run_id in run_files[0].name


def test_a_resumed_run_keeps_its_wandb_id(tmp_path: Path) -> None:
    pytest.importorskip("wandb", reason='needs the wandb extra: pip install -e ".[wandb]"')
    config = WandbConfig(project="diloco-test", mode=WandbMode.offline)
    for _ in range(2):
        logger = WandbLogger.open(config, tmp_path, {})
        assert logger is not None
        logger.log(rows(1)[0])
        logger.close()
    run_id = (tmp_path / RUN_ID_FILE).read_text().strip()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{run_id}" in run.name for run in runs)


def test_wandb_off_needs_no_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import now raises ImportError
    assert WandbLogger.open(WandbConfig(), tmp_path, {}) is None
    disabled = WandbConfig(project="p", mode=WandbMode.disabled)
    assert WandbLogger.open(disabled, tmp_path, {}) is None
    with pytest.raises(ConfigError) as caught:
        WandbLogger.open(WandbConfig(project="p"), tmp_path, {})
    assert str(caught.value).startswith("run.wandb.project needs the wandb package")
    assert 'pip install -e ".[wandb]"' in str(caught.value)


def test_wandb_section_checks() -> None:
    with pytest.raises(ConfigError, match=r"^run.wandb.project must be a project name"):
        WandbConfig(project="team/project")
    assert WandbConfig(name="x", mode=WandbMode.offline).ignored_options() == {
        "run.wandb.name": "read only with run.wandb.project set",
        "run.wandb.mode": "read only with run.wandb.project set",
    }
    assert WandbConfig(project="p", name="x").ignored_options() == {}
