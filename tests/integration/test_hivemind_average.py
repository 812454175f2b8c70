"""The hivemind transport's average, one process per peer on loopback, against the exact mean.

Every peer must receive the same bits, and those bits must be the tokens-weighted mean of the
peers' decoded payloads: exactly (fp32 summation) with codec none, within the codec's
quantization error with int8 (hivemind's own 8-bit codecs silently return a wrong average
under numpy >= 2.4: docs/transports.md).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
from pathlib import Path

import pytest

pytest.importorskip("hivemind")

import torch  # noqa: E402
from harness import spawn_children  # noqa: E402

from diloco.codecs import build_codec  # noqa: E402
from diloco.shared_state import SharedState  # noqa: E402
from diloco.transports.hivemind.config import HivemindTransportConfig  # noqa: E402

NUMEL = 300_001  # not a multiple of the parts or blocks
FINGERPRINT = {"model": "test"}


def pseudo_gradient(rank: int, round: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * round + rank)
    return torch.randn(NUMEL, generator=generator) * (rank + 1)


def weight_of(rank: int) -> float:
    return 100.0 * (rank + 1)


def peer(rank: int, peers: int, codec_name: str, address_file: str, rounds: int) -> list:
    mp.set_start_method("fork", force=True)  # hivemind's helper processes
    # spawn_children's children are daemonic, and a daemonic process may not start the DHT
    # and averager processes; the harness still kills this child on timeout, and those
    # helpers exit with it (exit_with_parent).
    mp.current_process()._config["daemon"] = False  # type: ignore[attr-defined]
    from diloco.outer.optimizers import SgdOuter
    from diloco.transports.hivemind import HivemindGroup, HivemindTransport

    settings = HivemindTransportConfig(
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        initial_peers_file="" if rank == 0 else address_file,
        matchmaking_s=20.0,
        averaging_timeout_s=60.0,
        next_chunk_timeout_s=10.0,
        use_relay=False,
    )
    codec = build_codec(codec_name)
    transport = HivemindTransport(
        settings,
        HivemindGroup(
            run_id="avg-test",
            num_islands=peers,
            optimizer=SgdOuter(lr=0.7, momentum=0.9, nesterov=True),
        ),
        codec,
        numel=NUMEL,
        rank=rank,
        identity_path=str(Path(address_file).parent / f"peer{rank}.key"),
        block_size=int(getattr(codec, "block_size", 1)),
    )
    if rank == 0:
        Path(address_file).write_text("\n".join(transport.visible_maddrs) + "\n")
    try:
        transport.join([], FINGERPRINT)
        zeros = torch.zeros(NUMEL)
        transport.shared_state(SharedState(0, zeros, {"momentum": zeros.clone()}))
        answers = []
        for round in range(rounds):
            payload = codec.encode(pseudo_gradient(rank, round))
            result = transport.average(payload, weight_of(rank), round, params_sha256="same")
            assert result.adopt is None
            answers.append(
                (
                    result.mean.numpy().tobytes(),
                    result.participants,
                    result.bytes_sent,
                    result.bytes_received,
                )
            )
        return answers
    finally:
        transport.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("codec_name", "peers"),
    # three peers form their group more slowly: make test-all
    [pytest.param("none", 3, marks=pytest.mark.slow), ("int8", 2)],
)
def test_every_peer_gets_the_weighted_mean(tmp_path: Path, codec_name: str, peers: int) -> None:
    rounds = 2
    address_file = str(tmp_path / "peers.txt")
    answers = spawn_children(
        peer,
        [(rank, peers, codec_name, address_file, rounds) for rank in range(peers)],
        timeout_s=200,
    )
    codec = build_codec(codec_name)
    for round in range(rounds):
        means = [answers[rank][round][0] for rank in range(peers)]
        digests = {hashlib.sha256(mean).hexdigest() for mean in means}
        assert len(digests) == 1, f"round {round}: the peers hold different means"
        got = torch.frombuffer(bytearray(means[0]), dtype=torch.float32).double()
        decoded = [
            codec.decode(codec.encode(pseudo_gradient(rank, round)), NUMEL).double()
            for rank in range(peers)
        ]
        weights = [weight_of(rank) for rank in range(peers)]
        exact = sum(w * x for w, x in zip(weights, decoded, strict=True)) / sum(weights)
        error = (got - exact).abs().max().item()
        if codec_name == "none":
            assert error <= 1e-6 * exact.abs().max().item(), error
        else:
            # int8 per block: the mean is quantized once more (half a step of its block).
            assert error <= exact.abs().max().item() / 127, error
        for rank in range(peers):
            _, participants, sent, received = answers[rank][round]
            assert participants == peers
            assert sent > 0 and received > 0
