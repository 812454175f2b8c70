"""The hivemind transport's state serving, DHT records and reducer, without processes: the
run token's tags refuse forged states and records; the reducer sums in rank order."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("hivemind")

import torch  # noqa: E402
from hivemind.utils.serializer import MSGPackSerializer  # noqa: E402

from diloco.aggregate import weighted_mean  # noqa: E402
from diloco.outer.optimizers import SgdOuter  # noqa: E402
from diloco.shared_state import SharedState  # noqa: E402
from diloco.transports.hivemind.allreduce import OrderedPartReducer  # noqa: E402
from diloco.transports.hivemind.auth import RunToken  # noqa: E402
from diloco.transports.hivemind.averager import gathered_data, sender_key  # noqa: E402
from diloco.transports.hivemind.records import GroupRecords, group_prefix  # noqa: E402
from diloco.transports.hivemind.state import Snapshot, StateServer  # noqa: E402

NUMEL = 8
TOKEN = RunToken("a-run-token-of-32-characters-xyz", "run")
SGD = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)


class FakeAverager:
    """What StateServer uses of an IslandAverager: a peer's served state, sharing flags."""

    def __init__(self, answer: tuple[dict[str, Any], list[torch.Tensor]] | None):
        self.answer = answer
        self.allow_state_sharing = False
        self.state_sharing_priority = 0.0

    def load_state_from_peers(self, timeout: float) -> Any:
        return self.answer


def served(server: StateServer) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """What a peer downloads from `server`, as it arrives (msgpack metadata, copied tensors)."""
    metadata, tensors = server.state_for_peer()
    metadata = MSGPackSerializer.loads(MSGPackSerializer.dumps(metadata))
    return metadata, [t.clone() for t in tensors]


def state(round: int = 2) -> SharedState:
    anchor = torch.arange(NUMEL, dtype=torch.float32)
    return SharedState(round, anchor, {"momentum": anchor / 10})


def test_the_state_after_a_round_is_the_injected_step_of_the_state_before() -> None:
    server = StateServer(SGD, NUMEL, None, serving=True)
    averager = FakeAverager(None)
    before = state()
    server.serve(before.copy(), averager)  # type: ignore[arg-type]
    assert (averager.allow_state_sharing, averager.state_sharing_priority) == (True, 2.0)
    mean_N = torch.linspace(-1, 1, NUMEL)
    server.after_round(2, Snapshot(before), mean_N, averager)  # type: ignore[arg-type]
    assert averager.state_sharing_priority == 3.0
    metadata, tensors = server.state_for_peer()
    expected = before.copy()
    outer_state = dict(expected.outer_state)
    SGD.step_(expected.anchor, mean_N, outer_state, 2)
    assert metadata == {"round": 3, "numel": NUMEL, "tensors": ["anchor", "momentum"]}
    assert torch.equal(tensors[0], expected.anchor)
    assert torch.equal(tensors[1], outer_state["momentum"])


def test_a_client_mode_island_serves_nothing() -> None:
    averager = FakeAverager(None)
    StateServer(SGD, NUMEL, None, serving=False).serve(state(), averager)  # type: ignore[arg-type]
    assert averager.allow_state_sharing is False


def test_a_state_served_with_the_token_is_taken() -> None:
    server = StateServer(SGD, NUMEL, TOKEN, serving=True)
    server.serve(state(), FakeAverager(None))  # type: ignore[arg-type]
    downloader = StateServer(SGD, NUMEL, TOKEN, serving=True)
    got = downloader.download(FakeAverager(served(server)), 1.0)  # type: ignore[arg-type]
    assert got is not None and got.round == 2
    assert torch.equal(got.anchor, state().anchor)
    assert torch.equal(got.outer_state["momentum"], state().outer_state["momentum"])


@pytest.mark.parametrize("forgery", ["anchor", "round", "no tag", "other token"])
def test_a_state_without_a_valid_tag_is_refused(forgery: str) -> None:
    token = (
        RunToken("another-token-of-32-characters-x", "run") if forgery == "other token" else TOKEN
    )
    server = StateServer(SGD, NUMEL, token, serving=True)
    server.serve(state(), FakeAverager(None))  # type: ignore[arg-type]
    metadata, tensors = served(server)
    if forgery == "anchor":
        tensors[0][3] += 1.0
    elif forgery == "round":
        metadata["round"] = 7
    elif forgery == "no tag":
        del metadata["tag"]
    downloader = StateServer(SGD, NUMEL, TOKEN, serving=True)
    assert downloader.download(FakeAverager((metadata, tensors)), 1.0) is None  # type: ignore[arg-type]


def test_a_state_of_another_shape_is_refused_and_nothing_served_is_none() -> None:
    server = StateServer(SGD, NUMEL + 1, None, serving=True)
    server.serve(SharedState(0, torch.zeros(NUMEL + 1)), FakeAverager(None))  # type: ignore[arg-type]
    downloader = StateServer(SGD, NUMEL, None, serving=True)
    assert downloader.download(FakeAverager(served(server)), 1.0) is None  # type: ignore[arg-type]
    assert downloader.download(FakeAverager(None), 1.0) is None  # type: ignore[arg-type]


# --- DHT records ---------------------------------------------------------------------------------


@dataclass
class Item:
    value: Any


class FakeDHT:
    """A DHT of dictionary records: store(key, value, subkey=...), get(key) -> .value."""

    def __init__(self, peer_id: str, records: dict[str, dict[str, Any]]):
        self.peer_id = peer_id
        self.records = records

    def store(self, key: str, value: Any, expiration: float, *, subkey: str, **_: Any) -> None:
        self.records.setdefault(key, {})[subkey] = Item(value)

    def get(self, key: str, latest: bool = False) -> Item | None:
        found = self.records.get(key)
        return None if found is None else Item(found)


def island(peer: str, records: dict[str, Any], token: RunToken | None, **fp: str) -> GroupRecords:
    fingerprint = {"model": "gpt", **fp}
    prefix = group_prefix("run", fingerprint, token)
    return GroupRecords(FakeDHT(peer, records), "run", prefix, fingerprint, token)  # type: ignore[arg-type]


def test_progress_without_the_tokens_tag_is_ignored() -> None:
    records: dict[str, Any] = {}
    me, peer = island("QmMe", records, TOKEN), island("QmPeer", records, TOKEN)
    peer.publish_progress(4, "sha4")
    me.publish_progress(3, "sha3")
    assert me.others_progress() == [(4, "sha4")]
    forger = island("QmForger", records, None)  # no token: its records carry no tag
    forger.publish_progress(9, "evil")
    records[f"{me.prefix}.progress"]["QmFake"] = Item(
        [9, "evil", TOKEN.sign("progress", "QmPeer", 9, "evil")]
    )
    assert me.others_progress() == [(4, "sha4")]  # neither the untagged nor the replayed one
    # Without a token nothing is checked (and islands without one use another prefix).
    assert island("QmOpen", records, None).others_progress() == [(9, "evil")]


def test_an_island_alone_is_told_which_settings_or_tokens_differ() -> None:
    records: dict[str, Any] = {}
    me = island("QmMe", records, TOKEN)
    me.publish_membership()
    assert me.other_groups() == ""
    island("QmOther", records, TOKEN, model="mlp").publish_membership()
    island("QmStranger", records, None, model="gpt").publish_membership()
    reason = me.other_groups()
    assert "1 island(s) of run 'run' run another model or group settings" in reason
    assert "(they differ in: model)" in reason
    assert "1 island(s) of run 'run' hold another run token, or none" in reason
    members = records[f"{me.prefix}.members"]
    assert me.token is not None and members["QmMe"].value == me.token.member_proof("QmMe")


# --- the reducer and the gathered data ---------------------------------------------------------


def test_a_part_is_reduced_in_rank_order_whatever_the_arrival_order() -> None:
    parts = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    weights = [100.0, 137.0, 174.0]
    ranks = [2, 0, 1]  # sender i is island ranks[i]
    order = [(rank, f"Qm{i}") for i, rank in enumerate(ranks)]
    by_rank = sorted(range(3), key=ranks.__getitem__)
    expected = weighted_mean([parts[i] for i in by_rank], [weights[i] for i in by_rank])
    assert not torch.equal(expected, weighted_mean(parts, weights))  # the order shows

    async def reduce() -> list[torch.Tensor]:
        reducer = OrderedPartReducer([torch.Size([1000])], 3, order)
        return await asyncio.gather(
            *(reducer.accumulate_part(i, 0, parts[i], weight=weights[i]) for i in (1, 2, 0))
        )

    means = asyncio.run(reduce())
    assert all(torch.equal(mean, expected) for mean in means)


def test_gathered_data_is_read_whatever_a_peer_sent() -> None:
    packed = MSGPackSerializer.dumps([None, 0, MSGPackSerializer.dumps({"rank": 2, "proof": "p"})])
    data = gathered_data(MSGPackSerializer, packed)
    assert data == {"rank": 2, "proof": "p"}
    assert sender_key("QmA", data) == (2, "QmA")  # type: ignore[arg-type]
    for junk in (b"", b"\xff\x00", MSGPackSerializer.dumps([1, 2, MSGPackSerializer.dumps([3])])):
        assert gathered_data(MSGPackSerializer, junk) == {}
    assert sender_key("QmB", {"rank": "x"}) == (-1, "QmB")  # type: ignore[arg-type]
