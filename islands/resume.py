"""Where a run starts: the newest checkpoint the whole group holds intact, or a fresh start.

A damaged checkpoint (truncated, overwritten, failing its checksum) is skipped with a warning
for the newest intact one. Starting afresh never deletes what an earlier run left: its
checkpoints and metrics are moved aside into `previous-<time>/` in the island's folder.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from diloco.checkpoint import (
    DamagedCheckpoint,
    list_checkpoints,
    load_checkpoint,
    old_format_checkpoints,
)
from diloco.errors import ConfigError
from diloco.transports.base import SharedStateSource
from islands.hosted import join_all
from islands.outputs import checkpoint_dir
from islands.runtime import Runtime

log = logging.getLogger(__name__)

# What a run writes in its folder that a fresh start moves aside (never deletes).
_OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "tensorboard", "loss.png")


def resume(runtime: Runtime) -> int:
    """Load the newest checkpoint the whole group holds; returns the round to start at."""
    checkpoints = checkpoint_dir(runtime)
    config = runtime.config
    available: dict[int, dict[str, Any] | None] = {}
    if config.run.resume:
        _refuse_old_format(checkpoints)
        available = _intact(checkpoints)
    # An island of several ranks offers the rounds every one of its ranks holds.
    held = set.intersection(*(set(rounds) for rounds in runtime.island_ranks.gather(available)))
    round = join_all(runtime.hosted, sorted(held), runtime.fingerprint, runtime.abort)
    if round is not None:
        state = available[round] or load_checkpoint(checkpoints, round)
        _load(runtime, state, checkpoints, round)
    else:
        _start_afresh(runtime)
    return _catch_up_with_group(runtime)


def _refuse_old_format(checkpoints: Path) -> None:
    old = old_format_checkpoints(checkpoints)
    if old:
        raise ConfigError(
            f"{checkpoints} holds checkpoints of an earlier diloco version ({old[-1].name}, "
            "pickle), which are never loaded: move them away, or set run.resume=false to "
            "start afresh (they are then moved aside)"
        )


def _intact(checkpoints: Path) -> dict[int, dict[str, Any] | None]:
    """The rounds whose checkpoint loads intact (the newest one's state kept, loaded)."""
    rounds = list_checkpoints(checkpoints)
    intact: dict[int, dict[str, Any] | None] = {}
    for round in sorted(rounds, reverse=True):
        try:
            state = load_checkpoint(checkpoints, round)
        except DamagedCheckpoint as error:
            log.warning("skipping a damaged checkpoint: %s", error)
            continue
        intact[round] = state if not intact else None  # keep one state in memory
    if rounds and not intact:
        raise ConfigError(
            f"no intact checkpoint in {checkpoints} (every one is damaged): move the folder "
            "away, or set run.resume=false to start afresh (it is then moved aside)"
        )
    return intact


def _load(runtime: Runtime, state: dict[str, Any], checkpoints: Path, round: int) -> None:
    lead = runtime.hosted[0]
    numel = lead.outer.numel if lead.outer is not None else runtime.numel
    if state["numel"] != numel:
        raise ConfigError(
            f"the checkpoint in {checkpoints} holds {state['numel']} shared parameters, this "
            f"model (this rank's shard) has {numel}: use another run.dir or run.resume=false"
        )
    islands = {entry["rank"]: entry for entry in state["islands"]}
    for island in runtime.hosted:
        if island.outer is not None:
            if state["outer"].get("streaming"):
                raise ConfigError(
                    f"the checkpoint in {checkpoints} is of a streaming run (outer.fragments / "
                    "overlap_steps): resume it with the same settings"
                )
            island.outer.load_state_dict(state["outer"])
        island.load_state_dict(islands[island.rank])
    torch.set_rng_state(state["rng"]["cpu"])
    if torch.cuda.is_available() and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    runtime.timings.update(state["timings"])
    if runtime.island_ranks.writes_outputs:
        runtime.metrics.truncate_after(round)
    log.info("resumed from %s at round %d", checkpoints, round)


def _start_afresh(runtime: Runtime) -> None:
    """Round 0 with a new metrics.jsonl; an earlier run's outputs are moved aside, never lost
    (pruning keeps the highest rounds, so old checkpoints would outlive this run's own).
    Rank 0 of an island moves them (every rank's checkpoints included), the others wait."""
    if not runtime.island_ranks.writes_outputs:
        runtime.island_ranks.barrier()
        return
    present = [runtime.out_dir / name for name in _OUTPUTS if (runtime.out_dir / name).exists()]
    if present:
        aside = runtime.out_dir / time.strftime("previous-%Y%m%d-%H%M%S")
        while aside.exists():
            aside = aside.with_name(aside.name + "-1")
        aside.mkdir(parents=True)
        for path in present:
            shutil.move(str(path), str(aside / path.name))
        log.warning(
            "starting afresh in %s: an earlier run's outputs (%s) were moved to %s",
            runtime.out_dir,
            ", ".join(path.name for path in present),
            aside,
        )
    runtime.metrics.reset()
    runtime.island_ranks.barrier()


def _catch_up_with_group(runtime: Runtime) -> int:
    """Adopt the group's shared state when the transport keeps one and it is newer than ours.

    A restarted island resumes its own inner state from its checkpoint, a new one starts
    afresh; either way the anchor and outer state are the group's, and it joins at the
    group's next round. The ranks of an island agree first (`_agreed_start`).
    """
    if runtime.hosted[0].outer is None:  # streaming: each fragment's lane, on its own
        for island in runtime.hosted:
            assert island.stream is not None
            if island.stream.seed_groups():
                log.info("joined the fragments' groups with their shared state")
        return runtime.hosted[0].round
    lead = runtime.hosted[0].blocking
    transport = lead.transport
    if not isinstance(transport, SharedStateSource):
        return lead.round
    deadline = time.monotonic() + _AGREE_S
    while True:
        group_state = transport.shared_state(lead.shared_state())
        offered = (lead.round, group_state.round if group_state is not None else lead.round)
        offers = runtime.island_ranks.gather(offered)
        start = _agreed_start(offers)
        if start is not None or time.monotonic() > deadline:
            break
        time.sleep(1.0)  # a lane may be closing the round the others have closed
    lead.release_offloaded_state()  # read if this island seeded the group
    if start is None:
        raise RuntimeError(
            f"the island's ranks cannot start at one round {offered} (their shards' groups "
            "disagree by more than a round): restart the island"
        )
    if group_state is not None and group_state.round == start:
        log.info("joining the group at round %d with its shared state", group_state.round)
        for island in runtime.hosted:
            island.blocking.adopt(group_state)
        if runtime.island_ranks.writes_outputs:
            runtime.metrics.truncate_after(group_state.round)
    return start


# How long the ranks of a restarted island wait for their shards' groups to agree.
_AGREE_S = 60.0


def _agreed_start(offers: list[tuple[int, int]]) -> int | None:
    """The round an island's ranks start at, from each rank's (own round, its group's round).

    Rank r's shard group may be a round ahead of the others: the island died after some of
    its ranks had sent their payload of a round and others had not, and the groups that
    got one closed it. The island starts at the lowest round any rank can reach; a rank whose
    group is past it keeps its own state of that round and sends the round again (the
    group answers with the round it closed). None: no round every rank can start at.
    """
    groups = {group for _, group in offers}
    if len(groups) == 1:
        return groups.pop()  # the groups agree: every rank takes their state (or its own)
    start = min(max(own, group) for own, group in offers)
    feasible = all(max(own, group) == start or own == start for own, group in offers)
    return start if feasible else None
