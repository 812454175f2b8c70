"""The status page in a real browser: headless Chromium loads `/` from the status server, runs
its script against `/status.json`, and the rendered DOM and a screenshot are checked.

Chromium comes from /usr/bin/chromium or, as root, Debian's `chromium` package installed once
per session (tests/browser.py); without either, these tests skip and say why. The page
during a real grpc run, and the docs screenshot, are in tests/e2e/test_status_run.py.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from browser import chromium_or_skip, dump_dom, parse, screenshot
from status_fixtures import TOKENS_PER_ROUND, scripted_snapshot, train_loss

from diloco.status import StatusServer, StatusSnapshot

TOKEN = "browser-test-token-0123456789abcdef"

# The first test may install Chromium with apt-get (about a minute here, more on a slow mirror).
pytestmark = pytest.mark.timeout(900)


def test_page_renders_islands_and_plot_points() -> None:
    chromium = chromium_or_skip()
    snapshot = scripted_snapshot(2, 5)
    with StatusServer("127.0.0.1:0", lambda: snapshot) as server:
        dom = parse(dump_dom(server.url, wait_ms=3000, chromium=chromium))

    rows = dom.find("tr", **{"class": "island"})
    assert [row["data-rank"] for row in rows] == ["0", "1"]
    assert rows[0]["class"].split() == ["island", "state-active"]
    assert dom.text_by_id["run-id"] == "demo-sites"
    assert dom.text_by_id["fig-round"] == "5"
    (error,) = [attributes for _, attributes, _ in dom.elements if attributes.get("id") == "error"]
    assert "hidden" in error  # no error shown

    train = dom.find("circle", svg="plot-loss", **{"class": "series-train"})
    val = dom.find("circle", svg="plot-loss", **{"class": "series-val"})
    # One point per round with a figure: train every round, val at rounds 2 and 4.
    assert [float(p["data-x"]) for p in train] == [2 * TOKENS_PER_ROUND * r for r in range(1, 6)]
    assert [float(p["data-y"]) for p in train] == [train_loss(r) for r in range(1, 6)]
    assert [float(p["data-x"]) for p in val] == [2 * TOKENS_PER_ROUND * r for r in (2, 4)]
    lines = dom.find("polyline", svg="plot-loss", **{"class": "series-train"})
    assert len(lines) == 1 and len(lines[0]["points"].split()) == 5

    durations = dom.find("circle", svg="plot-rounds", **{"class": "series-duration"})
    assert [int(float(p["data-x"])) for p in durations] == [1, 2, 3, 4, 5]
    assert [float(p["data-y"]) for p in durations] == [r.duration_s for r in snapshot.rounds]
    recent = [row["data-round"] for row in dom.find("tr") if "data-round" in row]
    assert recent == ["5", "4", "3", "2", "1"]


def test_page_refreshes_itself() -> None:
    chromium = chromium_or_skip()
    served: list[int] = []

    def growing() -> StatusSnapshot:
        # Each build is one round further on.
        served.append(len(served) + 1)
        return scripted_snapshot(2, served[-1])

    # No cache: each of the page's fetches gets a new build. 7 s of virtual time is the
    # first load and two refreshes (every 3 s).
    with StatusServer("127.0.0.1:0", growing, cache_s=0.0) as server:
        dom = parse(dump_dom(server.url, wait_ms=7000, chromium=chromium))
    shown = int(dom.text_by_id["fig-round"])
    # The first load shows round 1; a later one shows what a refresh fetched (the dump may
    # come while the very last fetch is in flight).
    assert len(served) >= 3 and 2 <= shown <= served[-1]
    durations = dom.find("circle", svg="plot-rounds", **{"class": "series-duration"})
    assert len(durations) == shown


def test_page_sends_the_token_from_the_url_fragment() -> None:
    chromium = chromium_or_skip()
    snapshot = scripted_snapshot(2, 5)
    # Bound to every interface, so the token is required; Chromium connects over 127.0.0.1.
    with StatusServer("0.0.0.0:0", lambda: snapshot, token=TOKEN) as server:
        base = f"http://127.0.0.1:{server.port}/"
        without = parse(dump_dom(base, wait_ms=2000, chromium=chromium))
        with_token = parse(dump_dom(f"{base}#token={TOKEN}", wait_ms=2000, chromium=chromium))

    assert not without.find("tr", **{"class": "island"})
    assert "needs the run token" in without.text_by_id["error"]
    assert TOKEN not in without.text_by_id["error"]
    assert [row["data-rank"] for row in with_token.find("tr", **{"class": "island"})] == ["0", "1"]


def test_screenshot_is_a_real_png(tmp_path: Path) -> None:
    chromium = chromium_or_skip()
    snapshot = scripted_snapshot(4, 30, late=(2,), ranks_per_island=2)
    size = (1160, 840)
    path = tmp_path / "status-page.png"
    with StatusServer("127.0.0.1:0", lambda: snapshot) as server:
        screenshot(server.url, path, size, wait_ms=3000, chromium=chromium)

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == size
    # A blank page compresses to a few kB; a rendered table and plots take tens.
    assert 20_000 < len(data) < 2_000_000
