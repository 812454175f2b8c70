"""Scripted status snapshots for the status tests and the docs screenshot: plausible runs with
known figures, built without a coordinator."""

from __future__ import annotations

import hashlib
import math

from diloco.status import (
    CoordinatorFigures,
    FragmentBytes,
    IslandState,
    IslandStatus,
    RankBytes,
    RoundRecord,
    StatusSnapshot,
)

NOW = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC: fixed, so tables and pages are reproducible
PAYLOAD_BYTES = 1_600_020
TOKENS_PER_ROUND = 51_200


def sha(round_index: int) -> str:
    return hashlib.sha256(f"round-{round_index}".encode()).hexdigest()


def scripted_snapshot(
    num_islands: int = 2,
    num_rounds: int = 5,
    *,
    late: tuple[int, ...] = (),
    never_joined: tuple[int, ...] = (),
    ranks_per_island: int = 1,
    fragments: int = 0,
    transport: str = "grpc",
) -> StatusSnapshot:
    """A run at round `num_rounds`: loss falls as 4.5 - 0.9 log(1 + round); islands in `late`
    stopped two rounds ago, those in `never_joined` never reported."""
    present = num_islands - len(late) - len(never_joined)
    rounds = tuple(_round(r, present, num_rounds) for r in range(1, num_rounds + 1))
    islands = tuple(
        _island(
            rank,
            num_rounds,
            late=rank in late,
            never=rank in never_joined,
            ranks=ranks_per_island,
            fragments=fragments,
        )
        for rank in range(num_islands)
    )
    return StatusSnapshot(
        run_id="demo-sites",
        transport=transport,
        round=num_rounds,
        params_sha256=sha(num_rounds),
        generated_at=NOW,
        outer_settings={
            "outer.rounds": 40,
            "outer.inner_steps": 100,
            "outer.optimizer": "sgd",
            "outer.lr": 0.7,
            "outer.momentum": 0.9,
            "outer.nesterov": True,
            "outer.codec": "int8",
            "transport.islands": num_islands,
        },
        islands=islands,
        rounds=rounds,
        coordinator=CoordinatorFigures(
            uptime_s=60.0 * num_rounds + 7.0,
            rss_bytes=312_400_000,
            refused_calls=1,
            late_payloads=len(late),
            refused_payloads=0,
        ),
    )


def train_loss(round_index: int) -> float:
    return round(4.5 - 0.9 * math.log1p(round_index), 6)


def _round(round_index: int, participants: int, num_rounds: int) -> RoundRecord:
    return RoundRecord(
        round=round_index,
        closed_at=NOW - 10.0 - 60.0 * (num_rounds - round_index),
        duration_s=round(52.0 + 6.0 * math.sin(round_index), 3),
        participants=max(1, participants),
        late=0,
        refused=0,
        deadline_s=90.0,
        train_loss=train_loss(round_index),
        val_loss=round(train_loss(round_index) + 0.08, 6) if round_index % 2 == 0 else None,
        tokens=TOKENS_PER_ROUND * round_index * max(1, participants),
    )


def _island(
    rank: int, num_rounds: int, *, late: bool, never: bool, ranks: int, fragments: int
) -> IslandStatus:
    if never:
        return IslandStatus(rank=rank, state=IslandState.never_joined, last_round=0, last_seen=None)
    last = num_rounds - 2 if late else num_rounds
    sent = PAYLOAD_BYTES * last
    return IslandStatus(
        rank=rank,
        state=IslandState.late if late else IslandState.active,
        last_round=last,
        last_seen=NOW - (150.0 if late else 3.0 + rank),
        bytes_sent=sent,
        bytes_received=sent,
        train_loss=train_loss(last) + 0.01 * rank,
        val_loss=round(train_loss(last) + 0.08, 6),
        tokens=TOKENS_PER_ROUND * last,
        params_sha256=sha(last),
        host=f"site-{rank}.example.org",
        per_rank=tuple(
            RankBytes(rank=r, bytes_sent=sent // ranks, bytes_received=sent // ranks)
            for r in range(ranks if ranks > 1 else 0)
        ),
        per_fragment=tuple(
            FragmentBytes(
                fragment=f, bytes_sent=sent // fragments, bytes_received=sent // fragments
            )
            for f in range(fragments)
        ),
    )
