"""Headless Chromium for tests: find it (or install Debian's package once), dump a page's DOM,
take a screenshot; read a dumped DOM (`parse`), and write a screenshot into the docs.

Only Chromium's own command-line flags are used (`--headless --dump-dom`, `--screenshot=`,
`--virtual-time-budget=`): no selenium, no webdriver, no npm. `--virtual-time-budget` lets
the page's scripts and fetches run for that many virtual milliseconds before the DOM is
dumped, so a page that renders from `fetch()` is complete in the dump.

The background-networking flags matter here: without them Chromium opens connections to
Google's services at start, which this machine's closed network refuses, and it then waits
on them. Run as root, Chromium needs `--no-sandbox`.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

logger = logging.getLogger(__name__)

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
INSTALL_TIMEOUT_S = 600.0
RUN_TIMEOUT_S = 60.0

_FLAGS = (
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)


@dataclass(frozen=True)
class ChromiumLookup:
    path: str | None
    reason: str
    """Why there is none (empty when `path` is set)."""


def find_or_install_chromium() -> str | None:
    """Chromium's path: /usr/bin/chromium when present, else Debian's `chromium` package
    installed with apt-get when running as root (once per test session); None otherwise
    (`chromium_unavailable_reason()` says why)."""
    return _lookup().path


def chromium_unavailable_reason() -> str:
    return _lookup().reason


def chromium_or_skip() -> str:
    """Chromium's path, or skip the calling test with the reason there is none."""
    lookup = _lookup()
    if lookup.path is None:
        pytest.skip(f"headless Chromium unavailable: {lookup.reason}")
    return lookup.path


@functools.cache
def _lookup() -> ChromiumLookup:
    # Cached: the install runs at most once per test session, whatever its outcome.
    for path in CHROMIUM_PATHS:
        if os.access(path, os.X_OK):
            return ChromiumLookup(path, "")
    if shutil.which("apt-get") is None:
        return ChromiumLookup(None, "no /usr/bin/chromium and no apt-get to install it")
    if os.geteuid() != 0:
        return ChromiumLookup(None, "no /usr/bin/chromium, and installing it needs root")
    reason = _apt_install("chromium")
    if reason:
        return ChromiumLookup(None, reason)
    for path in CHROMIUM_PATHS:
        if os.access(path, os.X_OK):
            return ChromiumLookup(path, "")
    return ChromiumLookup(None, "apt-get installed chromium but /usr/bin/chromium is missing")


def _apt_install(package: str) -> str:
    """Install `package` with apt-get; return "" on success, else why it failed."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    commands = [["apt-get", "install", "-y", "--no-install-recommends", package]]
    if not _apt_knows(package):
        # A fresh container has no package lists; fetch them first.
        commands.insert(0, ["apt-get", "update"])
    for command in commands:
        logger.warning("installing Chromium for the browser tests: %s", " ".join(command))
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            return f"`{' '.join(command)}` took over {INSTALL_TIMEOUT_S:.0f} s"
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return f"`{' '.join(command)}` failed ({done.returncode}): {tail}"
    return ""


def _apt_knows(package: str) -> bool:
    done = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, timeout=60
    )
    return "Candidate:" in done.stdout and "Candidate: (none)" not in done.stdout


def _run_chromium(chromium: str, extra: list[str], url: str, timeout_s: float) -> str:
    """Run headless Chromium with a fresh profile; return its stdout. Raises AssertionError
    with Chromium's stderr when it fails or times out."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [chromium, *_FLAGS, f"--user-data-dir={profile}", *extra, url]
        if os.geteuid() == 0:
            command.insert(1, "--no-sandbox")
        # HOME in the profile: Chromium writes caches and crash reports under it.
        env = {**os.environ, "HOME": profile}
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired as error:
            raise AssertionError(
                f"chromium ran over {timeout_s} s on {url}; stderr:\n{error.stderr!r}"
            ) from None
    if done.returncode != 0:
        raise AssertionError(f"chromium exited {done.returncode} on {url}; stderr:\n{done.stderr}")
    return done.stdout


def dump_dom(url: str, wait_ms: int = 3000, *, chromium: str | None = None) -> str:
    """The DOM of `url` (serialised HTML) after `wait_ms` of virtual time for its scripts."""
    chromium = chromium or chromium_or_skip()
    extra = [f"--virtual-time-budget={wait_ms}", "--dump-dom"]
    return _run_chromium(chromium, extra, url, RUN_TIMEOUT_S)


def screenshot(
    url: str,
    path: Path,
    size: tuple[int, int] = (1200, 800),
    *,
    wait_ms: int = 3000,
    chromium: str | None = None,
) -> Path:
    """A PNG screenshot of `url` at `size` (width, height) pixels, written to `path`."""
    chromium = chromium or chromium_or_skip()
    width, height = size
    extra = [
        f"--window-size={width},{height}",
        f"--virtual-time-budget={wait_ms}",
        f"--screenshot={path}",
    ]
    _run_chromium(chromium, extra, url, RUN_TIMEOUT_S)
    if not path.is_file():
        raise AssertionError(f"chromium wrote no screenshot at {path}")
    return path


class ElementCollector(HTMLParser):
    """Every start tag of a dumped DOM, with its attributes and the id of the <svg> and the
    text of the element it is in."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], str | None]] = []
        self.text_by_id: dict[str, str] = {}
        self._svg: str | None = None
        self._open_id: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "svg":
            self._svg = attributes.get("id")
        self.elements.append((tag, attributes, self._svg))
        if tag not in ("circle", "line", "polyline", "meta", "br"):
            self._open_id.append(attributes.get("id"))

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._svg = None
        if tag not in ("circle", "line", "polyline", "meta", "br") and self._open_id:
            self._open_id.pop()

    def handle_data(self, data: str) -> None:
        if self._open_id and self._open_id[-1]:
            key = self._open_id[-1]
            self.text_by_id[key] = self.text_by_id.get(key, "") + data

    def find(self, tag: str, svg: str | None = None, **wanted: str) -> list[dict[str, str]]:
        return [
            attributes
            for name, attributes, inside in self.elements
            if name == tag
            and (svg is None or inside == svg)
            and all(
                wanted_value in attributes.get(key.replace("_", "-"), "").split()
                for key, wanted_value in wanted.items()
            )
        ]


def parse(dom: str) -> ElementCollector:
    collector = ElementCollector()
    collector.feed(dom)
    return collector


def write_docs_png(source: Path, target: Path) -> None:
    """Copy the screenshot into the docs, reduced to a 256-colour palette when Pillow is there
    (a page of flat colours keeps its look at a quarter of the bytes)."""
    try:
        from PIL import Image
    except ImportError:
        shutil.copyfile(source, target)
        return
    with Image.open(source) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
        palette.save(target, optimize=True)
