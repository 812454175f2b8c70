"""The hivemind run token on loopback: a peer without it never enters an average (issue 12,
item 18).

Islands 1 and 2 hold the token; island 0 is an attacker without it that knows the group's DHT
prefix (anyone can read it in the run's fingerprint records) and starts first, so that it is
the peer the others meet first. The honest islands expect a group of 3: without the token's
checks the attacker would be in their group. With them, the two average together, and their
mean is the exact 2-island mean, bit for bit; the attacker is refused and gets no part of
theirs. Run with the token's checks switched off (both honest islands without a token, the
attacker on their prefix), the honest islands average in 3 and this test fails.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("hivemind")

import torch  # noqa: E402
from harness import spawn_children  # noqa: E402

from diloco.aggregate import weighted_mean  # noqa: E402

NUMEL = 20_001
TOKEN = "hivemind-token-test-0123456789abcdef"
RUN_ID = "token-test"
FINGERPRINT = {"model": "test"}
ROUNDS = 2


def vector(rank: int, round: int) -> torch.Tensor:
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(100 * round + rank))


def weight(rank: int) -> float:
    return 100.0 + 37.0 * rank


def start_island(rank: int, address_file: str) -> Any:
    """Island `rank`'s transport; island 0 is the attacker (no token, the honest prefix)."""
    from diloco.codecs import NoneCodec
    from diloco.outer.optimizers import SgdOuter
    from diloco.transports.hivemind import HivemindTransportConfig
    from diloco.transports.hivemind import transport as transport_module
    from diloco.transports.hivemind.auth import RunToken
    from diloco.transports.hivemind.records import group_prefix, run_key

    attacker = rank == 0
    if attacker:
        # It learned the honest prefix (public in the DHT); it cannot learn the token.
        honest = group_prefix(run_key(RUN_ID), FINGERPRINT, RunToken(TOKEN, run_key(RUN_ID)))
        transport_module.group_prefix = lambda *args: honest  # type: ignore[assignment]
    settings = HivemindTransportConfig(
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        initial_peers_file="" if attacker else address_file,
        use_relay=False,
        matchmaking_s=6.0,
        request_timeout_s=2.0,
        next_chunk_timeout_s=10.0,
        averaging_timeout_s=20.0 if attacker else 60.0,  # the attacker gives up sooner
        state_timeout_s=10.0,
    )
    group = transport_module.HivemindGroup(
        run_id=RUN_ID,
        num_islands=3,
        optimizer=SgdOuter(lr=0.7, momentum=0.9, nesterov=True),
        min_islands=1 if attacker else 2,
        token=None if attacker else TOKEN,
    )
    transport = transport_module.HivemindTransport(
        settings,
        group,
        NoneCodec(),
        numel=NUMEL,
        rank=rank,
        identity_path=str(Path(address_file).parent / f"island{rank}.key"),
    )
    if attacker:
        Path(address_file + ".partial").write_text("\n".join(transport.visible_maddrs) + "\n")
        Path(address_file + ".partial").rename(address_file)
    return transport


def island(rank: int, address_file: str) -> dict[str, Any]:
    mp.set_start_method("fork", force=True)  # hivemind's helper processes
    mp.current_process()._config["daemon"] = False  # type: ignore[attr-defined]
    from diloco.codecs import NoneCodec
    from diloco.shared_state import SharedState, params_sha256

    transport = start_island(rank, address_file)
    try:
        transport.join([], FINGERPRINT)
        zeros = torch.zeros(NUMEL)
        adopted = transport.shared_state(SharedState(0, zeros, {"momentum": zeros.clone()}))
        rounds: list[dict[str, Any]] = []
        for round in range(ROUNDS):
            payload = NoneCodec().encode(vector(rank, round))
            try:
                result = transport.average(payload, weight(rank), round, params_sha256(zeros))
            except RuntimeError as error:
                rounds.append({"error": str(error)})
                continue
            mean = result.mean.numpy().tobytes()
            rounds.append(
                {
                    "mean": mean,
                    "participants": result.participants,
                    "adopt": result.adopt is not None,
                }
            )
        return {
            "peer_id": str(transport.dht.peer_id),
            "refused": sorted(transport.refused_peers),
            "state_adopted": adopted is not None,
            "rounds": rounds,
        }
    finally:
        transport.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_peer_without_the_token_never_enters_the_average(tmp_path: Path) -> None:
    address_file = str(tmp_path / "peers.txt")
    attacker, *honest = spawn_children(
        island, [(rank, address_file) for rank in range(3)], timeout_s=200
    )
    for round in range(ROUNDS):
        exact = weighted_mean([vector(1, round), vector(2, round)], [weight(1), weight(2)])
        for rank, seen in enumerate(honest, start=1):
            answer = seen["rounds"][round]
            assert "error" not in answer, f"island {rank} round {round}: {answer}"
            assert answer["participants"] == 2 and not answer["adopt"], answer
            got = torch.frombuffer(bytearray(answer["mean"]), dtype=torch.float32)
            assert torch.equal(got, exact), f"island {rank} round {round} is not the 2-island mean"
        # The attacker checks nothing: it may count the honest islands of a group they left
        # (they refuse before any part moves), but its mean holds no part but its own.
        alone = attacker["rounds"][round]
        if "mean" in alone:
            got = torch.frombuffer(bytearray(alone["mean"]), dtype=torch.float32)
            assert torch.equal(got, vector(0, round)), "the attacker received honest parts"
    # The honest islands took no state from the attacker, and refused it at least once.
    assert not any(seen["state_adopted"] for seen in honest)
    assert attacker["peer_id"] in set(honest[0]["refused"]) | set(honest[1]["refused"])
