"""The island's socket directory: removed on close; stale ones removed at the next start."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

pytest.importorskip("hivemind")

from diloco.transports.hivemind.sockets import (  # noqa: E402
    SOCKET_DIR_PREFIX,
    SocketDir,
    remove_stale_socket_dirs,
)


def test_the_directory_lives_as_long_as_the_island(tmp_path: Path) -> None:
    sockets = SocketDir(str(tmp_path))
    assert sockets.path.parent == tmp_path and sockets.path.name.startswith(SOCKET_DIR_PREFIX)
    assert sockets.p2p_prefix == f"/unix{sockets.path}/hivemind-"
    (sockets.path / "hivemind-p2pclient-x.sock").touch()
    assert remove_stale_socket_dirs(tmp_path) == []  # locked: its island is alive
    sockets.close()
    sockets.close()
    assert list(tmp_path.iterdir()) == []


def test_only_dead_islands_directories_are_removed(tmp_path: Path) -> None:
    alive = SocketDir(str(tmp_path))
    dead = tmp_path / f"{SOCKET_DIR_PREFIX}dead0000"
    dead.mkdir()
    (dead / "lock").touch()  # nobody holds it: its island was killed
    (dead / "hivemind-p2pd-x.sock").touch()
    no_lock = tmp_path / f"{SOCKET_DIR_PREFIX}nolock00"  # not made by SocketDir
    no_lock.mkdir()
    a_file = tmp_path / f"{SOCKET_DIR_PREFIX}file"
    a_file.touch()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "lock").touch()
    link = tmp_path / f"{SOCKET_DIR_PREFIX}link"
    link.symlink_to(elsewhere)
    others = tmp_path / "hivemind-p2pclient-y.sock"  # hivemind's own names: not ours to judge
    others.touch()

    assert remove_stale_socket_dirs(tmp_path) == [dead]
    assert not dead.exists()
    for kept in (alive.path, no_lock, a_file, elsewhere / "lock", link, others):
        assert kept.exists() or kept.is_symlink(), kept
    alive.close()


def test_a_lock_held_by_another_holder_keeps_the_directory(tmp_path: Path) -> None:
    held = tmp_path / f"{SOCKET_DIR_PREFIX}held0000"
    held.mkdir()
    fd = os.open(held / "lock", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a live island's helper process holds it
        assert remove_stale_socket_dirs(tmp_path) == []
        assert held.exists()
    finally:
        os.close(fd)
    assert remove_stale_socket_dirs(tmp_path) == [held]


def test_a_new_directory_sweeps_the_stale_ones_first(tmp_path: Path) -> None:
    stale = tmp_path / f"{SOCKET_DIR_PREFIX}stale000"
    stale.mkdir()
    (stale / "lock").touch()
    sockets = SocketDir(str(tmp_path))
    assert not stale.exists()
    sockets.close()
