"""The transport conformance suite's tests, run on hivemind groups (tests/conformance/
hivemind_group.py), until the suite lists hivemind among its kinds.

The suite's own test functions are imported and run here against a `group` fixture of
hivemind islands; the two byte-count tests are restated with the per-island multiset that
hivemind documents (one island reduces a small vector: `hivemind_wire_bytes`), the change the
suite needs to take hivemind in.
"""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("hivemind")

import torch  # noqa: E402
from conformance.hivemind_group import (  # noqa: E402
    hivemind_another_model,
    hivemind_wire_bytes,
    hivemind_wrong_round,
    run_hivemind_group,
)
from conformance.test_transport import (  # noqa: E402
    ADAM,
    NUMEL,
    PLAN,
    RANDOM_ROUNDS,
    Fp16Codec,
    Group,
    GroupKind,
    _mean,
    _own_newest,
    test_a_mean_never_mixes_rounds,
    test_an_injected_outer_optimizer_gives_the_same_anchor_everywhere,
    test_islands_with_another_model_are_refused_at_join,
    test_join_answers_the_round_to_resume_from,
    test_mean_is_bit_identical_on_every_island,
    test_mean_is_the_weighted_mean,
)

from diloco.codecs import NoneCodec  # noqa: E402
from diloco.outer.optimizers import SgdOuter  # noqa: E402
from diloco.shared_state import OuterOptimizer  # noqa: E402

pytestmark = pytest.mark.slow

__all__ = [  # the suite's tests, collected here with this module's `group`
    "test_a_mean_never_mixes_rounds",
    "test_an_injected_outer_optimizer_gives_the_same_anchor_everywhere",
    "test_islands_with_another_model_are_refused_at_join",
    "test_join_answers_the_round_to_resume_from",
    "test_mean_is_bit_identical_on_every_island",
    "test_mean_is_the_weighted_mean",
]


def hivemind_optimizer(name: str) -> OuterOptimizer:
    """The suite's outer optimizer per plan entry (module level: the islands unpickle it)."""
    return ADAM if name == "outer optimizer" else SgdOuter(lr=0.7, momentum=0.9, nesterov=True)


HIVEMIND = GroupKind(
    functools.partial(run_hivemind_group, numel=NUMEL, optimizer_for=hivemind_optimizer),
    hivemind_wire_bytes,  # type: ignore[arg-type]  # a multiset: see the module docstring
    _own_newest,
    hivemind_wrong_round,
    hivemind_another_model,
    reencodes_mean=True,
)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"hivemind-{n}")
def group(request: pytest.FixtureRequest) -> Group:
    return Group(HIVEMIND, request.param, HIVEMIND.run(request.param, PLAN))


@pytest.mark.timeout(180)
def test_participants_and_bytes(group: Group) -> None:
    """participants is N; the islands' (bytes_sent, bytes_received) are, in some order, what
    hivemind documents for the fp32 payload, every round."""
    codec = NoneCodec()
    payload_bytes = codec.payload_bytes(NUMEL)
    expected = hivemind_wire_bytes(codec, payload_bytes, group.num_islands)
    for round in range(RANDOM_ROUNDS + 1):
        seen = [island[round] for island in group.seen("none")]
        assert all(s["payload_bytes"] == payload_bytes for s in seen)
        assert all(s["participants"] == group.num_islands for s in seen)
        assert sorted((s["bytes_sent"], s["bytes_received"]) for s in seen) == expected


@pytest.mark.timeout(180)
def test_user_codec_without_inheritance(group: Group) -> None:
    """The suite's user codec (fp16, no header, no base class): the mean is weighted_mean of
    the decoded payloads re-encoded by the codec, identical everywhere, with the documented
    byte counts."""
    codec = Fp16Codec()
    per_island = group.seen("user codec")
    expected_bytes = hivemind_wire_bytes(codec, codec.payload_bytes(NUMEL), group.num_islands)
    for round in range(2):
        seen = [island[round] for island in per_island]
        expected = group.expected_mean(codec, round)
        for island, answer in enumerate(seen):
            assert torch.equal(_mean(answer), expected), f"island {island} round {round}"
            assert answer["participants"] == group.num_islands
        assert sorted((s["bytes_sent"], s["bytes_received"]) for s in seen) == expected_bytes
