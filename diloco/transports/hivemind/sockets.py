"""A private directory for an island's p2pd control sockets, removed when the island leaves.

hivemind puts the unix sockets between its processes and p2pd in /tmp, named at random
(`hivemind-p2pd-*.sock`, `hivemind-p2pclient-*.sock`), and leaves some behind even after a
clean shutdown (a `p2pclient` socket per island, measured with hivemind 1.1.12) and all of
them after a SIGKILL. Here each island's helper processes put them in a directory of its own,
`<tmp>/diloco-hivemind-XXXXXXXX/`: the island removes it when it closes, and the next island
that starts on the machine removes those whose island is dead.

Whose island is dead: the directory's `lock` file is held with flock(2) by the island and its
forked helpers for as long as any of them lives (the kernel drops the lock when the last one
exits, SIGKILL included), so a lock that can be taken marks a stale directory; pid files would
be fooled by pid reuse. A directory gets its public name only once its lock is held, so a
sweep never sees one that is still being set up.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOCKET_DIR_PREFIX = "diloco-hivemind-"
_SETUP_PREFIX = ".diloco-hivemind-setup-"
_LOCK_NAME = "lock"
# sun_path holds 107 bytes; hivemind adds "/hivemind-p2pclient-<11 chars>.sock" (36).
_MAX_DIR_CHARS = 107 - 36


class SocketDir:
    """This island's socket directory, locked while the island lives.

    Args:
        base: where to create it; None: the temp directory (or /tmp, if the temp directory's
            path is too long for unix socket names). Stale directories there are removed first.
    """

    def __init__(self, base: str | None = None):
        root = Path(base if base is not None else _default_base())
        remove_stale_socket_dirs(root)
        setup = Path(tempfile.mkdtemp(prefix=_SETUP_PREFIX, dir=root))
        self._lock_fd = os.open(setup / _LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.path = root / (SOCKET_DIR_PREFIX + setup.name.removeprefix(_SETUP_PREFIX))
        os.rename(setup, self.path)
        self._closed = False

    @property
    def p2p_prefix(self) -> str:
        """What hivemind's `P2P._UNIX_SOCKET_PREFIX` becomes in the island's helper processes."""
        return f"/unix{self.path}/hivemind-"

    def close(self) -> None:
        """Remove the directory and release its lock; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)


def remove_stale_socket_dirs(base: Path) -> list[Path]:
    """Remove the socket directories in `base` whose island is dead; return them.

    Only directories named `diloco-hivemind-*`, owned by this user, not symlinks, holding a
    `lock` file nobody holds: nothing else in `base` is touched.
    """
    removed = []
    for path in sorted(base.glob(SOCKET_DIR_PREFIX + "*")):
        try:
            info = path.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        if _remove_if_unlocked(path):
            removed.append(path)
    if removed:
        log.info("hivemind: removed %d socket directories of dead islands", len(removed))
    return removed


def _remove_if_unlocked(path: Path) -> bool:
    try:
        fd = os.open(path / _LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return False  # no lock file: not a directory this module made
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its island (or one of its helpers) is alive
        # Holding the lock: no island can own this directory any more.
        shutil.rmtree(path, ignore_errors=True)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _default_base() -> str:
    base = tempfile.gettempdir()
    if len(base) + len("/" + SOCKET_DIR_PREFIX + "XXXXXXXX") > _MAX_DIR_CHARS:
        return "/tmp"
    return base
