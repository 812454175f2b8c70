"""See the run live (issue 17) with real processes: a standalone grpc coordinator serving its
status page on a free loopback port, two `diloco-island` processes, the page's JSON read during
the run and checked against the islands' own metrics.jsonl, and `diloco-island status` as
users run it (during the run, after it, with a wrong token, with nothing listening, and for a
local run); and the page in headless Chromium during a run (tests/browser.py: skipped, saying
why, where Chromium cannot be had). DILOCO_WRITE_SCREENSHOT=1 rewrites
docs/images/status-page.png from that run's screenshot (as torchft's WRITE_FIXTURE does).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from browser import chromium_or_skip, dump_dom, parse, screenshot, write_docs_png
from harness import (
    TINY,
    CliResult,
    assert_ok,
    cli_command,
    finish,
    free_port,
    metrics_rows,
    run_cli,
    start_cli,
)

from diloco.status import StatusSnapshot

TOKEN = "e2e-status-token-0123456789abcdef"
ROUNDS = 30
DOCS_IMAGE = Path(__file__).resolve().parents[2] / "docs" / "images" / "status-page.png"


@pytest.fixture(autouse=True)
def run_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DILOCO_TOKEN", TOKEN)


class GrpcRun:
    """The command lines of a standalone coordinator, two islands, and `status`."""

    def __init__(self, tmp_path: Path, *extra: str):
        self.run_dir = tmp_path / "run"
        self.config = tmp_path / "island.yaml"
        self.config.write_text(f"run:\n  dir: {self.run_dir}\n")
        self.address = f"127.0.0.1:{free_port()}"
        self.common = [
            *TINY,
            "transport.kind=grpc",
            "transport.islands=2",
            f"transport.grpc.address={self.address}",
            "transport.grpc.insecure=true",
            "transport.grpc.status_listen=127.0.0.1:0",
            "transport.grpc.deadline_floor_s=20",
            "transport.grpc.retry_s=60",
            "transport.grpc.linger_s=3",
            f"outer.rounds={ROUNDS}",
            "outer.inner_steps=20",
            *extra,
        ]

    def start(self) -> list[subprocess.Popen[str]]:
        coordinator = start_cli(self._args("transport.grpc.role=coordinator"))
        return [coordinator, *(start_cli(self._args(f"transport.rank={r}")) for r in (0, 1))]

    def status(self, *extra: str, env: dict[str, str] | None = None) -> CliResult:
        args = ["status", *self._args(*extra)]
        if env is None:
            return run_cli(args, timeout_s=60)
        done = subprocess.run(
            [*cli_command(), *args], capture_output=True, text=True, timeout=60, env=env
        )
        return CliResult(done.returncode, done.stdout, done.stderr)

    def rows(self, rank: int) -> list[dict[str, Any]]:
        return metrics_rows(self.run_dir / f"island-{rank}")

    def page_port(self, timeout_s: float) -> int:
        path = self.run_dir / "coordinator" / "status-address"
        deadline = time.monotonic() + timeout_s
        while not path.is_file():
            assert time.monotonic() < deadline, f"no {path} after {timeout_s} s"
            time.sleep(0.2)
        return int(path.read_text().strip().rpartition(":")[2])

    def _args(self, *extra: str) -> list[str]:
        return ["--config", str(self.config), *self.common, *extra]


def get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def read_while_running(run: GrpcRun, port: int, timeout_s: float) -> list[StatusSnapshot]:
    """Every /status.json the page served from the first round until it stopped."""
    snapshots: list[StatusSnapshot] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status, body = get(port, "/status.json")
        except OSError:
            break  # the coordinator stopped: the run is over
        if status == 200:
            snapshots.append(StatusSnapshot.from_json(body))
            if snapshots[-1].finished:
                break
        time.sleep(0.5)
    return snapshots


def check_against_metrics(
    snapshot: StatusSnapshot, rows: dict[int, dict[int, dict[str, Any]]]
) -> None:
    """Every figure of `snapshot` that an island also wrote agrees with its metrics.jsonl."""
    for record in snapshot.rounds:
        written = [rows[rank][record.round] for rank in (0, 1)]
        assert record.params_sha256 == written[0]["params_sha256"] == written[1]["params_sha256"]
        assert record.participants == written[0]["islands"] == 2
        if record.tokens is not None:  # the round's rows have come with the next payloads
            assert record.tokens == sum(row["tokens"] for row in written)
            assert record.train_loss == pytest.approx(
                sum(row["train_loss"] for row in written) / 2, abs=1e-9
            )
    payload_bytes = rows[0][1]["bytes_sent"]
    answer_bytes = rows[0][1]["bytes_received"]
    for island in snapshot.islands:
        if island.tokens is None:
            continue
        # The row this island sent last: the one with its tokens (one per round).
        (row,) = [r for r in rows[island.rank].values() if r["tokens"] == island.tokens]
        assert island.train_loss == row["train_loss"]
        assert island.params_sha256 == row["params_sha256"]
        # It came with the next payload, which the coordinator counts as it reads it; that
        # payload's answer may be on its way out.
        assert island.bytes_sent == row["bytes_sent"] + payload_bytes
        assert island.bytes_received - row["bytes_received"] in (0, answer_bytes)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_status_during_and_after_a_grpc_run(tmp_path: Path) -> None:
    run = GrpcRun(tmp_path)
    processes = run.start()
    try:
        port = run.page_port(timeout_s=120)
        status, page = get(port, "/")
        assert status == 200 and b"<table" in page
        # Offline: nothing on the page is loaded from anywhere else.
        assert not re.search(rb"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", page)

        deadline = time.monotonic() + 180
        while len(run.rows(1)) < 3:  # the islands have started their rounds
            assert time.monotonic() < deadline, "no island reached round 3"
            assert all(p.poll() is None for p in processes), "a process ended early"
            time.sleep(0.2)
        during = run.status()
        wrong = run.status(env={**os.environ, "DILOCO_TOKEN": "not-the-run-token-0123456789"})
        snapshots = read_while_running(run, port, timeout_s=240)
    finally:
        results = [finish(process, 240) for process in processes]
    assert_ok(*results)

    assert during.returncode == 0, during.describe()
    assert re.search(r"diloco run 'diloco' · grpc · round \d+ · running", during.stdout)
    assert len([line for line in during.stdout.splitlines() if " active " in line]) == 2
    assert wrong.returncode == 1 and wrong.stdout == ""
    assert wrong.stderr.strip().splitlines() == [
        f"diloco-island: status: the coordinator at {run.address} refused the run token "
        "($DILOCO_TOKEN or transport.grpc.token_file)"
    ]

    rows = {rank: {row["round"]: row for row in run.rows(rank)} for rank in (0, 1)}
    assert sorted(rows[0]) == list(range(1, ROUNDS + 1))
    live = [s for s in snapshots if 0 < s.round < ROUNDS]
    assert len(live) >= 2, f"{len(snapshots)} snapshots, none during the rounds"
    assert [s.round for s in snapshots] == sorted(s.round for s in snapshots)
    for snapshot in snapshots:
        check_against_metrics(snapshot, rows)
        head = rows[0][snapshot.round]["params_sha256"] if snapshot.round else None
        assert snapshot.params_sha256 == head
    assert any(i.tokens is not None for s in live for i in s.islands)

    # After the run: the coordinator is gone; the table comes from run.dir.
    after = run.status()
    assert after.returncode == 0, after.describe()
    assert f"diloco run 'diloco' · grpc · round {ROUNDS} · finished" in after.stdout
    assert rows[0][ROUNDS]["params_sha256"][:16] in after.stdout
    summary = json.loads((run.run_dir / "coordinator" / "summary.json").read_text())
    assert summary["participants_per_round"] == [2] * ROUNDS
    assert not (run.run_dir / "coordinator" / "status-address").exists()


@pytest.mark.timeout(120)
def test_status_of_a_grpc_run_nobody_serves_is_one_line(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "island.yaml"
    config.write_text(f"run:\n  dir: {tmp_path / 'run'}\n")
    result = run_cli(
        ["status", "--config", str(config), "transport.kind=grpc", "transport.rank=0",
         f"transport.grpc.address={address}", "transport.grpc.insecure=true"],
        timeout_s=60,
    )  # fmt: skip
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"diloco-island: status: the coordinator at {address} is unreachable")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_status_of_a_local_run_prints_its_table(tmp_path: Path) -> None:
    config = tmp_path / "island.yaml"
    config.write_text(f"run:\n  dir: {tmp_path / 'run'}\n")
    args = ["--config", str(config), *TINY, "transport.islands=2", "outer.rounds=3",
            "outer.inner_steps=2"]  # fmt: skip
    assert_ok(run_cli(args, timeout_s=120))
    result = run_cli(["status", *args], timeout_s=60)
    assert result.returncode == 0, result.describe()
    rows = metrics_rows(tmp_path / "run")
    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"diloco run 'diloco' · local · round 3 · finished · params_sha256 "
        f"{rows[-1]['params_sha256'][:16]}…"
    )
    assert lines[1] == "islands: 2 left"
    assert len([line for line in lines if re.match(r"\s+[01] left\s+3 ", line)]) == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_page_in_chromium_during_a_grpc_run(tmp_path: Path) -> None:
    chromium = chromium_or_skip()
    run = GrpcRun(tmp_path, "eval.every=3")
    processes = run.start()
    try:
        port = run.page_port(timeout_s=120)
        deadline = time.monotonic() + 240
        while len(run.rows(1)) < ROUNDS // 2:
            assert time.monotonic() < deadline, "the islands did not reach half the run"
            assert all(p.poll() is None for p in processes), "a process ended early"
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/"
        dom = parse(dump_dom(url, wait_ms=3000, chromium=chromium))
        path = screenshot(url, tmp_path / "status-page.png", (1160, 840), chromium=chromium)
    finally:
        results = [finish(process, 300) for process in processes]
    assert_ok(*results)

    rows = dom.find("tr", **{"class": "island"})
    assert [row["data-rank"] for row in rows] == ["0", "1"]
    assert all("state-active" in row["class"].split() for row in rows)
    (error,) = dom.find("p", id="error")
    assert "hidden" in error  # no error shown
    shown = int(dom.text_by_id["fig-round"])
    assert ROUNDS // 2 <= shown < ROUNDS
    durations = dom.find("circle", svg="plot-rounds", **{"class": "series-duration"})
    assert [int(float(p["data-x"])) for p in durations] == list(range(1, shown + 1))
    # Loss against tokens: one point per round whose rows have arrived (all but the last).
    train = dom.find("circle", svg="plot-loss", **{"class": "series-train"})
    tokens = [float(p["data-x"]) for p in train]
    assert len(train) >= shown - 1 and tokens == sorted(tokens) and tokens[0] > 0
    written = {row["round"]: row for row in run.rows(0)}
    assert float(train[0]["data-x"]) == 2 * written[1]["tokens"]

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    if os.environ.get("DILOCO_WRITE_SCREENSHOT") == "1":
        write_docs_png(path, DOCS_IMAGE)
        assert DOCS_IMAGE.stat().st_size < 150_000
