"""The hivemind transport's pure pieces: the codec adapter, group keys, peers files, warnings."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("hivemind")

import torch  # noqa: E402
from hivemind.compression import CompressionInfo  # noqa: E402

from diloco.codecs import build_codec  # noqa: E402
from diloco.config import load_config  # noqa: E402
from diloco.transports.hivemind.compression import CodecCompression  # noqa: E402
from diloco.transports.hivemind.transport import _group_bits, _read_peers  # noqa: E402


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
    key = _group_bits(3, "abc")
    assert len(key) == 64 and set(key) <= {"0", "1"}
    assert key == _group_bits(3, "abc")
    assert key != _group_bits(4, "abc") and key != _group_bits(3, "abd")


def test_peers_file_is_read_and_a_missing_one_named(tmp_path: Path) -> None:
    peers = tmp_path / "peers.txt"
    peers.write_text("/ip4/127.0.0.1/tcp/1/p2p/Qm1\n\n/ip4/127.0.0.1/tcp/2/p2p/Qm2\n")
    assert _read_peers(str(peers), 0.0) == [
        "/ip4/127.0.0.1/tcp/1/p2p/Qm1",
        "/ip4/127.0.0.1/tcp/2/p2p/Qm2",
    ]
    with pytest.raises(ValueError, match=r"initial_peers_file .* holds no multiaddr after 0 s"):
        _read_peers(str(tmp_path / "absent.txt"), 0.0)


def test_hivemind_settings_are_ignored_by_other_kinds() -> None:
    config = load_config(None, ["transport.hivemind.matchmaking_s=5"])
    assert config.ignored_options() == ["transport.hivemind"]
    hivemind = load_config(None, ["transport.kind=hivemind", "transport.hivemind.matchmaking_s=5"])
    assert hivemind.ignored_options() == []
