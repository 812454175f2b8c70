"""The data plane's bounded reads on a plain TCP socket (loopback): everything arrives however
it is split, and a stall, an early close or the deadline is reported with its reason."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from diloco.transports.dataplane import framing
from diloco.transports.dataplane.framing import StreamError, recv_exact_into

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=["wait-all", "python-timeouts"])
def pair(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(reader, writer): the two ends of one loopback TCP connection, read both ways (the
    kernel's MSG_WAITALL and SO_RCVTIMEO on Linux, Python's socket timeouts elsewhere)."""
    monkeypatch.setattr(framing, "_WAIT_ALL", request.param == "wait-all")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        writer = socket.create_connection(listener.getsockname()[:2])
        reader, _ = listener.accept()
    yield reader, writer
    reader.close()
    writer.close()


def read(
    reader: socket.socket, size: int, deadline_s: float = 20, inactivity_s: float = 5
) -> bytes:
    """`size` bytes through `recv_exact_into`, within `deadline_s` from now."""
    got = bytearray(size)
    deadline = time.monotonic() + deadline_s
    recv_exact_into(
        reader, memoryview(got), deadline=deadline, inactivity_s=inactivity_s, what="payload"
    )
    return bytes(got)


def in_background(work: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_a_payload_sent_in_bursts_arrives_whole(pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    payload = bytes(range(256)) * (40 << 10)  # 10 MiB: several of the reader's slices

    def send() -> None:
        for start in range(0, len(payload), 3 << 20):
            writer.sendall(payload[start : start + (3 << 20)])
            time.sleep(0.01)

    sender = in_background(send)
    got = read(reader, len(payload))
    sender.join()
    assert got == payload


def test_a_stream_that_stops_partway_is_stalled(pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    writer.sendall(b"x" * 1000)
    started = time.monotonic()
    with pytest.raises(StreamError, match="nothing for 0.2 s after 1000 of") as caught:
        read(reader, 10_000, inactivity_s=0.2)
    assert caught.value.reason == "stalled"
    assert time.monotonic() - started < 10  # within 2 x 0.2 s, not the 20 s deadline


def test_the_deadline_ends_a_slow_stream(pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    stop = threading.Event()

    def trickle() -> None:  # a byte every 50 ms: progress, but never the whole payload
        while not stop.is_set():
            writer.sendall(b"y")
            time.sleep(0.05)

    sender = in_background(trickle)
    with pytest.raises(StreamError) as caught:
        read(reader, 10_000, deadline_s=0.5)
    stop.set()
    sender.join()
    assert caught.value.reason == "deadline"


def test_a_stream_closed_early_is_broken(pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    writer.sendall(b"z" * 100)
    writer.close()
    with pytest.raises(StreamError, match="closed after 100 of 1000 bytes") as caught:
        read(reader, 1000)
    assert caught.value.reason == "broken"
