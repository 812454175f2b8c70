"""Data-plane tickets: HMAC-SHA256 under a key derived from the run token, one use each."""

from __future__ import annotations

import dataclasses

import pytest

from diloco.errors import ConfigError
from diloco.transports.dataplane.config import DataPlaneConfig
from diloco.transports.dataplane.tickets import (
    TICKET_BYTES,
    ReplayCache,
    Ticket,
    TicketFields,
    TicketRefused,
    derive_ticket_key,
    issue_ticket,
    new_ticket,
    verify_ticket,
)

pytestmark = pytest.mark.timeout(10)

TOKEN = "unit-token-0123456789abcdef"
RUN = "run-a"
KEY = derive_ticket_key(TOKEN, RUN)
NOW_S = 1_700_000_000.0
FIELDS = TicketFields(island=2, shard=1, fragment=3, round=41, attempt=0, payload_bytes=4_000_020)


def _ticket(fields: TicketFields = FIELDS, expires_s: float = NOW_S + 60) -> Ticket:
    return issue_ticket(
        KEY, RUN, fields, expires_unix_ms=int(expires_s * 1000), ticket_id=bytes(range(16))
    )


def test_a_ticket_survives_its_wire_form_and_verifies() -> None:
    ticket = _ticket()
    raw = ticket.to_bytes()
    assert len(raw) == TICKET_BYTES
    parsed = Ticket.from_bytes(raw)
    assert parsed == ticket
    verify_ticket(KEY, RUN, parsed, now_unix_s=NOW_S)


def test_the_token_never_appears_in_the_key_or_on_the_wire() -> None:
    assert len(KEY) == 32
    wire = _ticket().to_bytes()
    assert TOKEN.encode() not in wire and TOKEN.encode() not in KEY
    assert derive_ticket_key(TOKEN, "run-b") != KEY
    assert derive_ticket_key(TOKEN + "x", RUN) != KEY


@pytest.mark.parametrize(
    "change",
    [
        {"island": 3},
        {"shard": 0},
        {"fragment": 0},
        {"round": 42},
        {"attempt": 1},
        {"payload_bytes": 4_000_021},
    ],
)
def test_a_ticket_with_any_field_changed_is_refused_as_forged(change: dict[str, int]) -> None:
    ticket = _ticket()
    altered = dataclasses.replace(ticket, fields=dataclasses.replace(FIELDS, **change))
    with pytest.raises(TicketRefused, match="MAC does not match") as caught:
        verify_ticket(KEY, RUN, Ticket.from_bytes(altered.to_bytes()), now_unix_s=NOW_S)
    assert caught.value.reason == "forged"


def test_a_later_expiry_a_flipped_mac_bit_or_another_id_is_forged() -> None:
    ticket = _ticket()
    mac = bytearray(ticket.mac)
    mac[5] ^= 1
    for altered in (
        dataclasses.replace(ticket, expires_unix_ms=ticket.expires_unix_ms + 1),
        dataclasses.replace(ticket, mac=bytes(mac)),
        dataclasses.replace(ticket, ticket_id=bytes(16)),
    ):
        with pytest.raises(TicketRefused) as caught:
            verify_ticket(KEY, RUN, altered, now_unix_s=NOW_S)
        assert caught.value.reason == "forged"


def test_a_ticket_of_another_run_or_token_is_forged() -> None:
    ticket = _ticket()
    for key, run in ((KEY, "run-b"), (derive_ticket_key("another-token-0123456", RUN), RUN)):
        with pytest.raises(TicketRefused) as caught:
            verify_ticket(key, run, ticket, now_unix_s=NOW_S)
        assert caught.value.reason == "forged"


def test_an_expired_ticket_is_refused_and_says_how_late() -> None:
    ticket = _ticket(expires_s=NOW_S - 2.5)
    with pytest.raises(TicketRefused, match=r"expired 2\.5 s ago") as caught:
        verify_ticket(KEY, RUN, ticket, now_unix_s=NOW_S)
    assert caught.value.reason == "expired"
    with pytest.raises(TicketRefused, match="expired"):  # expiry itself is already too late
        verify_ticket(KEY, RUN, _ticket(expires_s=NOW_S), now_unix_s=NOW_S)


def test_a_truncated_ticket_is_malformed() -> None:
    with pytest.raises(TicketRefused, match=f"a ticket has {TICKET_BYTES} bytes, got 10") as c:
        Ticket.from_bytes(b"0123456789")
    assert c.value.reason == "malformed"


def test_issue_refuses_fields_outside_their_wire_range() -> None:
    with pytest.raises(ValueError, match=r"island must be in \[0, 4294967296\), got -1"):
        issue_ticket(
            KEY, RUN, dataclasses.replace(FIELDS, island=-1), expires_unix_ms=1, ticket_id=bytes(16)
        )
    with pytest.raises(ValueError, match="a ticket id has 16 bytes, got 3"):
        issue_ticket(KEY, RUN, FIELDS, expires_unix_ms=1, ticket_id=b"abc")


def test_new_tickets_get_distinct_random_ids_and_a_future_expiry() -> None:
    first, second = new_ticket(KEY, RUN, FIELDS, 30.0), new_ticket(KEY, RUN, FIELDS, 30.0)
    assert first.ticket_id != second.ticket_id
    verify_ticket(KEY, RUN, first, now_unix_s=first.expires_unix_ms / 1000 - 29)


def test_a_used_ticket_is_refused_as_a_replay() -> None:
    cache, ticket = ReplayCache(8), _ticket()
    cache.claim(ticket, now_unix_s=NOW_S)
    with pytest.raises(TicketRefused, match="used before") as caught:
        cache.claim(ticket, now_unix_s=NOW_S + 1)
    assert caught.value.reason == "replayed"


def test_the_replay_cache_forgets_only_expired_ids_and_refuses_when_full() -> None:
    cache = ReplayCache(2)
    ids = [bytes([i]) * 16 for i in range(3)]
    tickets = [
        issue_ticket(KEY, RUN, FIELDS, expires_unix_ms=int((NOW_S + 10) * 1000), ticket_id=i)
        for i in ids
    ]
    cache.claim(tickets[0], now_unix_s=NOW_S)
    cache.claim(tickets[1], now_unix_s=NOW_S)
    with pytest.raises(TicketRefused) as caught:
        cache.claim(tickets[2], now_unix_s=NOW_S)
    assert caught.value.reason == "replay-cache-full"
    assert len(cache) == 2
    # Once the first two expired, their ids go and the third fits.
    cache.claim(tickets[2], now_unix_s=NOW_S + 11)
    assert len(cache) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_connections": 0}, "transport.grpc.dataplane.max_connections must be >= 1, got 0"),
        (
            {"max_pending": 200},
            "transport.grpc.dataplane.max_pending must be <= max_connections (128), got 200",
        ),
        ({"hello_timeout_s": 0.0}, "transport.grpc.dataplane.hello_timeout_s must be > 0"),
        ({"chunk_bytes": 10}, "transport.grpc.dataplane.chunk_bytes must be >= 4096, got 10"),
    ],
)
def test_config_errors_name_the_key(change: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        DataPlaneConfig(**change)  # type: ignore[arg-type]
    assert str(caught.value).startswith(message)
