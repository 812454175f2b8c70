"""OuterSync: every H inner steps, average the pseudo-gradients and take the outer step."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import threading

import numpy as np
import pytest
import torch
from torch import nn

from diloco.codecs import NoneCodec, build_codec
from diloco.codecs.floating import none_payload_to_fill
from diloco.outer import (
    OuterHyperparams,
    OuterSync,
    SgdOuter,
    SyncResult,
    flatten_params,
    nesterov_step_,
    params_sha256,
    weighted_mean,
)
from diloco.transports import LocalGroup

JOIN_S = 20.0


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))  # 8 + 3 = 11 parameters


def sgd(lr: float = 0.7, momentum: float = 0.9) -> SgdOuter:
    return SgdOuter(lr=lr, momentum=momentum, nesterov=True)


def one_island(
    net: nn.Module, lr: float = 0.7, momentum: float = 0.9, inner_steps: int = 50
) -> OuterSync:
    numel = sum(p.numel() for p in net.parameters())
    transport = LocalGroup(1, NoneCodec(), numel, timeout_s=JOIN_S).transport(0)
    hyper = OuterHyperparams(inner_steps=inner_steps)
    return OuterSync(net.parameters(), transport, NoneCodec(), sgd(lr, momentum), hyper)


@torch.no_grad()
def local_training(net: nn.Module, seed: int) -> None:
    """Stand-in for H inner steps: move every parameter by a small seeded amount."""
    gen = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def test_syncs_on_the_h_th_step_only() -> None:
    """after_inner_step returns None for steps 1 .. H-1 of a round and a SyncResult on the H-th,
    every round."""
    outer = one_island(model(), inner_steps=3)
    for round in range(2):
        assert outer.after_inner_step(tokens=10) is None
        assert outer.after_inner_step(tokens=10) is None
        result = outer.after_inner_step(tokens=10)
        assert isinstance(result, SyncResult)
        assert result.round == round and result.participants == 1
        assert result.bytes_sent == result.bytes_received == 0  # alone: nothing on the wire
        assert result.sync_s >= 0
        assert outer.round == round + 1


def test_outer_lr_one_without_momentum_keeps_the_local_params() -> None:
    """lr 1, mu 0: anchor - (anchor - local) = local: the island continues where it was."""
    net = model()
    outer = one_island(net, lr=1.0, momentum=0.0, inner_steps=1)
    local_training(net, seed=1)
    local = flatten_params(list(net.parameters()))
    outer.after_inner_step(tokens=1)
    after = flatten_params(list(net.parameters()))
    torch.testing.assert_close(after, local, rtol=0, atol=1e-7)
    assert torch.equal(outer.anchor_N, after)


def test_sync_applies_nesterov_to_the_pseudo_gradient() -> None:
    """Two rounds on one island: the anchor follows nesterov_step_ on anchor - local, and the
    model is reset to the new anchor."""
    net = model()
    outer = one_island(net, lr=0.7, momentum=0.9, inner_steps=1)
    anchor = flatten_params(list(net.parameters()))
    momentum = torch.zeros_like(anchor)
    for round in range(2):
        local_training(net, seed=round)
        delta = anchor - flatten_params(list(net.parameters()))
        nesterov_step_(anchor, delta, momentum, lr=0.7, mu=0.9)
        outer.after_inner_step(tokens=5)
        assert torch.equal(outer.anchor_N, anchor) and torch.equal(
            outer.outer_state["momentum"], momentum
        )
        assert torch.equal(flatten_params(list(net.parameters())), anchor)


def test_two_islands_weighted_by_their_tokens_end_bit_identical() -> None:
    """Two threads, two islands: each round's weight is the tokens summed over the round's
    steps; afterwards both hold the same anchor, momentum and params_sha256."""
    nets = [model(), model()]
    numel = flatten_params(list(nets[0].parameters())).numel()
    group = LocalGroup(2, NoneCodec(), numel, timeout_s=JOIN_S)
    hyper = OuterHyperparams(inner_steps=2)
    outers = [
        OuterSync(net.parameters(), group.transport(rank), NoneCodec(), sgd(), hyper)
        for rank, net in enumerate(nets)
    ]
    tokens_per_step = [3.0, 1.0]  # island 0 trains on 3x the tokens: 3/4 of the weight
    anchor0 = flatten_params(list(nets[0].parameters()))
    for rank, net in enumerate(nets):
        local_training(net, seed=10 + rank)
    deltas = [anchor0 - flatten_params(list(n.parameters())) for n in nets]

    errors: list[BaseException] = []

    def island(rank: int) -> None:
        try:
            assert outers[rank].after_inner_step(tokens_per_step[rank]) is None
            assert outers[rank].after_inner_step(tokens_per_step[rank]) is not None
        except BaseException as error:
            errors.append(error)
            group.abort()

    threads = [threading.Thread(target=island, args=(r,), daemon=True) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_S)
    assert not any(t.is_alive() for t in threads) and errors == []

    expected_anchor, expected_momentum = anchor0.clone(), torch.zeros_like(anchor0)
    mean = weighted_mean(deltas, [6.0, 2.0])
    nesterov_step_(expected_anchor, mean, expected_momentum, lr=0.7, mu=0.9)
    for outer, net in zip(outers, nets, strict=True):
        assert torch.equal(outer.anchor_N, expected_anchor)
        assert torch.equal(outer.outer_state["momentum"], expected_momentum)
        assert torch.equal(flatten_params(list(net.parameters())), expected_anchor)
    assert outers[0].params_sha256() == outers[1].params_sha256()


def test_state_dict_round_trip() -> None:
    """A fresh OuterSync loaded from another's state has its anchor, momentum and round, and
    writes the anchor into its own model."""
    net = model()
    outer = one_island(net, inner_steps=1)
    for round in range(2):
        local_training(net, seed=round)
        outer.after_inner_step(tokens=1)
    state = copy.deepcopy(outer.state_dict())
    assert state["round"] == 2

    other_net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    other = one_island(other_net, inner_steps=1)
    other.load_state_dict(state)
    assert other.round == 2
    assert torch.equal(other.anchor_N, outer.anchor_N)
    assert torch.equal(other.outer_state["momentum"], outer.outer_state["momentum"])
    assert torch.equal(flatten_params(list(other_net.parameters())), outer.anchor_N)
    assert other.params_sha256() == outer.params_sha256()


def test_load_state_dict_refuses_another_model_size() -> None:
    """A checkpoint of another model is refused, naming both sizes."""
    outer = one_island(model())
    state = {"anchor": torch.zeros(3), "outer_state": {"momentum": torch.zeros(3)}, "round": 1}
    with pytest.raises(ValueError, match="checkpoint holds 3 shared elements, the model has 11"):
        outer.load_state_dict(state)
    assert outer.round == 0


def test_params_sha256_tracks_the_parameters() -> None:
    """Equal parameters hash equal; a sync that moves them changes the hash; the hash is
    sha256 of the little-endian fp32 bytes."""
    net = model()
    a, b = one_island(net, inner_steps=1), one_island(model(), inner_steps=1)
    assert a.params_sha256() == b.params_sha256()
    before = a.params_sha256()
    with torch.no_grad():
        next(net.parameters())[0, 0] += 1.0
    a.after_inner_step(tokens=1)
    assert a.params_sha256() != before

    flat = torch.tensor([1.0, -2.5, 0.0])
    expected = hashlib.sha256(np.array([1.0, -2.5, 0.0], dtype="<f4").tobytes()).hexdigest()
    assert params_sha256(flat) == expected
    assert params_sha256(flat.double()) == expected
    assert params_sha256(torch.tensor([1.0, -2.5, -0.0])) != expected  # bits, not values


class Recording:
    """A one-island transport that keeps a copy of the payload it is handed."""

    def __init__(self, codec: object, numel: int):
        self.inner = LocalGroup(1, codec, numel, timeout_s=JOIN_S).transport(0)  # type: ignore[arg-type]
        self.payloads: list[torch.Tensor] = []

    def average(self, payload: torch.Tensor, *args: object, **kwargs: object) -> object:
        self.payloads.append(payload.clone())
        return self.inner.average(payload, *args, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("codec_name", ["none", "int8"])
def test_the_payload_is_the_codecs_encoding_of_the_pseudo_gradient(codec_name: str) -> None:
    """With codec none the pseudo-gradient is written straight into its payload's body (no
    encode copy): the bytes must be exactly `codec.encode(anchor - params)` all the same."""
    codec = build_codec(codec_name)
    net = model()
    anchor_N = flatten_params(list(net.parameters())).clone()
    transport = Recording(codec, anchor_N.numel())
    hyper = OuterHyperparams(inner_steps=1)
    outer = OuterSync(net.parameters(), transport, codec, sgd(), hyper)  # type: ignore[arg-type]
    local_training(net, seed=3)
    expected = codec.encode(anchor_N - flatten_params(list(net.parameters())))
    outer.sync(tokens=1.0)
    assert torch.equal(transport.payloads[0], expected)


def test_a_none_payload_filled_in_place_is_the_codecs_encoding() -> None:
    values = torch.randn(1001, generator=torch.Generator().manual_seed(4))
    payload, body_N = none_payload_to_fill(values.numel(), torch.device("cpu"))
    body_N.copy_(values)
    assert torch.equal(payload, NoneCodec().encode(values))


class LendingSpare(Recording):
    """Recording, and decodes the mean into the spare buffer it is handed (as grpc does)."""

    def __init__(self, codec: object, numel: int):
        super().__init__(codec, numel)
        self.spares: list[torch.Tensor] = []
        self.checked: list[bool] = []

    def average_into(
        self,
        payload: torch.Tensor,
        weight: float,
        round: int,
        params_sha256: str | None,
        spare_N: torch.Tensor | None,
        *,
        checked_finite: bool = False,
    ) -> object:
        self.checked.append(checked_finite)
        result = self.average(payload, weight, round, params_sha256)
        if spare_N is None:
            return result
        self.spares.append(spare_N)
        spare_N.copy_(result.mean)  # type: ignore[attr-defined]
        return dataclasses.replace(result, mean=spare_N)  # type: ignore[type-var]


@pytest.mark.parametrize("codec_name", ["none", "int8"])
def test_a_spent_pseudo_gradient_is_handed_over_for_the_mean(codec_name: str) -> None:
    """With a codec that encodes into a new payload, the pseudo-gradient's buffer is spent:
    a transport that can (DecodesMeanInto) gets it for the mean; the outer step is the same
    as with a transport that allocates the mean. With codec none the payload is the
    pseudo-gradient itself: nothing to hand over."""
    codec, steps = build_codec(codec_name), []
    for transport_type in (Recording, LendingSpare):
        net = model()
        numel = flatten_params(list(net.parameters())).numel()
        transport = transport_type(codec, numel)
        hyper = OuterHyperparams(inner_steps=1)
        outer = OuterSync(net.parameters(), transport, codec, sgd(), hyper)  # type: ignore[arg-type]
        local_training(net, seed=3)
        outer.sync(tokens=1.0)
        steps.append(outer.params_sha256())
        if isinstance(transport, LendingSpare):
            expected = 0 if codec_name == "none" else 1
            assert len(transport.spares) == expected
            assert all(s.shape == (numel,) and s.dtype == torch.float32 for s in transport.spares)
            # OuterSync checked the pseudo-gradient: the transport need not read it again
            assert transport.checked == [True]
    assert steps[0] == steps[1]


@pytest.mark.parametrize(("trim_from_bytes", "trims"), [(0, 2), (1 << 40, 0)])
def test_a_sync_trims_the_heaps_only_for_large_payloads(
    trim_from_bytes: int, trims: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Freed gradients are given back to the OS as a sync begins (diloco/os_memory.py), for
    payloads from TRIM_FROM_BYTES up: a small model syncing every step would only fault the
    same pages in again."""
    from diloco.outer import sync as sync_module

    calls: list[int] = []
    monkeypatch.setattr(sync_module, "TRIM_FROM_BYTES", trim_from_bytes)
    monkeypatch.setattr(sync_module, "trim_heaps", lambda: calls.append(1) or True)
    island = one_island(model(), inner_steps=1)
    for _ in range(2):
        island.sync(tokens=1.0)
    assert len(calls) == trims
