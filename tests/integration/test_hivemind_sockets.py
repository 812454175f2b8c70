"""The unix sockets of an island's hivemind processes: gone when it closes, and when it was
killed, gone at the next island's start (issue 12, item 17).

hivemind 1.1.12 leaves a `hivemind-p2pclient-*.sock` in /tmp after every clean exit, and all
of an island's sockets after a SIGKILL; the sockets seen here are those the island's processes
have bound (read from /proc), wherever they are.
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("hivemind")

from harness import spawn_children  # noqa: E402

NUMEL = 1000


def _island(identity_path: str) -> object:
    """A started island (DHT node, averager) of a one-island run."""
    from diloco.codecs import NoneCodec
    from diloco.outer.optimizers import SgdOuter
    from diloco.transports.hivemind import HivemindTransportConfig
    from diloco.transports.hivemind.transport import HivemindGroup, HivemindTransport

    settings = HivemindTransportConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_relay=False)
    group = HivemindGroup(
        run_id="sockets", num_islands=1, optimizer=SgdOuter(lr=1.0, momentum=0.0, nesterov=False)
    )
    transport = HivemindTransport(
        settings, group, NoneCodec(), numel=NUMEL, rank=0, identity_path=identity_path
    )
    transport.join([], {"model": "test"})
    return transport


def _fork_inside() -> None:
    mp.set_start_method("fork", force=True)  # hivemind's helper processes
    # A daemonic process may not start the DHT and averager processes (they exit with it).
    mp.current_process()._config["daemon"] = False  # type: ignore[attr-defined]


def bound_sockets(pid: int) -> set[str]:
    """Paths of the unix sockets bound by `pid` and its descendants (/proc/net/unix)."""
    paths_by_inode = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8:
            paths_by_inode[fields[6]] = fields[7]
    found, pids = set(), [pid]
    while pids:
        current = pids.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                pids += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
        for fd in Path(f"/proc/{current}/fd").glob("*"):
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in paths_by_inode:
                found.add(paths_by_inode[link[8:-1]])
    return {path for path in found if Path(path).name.startswith("hivemind-")}


def close_and_look(identity_path: str) -> tuple[list[str], str, list[str], bool]:
    _fork_inside()
    transport = _island(identity_path)
    time.sleep(1.0)  # the averager's p2p client connects in the background
    seen = sorted(bound_sockets(os.getpid()))
    socket_dir = str(transport.sockets.path)  # type: ignore[attr-defined]
    transport.close()  # type: ignore[attr-defined]
    left = [path for path in seen if os.path.exists(path)]
    return seen, socket_dir, left, os.path.exists(socket_dir)


def live_until_killed(identity_path: str, report: str) -> None:
    _fork_inside()
    transport = _island(identity_path)
    time.sleep(1.0)
    seen = sorted(bound_sockets(os.getpid()))
    socket_dir = str(transport.sockets.path)  # type: ignore[attr-defined]
    Path(report + ".partial").write_text("\n".join([socket_dir, *seen]))
    os.rename(report + ".partial", report)
    time.sleep(600)


def start_and_close(identity_path: str) -> None:
    _fork_inside()
    _island(identity_path).close()  # type: ignore[attr-defined]


@pytest.mark.timeout(120)
def test_a_closed_island_leaves_no_socket_behind(tmp_path: Path) -> None:
    [(seen, socket_dir, left, dir_left)] = spawn_children(
        close_and_look, [(str(tmp_path / "peer.key"),)], timeout_s=100
    )
    names = [Path(path).name for path in seen]
    assert any(n.startswith("hivemind-p2pd-") for n in names), seen
    assert any(n.startswith("hivemind-p2pclient-") for n in names), seen
    assert all(Path(path).parent == Path(socket_dir) for path in seen), (seen, socket_dir)
    assert left == [], f"sockets left after close: {left}"
    assert not dir_left


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_killed_islands_sockets_are_removed_when_the_next_one_starts(tmp_path: Path) -> None:
    report = tmp_path / "victim.txt"
    victim = mp.get_context("spawn").Process(
        target=live_until_killed, args=(str(tmp_path / "victim.key"), str(report))
    )
    victim.start()
    try:
        deadline = time.monotonic() + 90
        while not report.exists():
            assert victim.is_alive() and time.monotonic() < deadline, "the victim never started"
            time.sleep(0.1)
        socket_dir, *seen = report.read_text().splitlines()
        assert seen, "the victim bound no hivemind socket"
        victim.kill()
        victim.join(timeout=10)
    finally:
        if victim.is_alive():
            victim.kill()
    # Its helper processes notice within half a second and exit: the lock is free then.
    wait_until_unlocked(Path(socket_dir) / "lock", timeout_s=20)
    # p2pd removes its own socket on SIGTERM; the Python side's stay (killed, they cleaned none).
    stale = [path for path in seen if os.path.exists(path)]
    assert stale, f"nothing was left of {seen}: this test shows nothing"

    spawn_children(start_and_close, [(str(tmp_path / "next.key"),)], timeout_s=100)
    assert not os.path.exists(socket_dir), "the killed island's sockets were not removed"
    assert not any(os.path.exists(path) for path in seen)


def wait_until_unlocked(lock: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            assert time.monotonic() < deadline, "the killed island's helpers still hold its lock"
        finally:
            os.close(fd)  # never keep it: the next island must find it free
        time.sleep(0.1)
