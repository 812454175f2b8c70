"""The status snapshot as a terminal table (`diloco-island status`): plain text, no colors,
at most `WIDTH` columns.

Figures are the same as the page's (`page.html`); times are relative to the snapshot's
`generated_at`, so a table is the same whenever it is printed.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Sequence

from diloco.status.snapshot import IslandState, IslandStatus, RoundRecord, StatusSnapshot

WIDTH = 100
RECENT_ROUNDS = 5
_ISLAND_HEADER = (
    f"{'rank':>4} {'state':<12} {'round':>5} {'last seen':>14} {'sent':>8} {'received':>8} "
    f"{'train':>7} {'val':>7} {'tokens':>7} host"
)
_ROUND_HEADER = (
    f"{'round':>6} {'closed':>9} {'duration':>10} {'participants':>12} {'late':>5} "
    f"{'refused':>7} {'deadline':>10} {'train loss':>10} {'val loss':>9}"
)


def format_status(snapshot: StatusSnapshot) -> str:
    """The snapshot as lines of at most `WIDTH` characters."""
    lines = _header(snapshot)
    lines += ["", _ISLAND_HEADER]
    for island in snapshot.islands:
        lines += _island_lines(island, snapshot.generated_at)
    lines += _disagreement(snapshot)
    recent = snapshot.rounds[-RECENT_ROUNDS:]
    if recent:
        lines += ["", _ROUND_HEADER, *(_round_line(record) for record in reversed(recent))]
    # Strings in a snapshot may come from another site (a coordinator, a DHT record): no
    # control character of theirs reaches the terminal.
    printable = ("".join(c if c.isprintable() else "?" for c in line) for line in lines)
    return "\n".join(line[:WIDTH].rstrip() for line in printable)


def format_bytes(count: float | None) -> str:
    if count is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def format_count(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("", "k", "M", "G"):
        if abs(value) < 1000:
            return f"{value:.0f}" if unit == "" else f"{value:.3g}{unit}"
        value /= 1000
    return f"{value:.3g}T"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {round(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {round(seconds % 3600 / 60):02d} min"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _header(snapshot: StatusSnapshot) -> list[str]:
    state = "finished" if snapshot.finished else "running"
    sha = f"{snapshot.params_sha256[:16]}…" if snapshot.params_sha256 else "-"
    lines = [
        f"diloco run {snapshot.run_id!r} · {snapshot.transport} · round {snapshot.round} · "
        f"{state} · params_sha256 {sha}"
    ]
    counts: dict[str, int] = {}
    for island in snapshot.islands:
        counts[island.state.value] = counts.get(island.state.value, 0) + 1
    order = [state.value for state in IslandState]
    lines.append(
        "islands: " + ", ".join(f"{counts[name]} {name}" for name in order if name in counts)
    )
    figures = snapshot.coordinator
    if figures is not None:
        lines.append(
            f"coordinator: up {format_duration(figures.uptime_s)}, RSS "
            f"{format_bytes(figures.rss_bytes)}, refused calls {figures.refused_calls}, "
            f"late payloads {figures.late_payloads}, refused payloads {figures.refused_payloads}"
        )
    if snapshot.outer_settings:
        settings = ", ".join(f"{name}={value}" for name, value in snapshot.outer_settings.items())
        lines += textwrap.wrap(
            "settings: " + settings, WIDTH, subsequent_indent="  ", break_on_hyphens=False
        )
    return lines


def _island_lines(island: IslandStatus, now: float) -> list[str]:
    seen = "never" if island.last_seen is None else format_duration(now - island.last_seen)
    seen = seen if island.last_seen is None else f"{seen} ago"
    line = (
        f"{island.rank:>4} {island.state.value.replace('_', ' '):<12} {island.last_round:>5} "
        f"{seen:>14} {format_bytes(island.bytes_sent):>8} "
        f"{format_bytes(island.bytes_received):>8} {_loss(island.train_loss):>7} "
        f"{_loss(island.val_loss):>7} {format_count(island.tokens):>7} {island.host or '-'}"
    )
    lines = [line]
    for rank in island.per_rank:
        lines.append(
            f"{'':>6}rank {rank.rank}: sent {format_bytes(rank.bytes_sent)}, "
            f"received {format_bytes(rank.bytes_received)}"
        )
    for fragment in island.per_fragment:
        lines.append(
            f"{'':>6}fragment {fragment.fragment}: sent {format_bytes(fragment.bytes_sent)}, "
            f"received {format_bytes(fragment.bytes_received)}"
        )
    return lines


def _disagreement(snapshot: StatusSnapshot) -> list[str]:
    """A warning when islands that reported the group's round hold different parameters: the
    DESIGN invariant says they must be bit-identical."""
    at_head: Sequence[IslandStatus] = [
        island
        for island in snapshot.islands
        if island.last_round == snapshot.round and island.params_sha256
    ]
    hashes = sorted({island.params_sha256 or "" for island in at_head})
    if len(hashes) <= 1:
        return []
    lines = [f"WARNING: islands at round {snapshot.round} disagree on params_sha256:"]
    for sha in hashes:
        ranks = ", ".join(str(i.rank) for i in at_head if i.params_sha256 == sha)
        lines.append(f"  {sha[:16]}… islands {ranks}")
    return lines


def _round_line(record: RoundRecord) -> str:
    closed = time.strftime("%H:%M:%S", time.localtime(record.closed_at))
    return (
        f"{record.round:>6} {closed:>9} {format_duration(record.duration_s):>10} "
        f"{record.participants:>12} {record.late:>5} {record.refused:>7} "
        f"{format_duration(record.deadline_s):>10} {_loss(record.train_loss):>10} "
        f"{_loss(record.val_loss):>9}"
    )
