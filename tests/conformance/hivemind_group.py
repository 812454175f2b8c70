"""The hivemind kind of the transport conformance suite (test_transport.py).

`run_hivemind_group(num_islands, plan)` runs the suite's plan on N hivemind islands on
loopback, one spawned process per island (the parent owns nothing but a temporary directory:
island 0 of each plan entry writes its multiaddrs there, the others bootstrap from that file,
as sites do with hivemind.address_file / initial_peers_file). Each plan entry gets fresh
transports (a DHT node and an averager per island), built with `HivemindTransport` as
`build_hivemind_transport` builds it. Inside each child the `fork` start method is set:
hivemind's DHT and averager are processes that share the island's tensors and pipes.

What hivemind documents, and the suite checks through the other functions here:
- join: an island resumes from its own newest checkpoint (the suite's `_own_newest`); the
  group's newer state comes next, through `shared_state`;
- a mean never mixes rounds: islands at different rounds use different DHT keys;
- an island with another model is not refused, it is kept apart (another DHT prefix) and
  warned about the islands it will not meet;
- bytes: `hivemind_wire_bytes`.

Nothing here imports hivemind at module level: the suite imports this module when hivemind
is missing too.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import spawn_children

from diloco.codecs import Codec
from diloco.outer.optimizers import SgdOuter
from diloco.shared_state import OuterOptimizer

RUN_ID = "conformance"
HIVEMIND_TOKEN = "conformance-hivemind-token-0123"  # every entry runs authenticated


def default_optimizer(name: str) -> OuterOptimizer:
    """The outer step an island serves its state with, by plan entry (the suite's default)."""
    del name
    return SgdOuter(lr=0.7, momentum=0.9, nesterov=True)


def run_hivemind_group(
    num_islands: int,
    plan: list[Any],
    *,
    numel: int,
    optimizer_for: Callable[[str], OuterOptimizer] = default_optimizer,
    timeout_s: float = 170.0,
) -> list[dict[str, Any]]:
    """Run `plan` on N hivemind islands; every island's {name: result}, in rank order.

    Args:
        numel: elements of the vectors the plan averages.
        optimizer_for: the outer optimizer of each plan entry by name (what an island uses to
            serve its state after a round); a module-level function (children unpickle it).
    """
    workdir = tempfile.mkdtemp(prefix="conformance-hivemind-")
    args = [(workdir, rank, num_islands, plan, numel, optimizer_for) for rank in range(num_islands)]
    try:
        return spawn_children(_island, args, timeout_s=timeout_s)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def hivemind_wire_bytes(
    codec: Codec, payload_bytes: int, num_islands: int
) -> list[tuple[int, int]]:
    """(sent, received) of every island per average, in no particular order.

    hivemind cuts the vector into parts of 2^19 values and deals whole parts to the islands
    (allreduce.py): a vector that fits one part (the suite's) is reduced by one island, which
    the group's leader picks at random. That island receives the payload of each of the N - 1
    others and sends each the mean, re-encoded by the run's codec (the same size); each other
    island sends its payload and receives the mean.
    """
    del codec
    reducer = (num_islands - 1) * payload_bytes
    return sorted([(reducer, reducer)] + [(payload_bytes, payload_bytes)] * (num_islands - 1))


def hivemind_wrong_round(messages: list[str], num_islands: int) -> None:
    """Island 0 names round 0, the others round 1: they meet under different DHT keys, so
    island 0 averages alone (or adopts the group's newer state, if the others have closed
    their round by the time it looks), and the others average among themselves."""
    assert messages[0] == "mean of 1" or messages[0].startswith("adopt round "), messages
    if messages[0].startswith("adopt round "):
        assert int(messages[0].removeprefix("adopt round ")) >= 1, messages
    for island, message in enumerate(messages[1:], start=1):
        assert message.startswith("mean of "), f"island {island}: {message}"
        assert 1 <= int(message.removeprefix("mean of ")) <= num_islands - 1, messages


def hivemind_another_model(messages: list[str | None], num_islands: int) -> None:
    """No island is refused: the one with another model is kept apart (another DHT prefix,
    never in the others' groups) and warned, with the others left to run on."""
    assert messages == [None] * num_islands, messages


# --- the islands -------------------------------------------------------------------------------


def _island(
    workdir: str,
    rank: int,
    num_islands: int,
    plan: list[Any],
    numel: int,
    optimizer_for: Callable[[str], OuterOptimizer],
) -> dict[str, Any]:
    mp.set_start_method("fork", force=True)  # hivemind's helper processes
    # spawn_children's children are daemonic, and a daemonic process may not start the DHT
    # and averager processes; the harness still kills this child on timeout, and those
    # helpers exit with it (exit_with_parent).
    mp.current_process()._config["daemon"] = False  # type: ignore[attr-defined]
    results = {}
    for index, (name, scenario, codec, args) in enumerate(plan):
        island = _Island(workdir, index, rank, num_islands, numel)
        transport = island.transport(name, codec, optimizer_for(name))
        try:
            results[name] = scenario(transport, codec, *args)
            # Some scenarios need no peer (join): an island must not close its DHT node while
            # a slower one still bootstraps from it.
            island.wait_for_all(timeout_s=120.0)
        finally:
            transport.close()
    return results


@dataclass(frozen=True)
class _Island:
    workdir: str
    entry: int
    rank: int
    num_islands: int
    numel: int

    def transport(self, name: str, codec: Codec, optimizer: OuterOptimizer) -> Any:
        """This island's transport for one plan entry; island 0 says where to join it."""
        from diloco.transports.hivemind import HivemindTransportConfig
        from diloco.transports.hivemind.transport import HivemindGroup, HivemindTransport

        address_file = Path(self.workdir) / f"entry-{self.entry}.peers"
        # A round closes as soon as all N islands are in its group; the window only matters
        # to the wrong-round entry, whose island 0 must be let to average alone.
        hasty = name == "wrong round"
        settings = HivemindTransportConfig(
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            initial_peers_file="" if self.rank == 0 else str(address_file),
            use_relay=False,
            matchmaking_s=3.0 if hasty else 30.0,
            request_timeout_s=1.0 if hasty else 3.0,
            next_chunk_timeout_s=10.0,
            averaging_timeout_s=90.0,
            state_timeout_s=10.0,
        )
        group = HivemindGroup(
            run_id=RUN_ID,
            num_islands=self.num_islands,
            optimizer=optimizer,
            min_islands=1 if hasty else self.num_islands,
            token=HIVEMIND_TOKEN,
        )
        key = Path(self.workdir) / f"island-{self.rank}-entry-{self.entry}.key"
        transport = HivemindTransport(
            settings,
            group,
            codec,
            numel=self.numel,
            rank=self.rank,
            identity_path=str(key),
            block_size=int(getattr(codec, "block_size", 1)),
        )
        if self.rank == 0:
            partial = address_file.with_suffix(".partial")
            partial.write_text("".join(f"{maddr}\n" for maddr in transport.visible_maddrs))
            partial.rename(address_file)  # the others never read half a file
        return transport

    def wait_for_all(self, timeout_s: float) -> None:
        """Return once every island has finished this entry's scenario (files in workdir)."""
        done = Path(self.workdir) / f"entry-{self.entry}.done"
        done.mkdir(exist_ok=True)
        (done / str(self.rank)).touch()
        deadline = time.monotonic() + timeout_s
        while len(list(done.iterdir())) < self.num_islands:
            if time.monotonic() > deadline:
                raise TimeoutError(f"plan entry {self.entry}: the other islands never finished")
            time.sleep(0.05)
