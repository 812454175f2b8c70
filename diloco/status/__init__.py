"""See the run live: the status document, built from a run directory or handed to a
read-only HTTP server (JSON and a self-contained page), and printed as a terminal table."""

from diloco.status.bounds import SnapshotCache
from diloco.status.page import StatusPage, load_page
from diloco.status.run_dir import RunDescription, snapshot_from_run_dir
from diloco.status.server import StatusServer
from diloco.status.snapshot import (
    SNAPSHOT_VERSION,
    CoordinatorFigures,
    FragmentBytes,
    IslandState,
    IslandStatus,
    RankBytes,
    RoundRecord,
    RunUnreachable,
    StatusSnapshot,
    StatusUnavailable,
)
from diloco.status.table import format_status
from diloco.status.tracker import StatusTracker

__all__ = [
    "SNAPSHOT_VERSION",
    "CoordinatorFigures",
    "FragmentBytes",
    "IslandState",
    "IslandStatus",
    "RankBytes",
    "RoundRecord",
    "RunDescription",
    "RunUnreachable",
    "SnapshotCache",
    "StatusPage",
    "StatusServer",
    "StatusSnapshot",
    "StatusTracker",
    "StatusUnavailable",
    "format_status",
    "load_page",
    "snapshot_from_run_dir",
]
