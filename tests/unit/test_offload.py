"""The outer state kept in files between outer steps (diloco/offload.py, outer.offload_state):
the same bits as in memory, out of the process's memory once released."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from diloco import offload
from diloco.codecs import NoneCodec, build_codec
from diloco.offload import FileVector, OffloadedState
from diloco.outer import OuterHyperparams, OuterSync, SgdOuter
from diloco.outer.nesterov import STEP_CHUNK
from diloco.outer.optimizers import adam_outer
from diloco.transports import LocalGroup
from diloco.transports.grpc.coordinator import Coordinator
from tests.unit import test_grpc_coordinator as coordinator_tests

MIB = 1 << 20
HYPER = OuterHyperparams()


def resident_kb(path: Path) -> int:
    """How much of the mapping of `path` is in this process's resident set (/proc/self/smaps)."""
    try:
        smaps = Path("/proc/self/smaps").read_text()
    except OSError:
        pytest.skip("no /proc/self/smaps")
    blocks = re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", smaps)
    mapping = [block for block in blocks if block.split("\n", 1)[0].endswith(str(path))]
    assert len(mapping) == 1
    return int(re.search(r"^Rss:\s+(\d+) kB", mapping[0], re.MULTILINE).group(1))  # type: ignore[union-attr]


def file_floats(path: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.float32)


def test_a_released_vector_keeps_its_values_and_leaves_memory(tmp_path: Path) -> None:
    path = tmp_path / "momentum.f32"
    vector = FileVector(path, 16 * MIB // 4)
    assert resident_kb(path) == 0
    vector.tensor.copy_(torch.arange(vector.numel, dtype=torch.float32))
    assert resident_kb(path) == 16 * 1024  # written: resident
    vector.release(0, vector.numel // 2)
    assert resident_kb(path) == 8 * 1024
    vector.release()
    assert resident_kb(path) == 0  # released: on the disk only
    assert torch.equal(vector.tensor, torch.arange(vector.numel, dtype=torch.float32))
    assert torch.equal(file_floats(path), vector.tensor)


def test_a_released_range_keeps_the_rest_and_a_partial_page_is_not_lost(tmp_path: Path) -> None:
    vector = FileVector(tmp_path / "v.f32", 5000)  # not a whole number of pages
    vector.tensor.copy_(torch.linspace(-1, 1, 5000))
    vector.release(1000, 1003)  # inside one page: the whole page goes back to the file
    vector.release(4990)
    assert torch.equal(vector.tensor, torch.linspace(-1, 1, 5000))


def test_slices_cover_every_element_once() -> None:
    assert list(offload.slices(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(offload.slices(0, 4)) == []
    assert offload.SLICE % STEP_CHUNK == 0  # slice-wise steps take the whole step's chunks


def _island_pair(
    numel: int, folder: Path | None, rounds: int, seed: int = 0
) -> tuple[list[str], list[OuterSync]]:
    """Two islands over the local transport for `rounds` rounds; the hashes after each round."""
    group = LocalGroup(2, NoneCodec(), numel, timeout_s=20.0)
    torch.manual_seed(seed)
    start = torch.randn(numel)
    syncs, nets = [], []
    for rank in range(2):
        net = nn.ParameterList([nn.Parameter(start.clone())])
        outer = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)
        where = None if folder is None else folder / f"island-{rank}"
        syncs.append(
            OuterSync(net.parameters(), group.transport(rank), NoneCodec(), outer, HYPER, where)
        )
        nets.append(net)
    hashes = []
    for round in range(rounds):
        for rank, net in enumerate(nets):
            gen = torch.Generator().manual_seed(100 * round + rank)
            with torch.no_grad():
                net[0].add_(torch.randn(numel, generator=gen) * 0.01)
        results = _sync_both(syncs)
        assert results[0].params_sha256 == results[1].params_sha256
        hashes.append(results[0].params_sha256)
    return hashes, syncs


def _sync_both(syncs: list[OuterSync]) -> list:
    import threading

    results: list = [None, None]

    def run(rank: int) -> None:
        results[rank] = syncs[rank].sync(10.0 + rank)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_islands_with_the_state_on_disk_end_bit_identical_to_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several slices (one partial), three rounds: every hash, and the momentum, equal."""
    monkeypatch.setattr(offload, "SLICE", 2 * STEP_CHUNK)
    numel = 5 * STEP_CHUNK + 123
    in_memory, memory_syncs = _island_pair(numel, None, rounds=3)
    on_disk, disk_syncs = _island_pair(numel, tmp_path, rounds=3)
    assert on_disk == in_memory
    assert resident_kb(tmp_path / "island-0" / "momentum.f32") == 0  # stepped a slice at a time
    momentum = disk_syncs[0].outer_state["momentum"]
    assert torch.equal(momentum, memory_syncs[0].outer_state["momentum"])
    assert torch.equal(file_floats(tmp_path / "island-0" / "momentum.f32")[:numel], momentum)


def test_a_checkpoint_of_an_offloaded_island_round_trips(tmp_path: Path) -> None:
    _, syncs = _island_pair(1000, tmp_path / "a", rounds=2)
    state = syncs[0].state_dict()
    saved, held = state["outer_state"]["momentum"], syncs[0].outer_state["momentum"]
    assert saved.data_ptr() != held.data_ptr()  # a copy in memory, not the file's mapping
    _, fresh = _island_pair(1000, tmp_path / "b", rounds=0, seed=1)
    fresh[0].load_state_dict(state)
    assert torch.equal(fresh[0].outer_state["momentum"], state["outer_state"]["momentum"])
    assert fresh[0].params_sha256() == syncs[0].params_sha256()
    assert fresh[0].round == 2


def test_an_optimizer_with_scalar_state_cannot_keep_it_on_disk(tmp_path: Path) -> None:
    net = nn.Linear(3, 2)
    transport = LocalGroup(1, NoneCodec(), 8, timeout_s=5.0).transport(0)
    adam = adam_outer(lr=0.1, betas=[0.9, 0.99], eps=1e-8)
    with pytest.raises(ValueError, match="sgd only, not adam"):
        OuterSync(net.parameters(), transport, NoneCodec(), adam, OuterHyperparams(), tmp_path)


def test_scalars_of_a_state_stay_in_memory(tmp_path: Path) -> None:
    state = {"momentum": torch.ones(10), "step": torch.tensor(3.0)}
    kept = OffloadedState(tmp_path, state, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["momentum.f32"]
    assert float(state["step"]) == 3.0 and torch.equal(state["momentum"], torch.ones(10))
    assert kept.copies()["momentum"].data_ptr() != state["momentum"].data_ptr()


# -- the grpc coordinator's state keeper --------------------------------------------------------


def _offloading_coordinator(state_dir: Path) -> Coordinator:
    return Coordinator(
        coordinator_tests.make_rules(),
        build_codec("none"),
        coordinator_tests.SGD,
        pinned=coordinator_tests.PINNED,
        state_dir=state_dir,
        offload_state=True,
        clock=coordinator_tests.FakeClock(),
    )


def _joined(coordinator: Coordinator) -> Coordinator:
    for rank in range(coordinator.rules.islands):
        coordinator.join(rank, "run-a", coordinator_tests.FINGERPRINT, "", f"host-{rank}")
    assert coordinator.seed(0, coordinator_tests.initial_state())
    return coordinator


def test_a_coordinator_with_its_state_on_disk_steps_saves_serves_and_restores_the_same_bits(
    tmp_path: Path,
) -> None:
    run = coordinator_tests.run_round
    in_memory, _ = coordinator_tests.make_group(state_dir=tmp_path / "memory")
    on_disk = _joined(_offloading_coordinator(tmp_path / "disk"))
    momentum_file = tmp_path / "disk" / "outer-state" / "momentum.f32"
    for round in range(3):
        weights = [1.0, 2.0, 3.0 + round]
        answers = run(in_memory, [0, 1, 2], coordinator_tests.deltas_for(round), weights)
        disk_answers = run(on_disk, [0, 1, 2], coordinator_tests.deltas_for(round), weights)
        assert torch.equal(answers[0].mean_payload, disk_answers[0].mean_payload)
        on_disk.flush()
        assert resident_kb(momentum_file) == 0  # stepped a slice at a time, then saved
        assert on_disk.state_sha256() == in_memory.state_sha256()
    expected = coordinator_tests.state_of(in_memory)
    assert torch.equal(
        coordinator_tests.state_of(on_disk).outer_state["momentum"],
        expected.outer_state["momentum"],
    )
    downloaded = on_disk.download()
    assert downloaded is not None
    served = b"".join(downloaded[2])
    assert resident_kb(momentum_file) == 0  # the download dropped what it read
    assert served == b"".join(in_memory.download()[2])  # type: ignore[index]

    restarted = _offloading_coordinator(tmp_path / "disk")  # its files start again from the save
    assert restarted.round == 3 and restarted.state_sha256() == in_memory.state_sha256()
    restored = coordinator_tests.state_of(restarted).outer_state["momentum"]
    assert torch.equal(restored, expected.outer_state["momentum"])


def test_a_coordinator_keeps_its_state_on_disk_in_its_folder_only() -> None:
    with pytest.raises(ValueError, match="state folder"):
        Coordinator(
            coordinator_tests.make_rules(),
            build_codec("none"),
            coordinator_tests.SGD,
            pinned={},
            state_dir=None,
            offload_state=True,
        )


def test_a_disk_without_room_for_the_state_is_said_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's blocks are reserved when it is made: a full disk fails there, naming the
    file and the key, not with a SIGBUS mid-round."""
    import errno
    import os

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"outer.offload_state.*No space left") as raised:
        FileVector(tmp_path / "momentum.f32", 1 << 20)
    assert "momentum.f32" in str(raised.value) and "4 MiB" in str(raised.value)
