"""The hivemind transport's pure pieces: the codec adapter, group keys, peers files, warnings,
the adopt policy."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("hivemind")

import torch  # noqa: E402
from hivemind.compression import CompressionInfo  # noqa: E402

from diloco.codecs import build_codec  # noqa: E402
from diloco.config import load_config  # noqa: E402
from diloco.shared_state import SharedState, params_sha256  # noqa: E402
from diloco.transports.hivemind.adopt import adopts, group_is_ahead  # noqa: E402
from diloco.transports.hivemind.compression import CodecCompression  # noqa: E402
from diloco.transports.hivemind.connect import read_peers  # noqa: E402
from diloco.transports.hivemind.records import group_bits  # noqa: E402


@pytest.mark.parametrize("name", ["none", "int8", "fp4", "topk"])
def test_a_part_travels_as_our_payload(name: str) -> None:
    codec = build_codec(name)
    adapter = CodecCompression(codec, int(getattr(codec, "block_size", 1)))
    part = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    message = adapter.compress(part, CompressionInfo.from_tensor(part))
    assert bytes(message.buffer) == codec.encode(part).numpy().tobytes()
    assert torch.equal(adapter.extract(message), codec.decode(codec.encode(part), 1000))


def test_parts_are_whole_blocks() -> None:
    adapter = CodecCompression(build_codec("int8", block_size=100), 100)
    assert adapter.part_values(2**19) % 100 == 0
    # hivemind sizes a part as part_size_bytes / (4 * ratio) values.
    assert 4 * adapter.estimate_compression_ratio(None) == 1.0


def test_islands_meet_only_at_the_same_round_on_the_same_parameters() -> None:
    key = group_bits(3, "abc")
    assert len(key) == 64 and set(key) <= {"0", "1"}
    assert key == group_bits(3, "abc")
    assert key != group_bits(4, "abc") and key != group_bits(3, "abd")


def test_peers_file_is_read_and_a_missing_one_named(tmp_path: Path) -> None:
    peers = tmp_path / "peers.txt"
    peers.write_text("/ip4/127.0.0.1/tcp/1/p2p/Qm1\n\n/ip4/127.0.0.1/tcp/2/p2p/Qm2\n")
    assert read_peers(str(peers), 0.0) == [
        "/ip4/127.0.0.1/tcp/1/p2p/Qm1",
        "/ip4/127.0.0.1/tcp/2/p2p/Qm2",
    ]
    with pytest.raises(ValueError, match=r"initial_peers_file .* holds no multiaddr after 0 s"):
        read_peers(str(tmp_path / "absent.txt"), 0.0)


def test_hivemind_settings_are_ignored_by_other_kinds() -> None:
    config = load_config(None, ["transport.hivemind.matchmaking_s=5"])
    assert config.ignored_options() == {
        "transport.hivemind": "read only by transport.kind=hivemind"
    }
    hivemind = load_config(None, ["transport.kind=hivemind", "transport.hivemind.matchmaking_s=5"])
    assert hivemind.ignored_options() == {}


def test_an_island_adopts_when_the_group_is_past_its_round_or_elsewhere() -> None:
    assert not group_is_ahead([], 3, "a")  # alone
    assert not group_is_ahead([(3, "a"), (2, "b")], 3, "a")  # a late island is no reason
    assert group_is_ahead([(4, "a")], 3, "a")  # somebody closed round 3 already
    assert group_is_ahead([(3, "b"), (3, "b")], 3, "a")  # most islands hold other parameters
    assert not group_is_ahead([(3, "b")], 3, "a")  # a tie goes to the smallest hash...
    assert group_is_ahead([(3, "a")], 3, "b")  # ...on every island


def test_the_adopted_state_must_be_newer_or_on_other_parameters() -> None:
    anchor = torch.arange(4.0)
    sha = params_sha256(anchor)
    assert not adopts(None, 3, sha)
    assert not adopts(SharedState(2, anchor), 3, sha)  # older than this island
    assert not adopts(SharedState(3, anchor.clone()), 3, sha)  # the same state
    assert adopts(SharedState(3, anchor + 1), 3, sha)  # same round, other parameters
    assert adopts(SharedState(5, anchor.clone()), 3, sha)  # newer
