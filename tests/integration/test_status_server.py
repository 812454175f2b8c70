"""The read-only status server on loopback: what it answers, what it refuses, and that it stays
bounded under many readers and slow clients (diloco/status/server.py)."""

from __future__ import annotations

import http.client
import re
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from status_fixtures import scripted_snapshot

from diloco.errors import ConfigError
from diloco.status import SnapshotCache, StatusServer, StatusSnapshot
from diloco.status.bounds import Throttle

TOKEN = "s3cret-run-token-0123456789abcdef"


class ScriptedSource:
    """The snapshot function a coordinator would pass, counting its calls."""

    def __init__(self, snapshot: StatusSnapshot | None = None):
        self.snapshot = snapshot or scripted_snapshot(2, 5)
        self.calls = 0
        self.fail = False
        self._lock = threading.Lock()

    def __call__(self) -> StatusSnapshot:
        with self._lock:
            self.calls += 1
        if self.fail:
            raise RuntimeError("the book is being restructured")
        return self.snapshot


def request(
    port: int,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.fixture
def source() -> ScriptedSource:
    return ScriptedSource()


@pytest.fixture
def server(source: ScriptedSource) -> Iterator[StatusServer]:
    with StatusServer("127.0.0.1:0", source, request_timeout_s=1.0) as running:
        yield running


def test_status_json_is_the_snapshot(server: StatusServer, source: ScriptedSource) -> None:
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/"
    status, headers, body = request(server.port, "/status.json")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert StatusSnapshot.from_json(body) == source.snapshot
    assert request(server.port, "/status.json?since=3")[2] == body  # queries are ignored


def test_page_is_html_without_any_external_asset(server: StatusServer) -> None:
    status, headers, body = request(server.port, "/")
    html = body.decode()
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert html.startswith("<!doctype html>")
    for anchor in ('id="islands"', 'id="plot-loss"', 'id="plot-rounds"', "status.json"):
        assert anchor in html
    # No stylesheet, script, image or font is fetched from anywhere: the only URL in the page
    # is the SVG namespace, an identifier that is never loaded.
    assert set(re.findall(r"(?:https?:)?//[\w.-]+[\w/.-]*", html)) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<(link|img|iframe|object|embed)\b|\bsrc=|@import|url\(", html)
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/]+=*'", policy)


def test_head_answers_headers_only(server: StatusServer) -> None:
    for path in ("/", "/status.json"):
        _, _, body = request(server.port, path)
        status, headers, head_body = request(server.port, path, method="HEAD")
        assert (status, head_body) == (200, b"")
        assert int(headers["Content-Length"]) == len(body)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_writes_are_refused(server: StatusServer, source: ScriptedSource, method: str) -> None:
    status, headers, _ = request(server.port, "/status.json", method=method, body=b"{}")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert StatusSnapshot.from_json(request(server.port, "/status.json")[2]) == source.snapshot


def test_malformed_requests_get_a_code_and_nothing_of_theirs_back(server: StatusServer) -> None:
    for head in (b"BREW /pot HTTP/1.0\r\n\r\n", b"GET /x?token=abc a b c\r\n\r\n"):
        connection = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        connection.sendall(head)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        connection.close()
        # (A request line that does not parse is answered as HTTP/0.9: a body, no headers.)
        assert answer.startswith((b"HTTP/1.0 501 ", b"400 Bad Request"))
        assert b"pot" not in answer and b"abc" not in answer and b"BREW" not in answer


def test_other_paths_are_not_found(server: StatusServer) -> None:
    for path in ("/status", "/../status.json", "/favicon.ico", "/status.json/x"):
        assert request(server.port, path)[0] == 404


def test_loopback_bind_refuses_foreign_host_names(server: StatusServer) -> None:
    # A page on another site that rebinds its name to 127.0.0.1 sends its own Host header.
    status, _, body = request(server.port, "/status.json", headers={"Host": "evil.example"})
    assert status == 403 and b"site-0" not in body
    for host in ("localhost", f"localhost:{server.port}", "127.0.0.1", "[::1]:80"):
        assert request(server.port, "/status.json", headers={"Host": host})[0] == 200


def test_a_failing_snapshot_answers_503_and_the_server_lives_on() -> None:
    source = ScriptedSource()
    source.fail = True
    with StatusServer("127.0.0.1:0", source, cache_s=0.05) as server:
        assert request(server.port, "/status.json")[0] == 503
        source.fail = False
        time.sleep(0.1)
        assert request(server.port, "/status.json")[0] == 200


def test_stop_closes_the_port(source: ScriptedSource) -> None:
    server = StatusServer("127.0.0.1:0", source)
    server.start()
    port = server.port
    server.stop()
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


# --- access policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("0.0.0.0:0", "is not a loopback address: serving the status there needs the run token"),
        ("8080", "must be host:port, got '8080'"),
        ("127.0.0.1:http", "must be host:port"),
        ("127.0.0.1:70000", "must be host:port"),
    ],
)
def test_bad_listen_addresses_are_config_errors(listen: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"transport.grpc.status_listen.*{re.escape(message)}"):
        StatusServer(listen, ScriptedSource())


def test_a_non_loopback_bind_requires_the_token_and_never_echoes_it(
    source: ScriptedSource,
) -> None:
    # Bound to every interface; this test only ever connects through 127.0.0.1.
    with StatusServer("0.0.0.0:0", source, token=TOKEN) as server:
        assert not server.loopback
        answers = [
            request(server.port, "/status.json"),
            request(server.port, "/status.json", headers={"Authorization": "Bearer wrong"}),
            request(server.port, "/status.json", headers={"Authorization": TOKEN}),
            request(server.port, "/status.json", headers={"Authorization": f"Basic {TOKEN}"}),
        ]
        assert [status for status, _, _ in answers] == [401, 401, 401, 401]
        assert answers[0][1]["WWW-Authenticate"].startswith("Bearer")
        assert all(b"site-0" not in body for _, _, body in answers)
        assert server.unauthorized_requests == 4

        good = request(server.port, "/status.json", headers={"Authorization": f"Bearer {TOKEN}"})
        assert good[0] == 200 and StatusSnapshot.from_json(good[2]) == source.snapshot
        page = request(server.port, "/")  # static, no data: a browser opens it without a header
        assert page[0] == 200 and b"site-0" not in page[2]
        # Any Host is fine off loopback: the token is the protection there.
        assert request(server.port, "/", headers={"Host": "coordinator.example"})[0] == 200
        for _, headers, body in [*answers, good, page]:
            assert TOKEN not in body.decode()
            assert all(TOKEN not in f"{k}: {v}" for k, v in headers.items())


def test_loopback_needs_no_token(source: ScriptedSource) -> None:
    with StatusServer("localhost:0", source, token=TOKEN) as server:
        assert server.loopback
        assert request(server.port, "/status.json")[0] == 200


# --- bounded ------------------------------------------------------------------------------


def test_fifty_concurrent_readers_cost_one_snapshot(source: ScriptedSource) -> None:
    readers = 50
    start = threading.Barrier(readers)
    bodies: list[bytes] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            start.wait(timeout=10)
            status, _, body = request(server.port, "/status.json")
            assert status == 200
            bodies.append(body)
        except BaseException as error:
            errors.append(error)

    # A cache longer than the test: every reader must be served from the one build.
    with StatusServer("127.0.0.1:0", source, workers=4, cache_s=60.0) as server:
        threads = [threading.Thread(target=read) for _ in range(readers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert not errors, errors[:3]
    assert len(bodies) == readers and len(set(bodies)) == 1
    assert source.calls == 1


def test_cache_builds_once_per_max_age() -> None:
    now = [0.0]
    source = ScriptedSource()
    cache = SnapshotCache(source, max_age_s=0.5, clock=lambda: now[0])
    for step in range(40):  # 4 s of readers, one every 0.1 s
        now[0] = 0.1 * step
        assert cache.get() is not None
    assert source.calls == cache.builds == 8


def test_throttle_allows_a_burst_then_the_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    throttle = Throttle(rate_per_s=20.0, burst=64, clock=lambda: now[0], sleep=sleep)
    for _ in range(64 + 40):
        throttle.wait()
    assert slept[:1] == [pytest.approx(0.05)] and len(slept) == 40
    assert now[0] == pytest.approx(40 / 20.0)  # past the burst: 20 connections a second
    now[0] += 100.0  # idle: the bucket refills to the burst, no more
    for _ in range(64):
        throttle.wait()
    assert len(slept) == 40
    throttle.wait()
    assert len(slept) == 41


def test_a_slow_client_is_dropped_at_the_deadline(server: StatusServer) -> None:
    # slowloris: a request line that never ends, one byte every 0.2 s, well within the 1 s
    # socket timeout: only a deadline on the whole request can drop it.
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    slow.sendall(b"GET /sta")
    closed_while_sending = False
    try:
        for _ in range(40):  # 8 s of trickle
            slow.sendall(b"t")
            readable, _, _ = select.select([slow], [], [], 0.2)
            if readable and slow.recv(1024) == b"":
                closed_while_sending = True
                break
    except (BrokenPipeError, ConnectionResetError):
        closed_while_sending = True
    finally:
        slow.close()
    assert closed_while_sending, "the server kept a connection that never finished its request"
    assert request(server.port, "/status.json")[0] == 200


def test_idle_connections_on_every_worker_do_not_stop_the_server(source: ScriptedSource) -> None:
    with StatusServer("127.0.0.1:0", source, workers=2, request_timeout_s=1.0) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
        try:
            assert request(server.port, "/status.json")[0] == 200
        finally:
            for connection in idle:
                connection.close()


def test_an_oversized_request_head_is_dropped(server: StatusServer) -> None:
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    head = b"GET /status.json HTTP/1.0\r\n" + b"X-Pad: " + b"a" * 20_000 + b"\r\n\r\n"
    answer = b""
    try:
        connection.sendall(head)
        while chunk := connection.recv(65536):
            answer += chunk
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        connection.close()
    assert b"site-0" not in answer and not answer.startswith(b"HTTP/1.0 200")
