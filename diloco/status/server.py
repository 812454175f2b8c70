"""The read-only status server: `GET /status.json` (the snapshot) and `GET /` (the page).

Standard library only (`http.server`), built so that it can never change the run nor slow it:

- **Read-only.** GET and HEAD on two paths; other methods get 405, other paths 404. It holds
  a function that builds a snapshot, nothing else of the run.
- **Bounded.** A fixed pool of worker threads takes connections from a bounded queue
  (connections beyond it are closed unanswered); one request per connection; the request line
  and headers may take at most `REQUEST_HEAD_BYTES` and the whole request `request_timeout_s`
  (a client that trickles bytes, "slowloris", is dropped at that deadline); the snapshot is
  built at most once per `cache_s` and the same bytes are served to every reader meanwhile,
  so 50 concurrent readers cost the coordinator one build; and connections are accepted at
  most `max_requests_per_s` a second (after a burst), so a flood of readers cannot take the
  Python interpreter (its GIL) from the coordinator's rounds.
- **Access policy.** It binds loopback by default (the config's example is
  `127.0.0.1:8080`), where it needs no token: only this machine reaches it, and an operator
  elsewhere uses an SSH tunnel, which authenticates them. A non-loopback `listen` is refused
  unless the run token is given; `/status.json` then requires `Authorization: Bearer <token>`
  (compared with `hmac.compare_digest`, in constant time), because the document reveals
  hosts, losses and the run's progress to anyone who can reach the port. Serving it open on
  a public address would publish them; requiring the token there costs an operator one
  header. The page `/` itself carries no data (it is the same static file for every run), so
  it is served without the token and a browser can open it; its script reads the token from
  the URL fragment (`#token=...`, which browsers never send to a server) and sends it as the
  header. On a loopback bind, requests whose Host header is not a loopback name are refused
  (a DNS-rebinding web page cannot read the document through the operator's browser).
  The token is never logged nor written in any response. (The checks: `access.py`.)

Wiring: `StatusServer(config.transport.grpc.status_listen, tracker.snapshot, token=run_token)`
(`tracker.py`), `.start()` beside the coordinator, `.stop()` when it stops.
"""

from __future__ import annotations

import http.server
import io
import logging
import queue
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from diloco.errors import ConfigError, listen_error
from diloco.status.access import (
    LISTEN_KEY,
    BearerCheck,
    host_is_loopback,
    parse_listen,
    resolve_listen,
)
from diloco.status.bounds import REQUEST_HEAD_BYTES, DeadlineReader, SnapshotCache, Throttle
from diloco.status.page import StatusPage, load_page
from diloco.status.snapshot import StatusSnapshot

logger = logging.getLogger(__name__)

PENDING_CONNECTIONS = 128
"""Accepted connections waiting for a worker; more are closed unanswered."""
BURST_REQUESTS = 64
"""Connections accepted at once before `max_requests_per_s` applies."""


class _PooledHTTPServer(http.server.HTTPServer):
    """An HTTPServer whose requests run on a fixed pool of threads, not one thread each."""

    request_queue_size = PENDING_CONNECTIONS

    def __init__(
        self,
        family: socket.AddressFamily,
        address: tuple[str, int],
        *,
        workers: int,
        request_timeout_s: float,
        max_requests_per_s: float,
        answer: _Answers,
    ):
        self.address_family = family
        self._throttle = Throttle(max_requests_per_s, BURST_REQUESTS)
        self.request_timeout_s = request_timeout_s
        self.answers = answer
        self._pending: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue(
            PENDING_CONNECTIONS
        )
        super().__init__(address, _StatusHandler)
        self._workers = [
            threading.Thread(target=self._work, name=f"status-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's fully qualified name, a DNS query that
        # can hang on a closed network; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def get_request(self) -> tuple[socket.socket, Any]:
        # Throttled before accept(): connections past the rate wait in the kernel's backlog
        # (and past that, are refused by it) without costing this process any time, so a
        # flood of readers cannot take the interpreter from the coordinator's rounds.
        self._throttle.wait()
        return super().get_request()

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            self._pending.put_nowait((request, client_address))
        except queue.Full:
            logger.debug("status: %d connections waiting, dropping one", PENDING_CONNECTIONS)
            self.shutdown_request(request)

    def _work(self) -> None:
        while (item := self._pending.get()) is not None:
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A dropped client (timeout, oversize head, reset) is routine: not worth a traceback.
        logger.debug("status: connection from %s dropped", client_address, exc_info=True)

    def close_workers(self, timeout_s: float) -> None:
        while True:
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.shutdown_request(item[0])
        for _ in self._workers:
            self._pending.put(None)
        for worker in self._workers:
            worker.join(timeout_s)


@dataclass(frozen=True)
class _Answers:
    """What the handler serves; shared by every worker."""

    cache: SnapshotCache
    page: StatusPage
    bearer: BearerCheck
    loopback: bool


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    server: _PooledHTTPServer
    server_version = "diloco-status"
    sys_version = ""
    # One request per connection: a client cannot hold a worker across requests.
    protocol_version = "HTTP/1.0"

    def setup(self) -> None:
        super().setup()
        timeout_s = self.server.request_timeout_s
        self.rfile.close()
        raw = DeadlineReader(self.connection, time.monotonic() + timeout_s, REQUEST_HEAD_BYTES)
        self.rfile = io.BufferedReader(raw, buffer_size=1024)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _refuse_method(self) -> None:
        self._send(405, b"read-only: GET and HEAD only\n", "text/plain", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_method

    def _answer(self, *, send_body: bool) -> None:
        answers = self.server.answers
        path = urlsplit(self.path).path
        if answers.loopback and not host_is_loopback(self.headers.get("Host", "localhost")):
            self._send(403, b"this status server answers loopback names only\n", "text/plain")
        elif path == "/":
            headers = {"Content-Security-Policy": answers.page.content_security_policy}
            self._send(200, answers.page.html, "text/html; charset=utf-8", headers, send_body)
        elif path != "/status.json":
            self._send(404, b"not found: try / or /status.json\n", "text/plain")
        elif not answers.bearer.allows(self.headers.get("Authorization")):
            headers = {"WWW-Authenticate": 'Bearer realm="diloco status"'}
            self._send(401, b"the run token is required\n", "text/plain", headers)
        elif (body := answers.cache.get()) is None:
            self._send(503, b"status unavailable, try again\n", "text/plain")
        else:
            self._send(200, body, "application/json", None, send_body)

    def _send(
        self,
        code: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
        send_body: bool = True,
    ) -> None:
        # Writes get their own timeout: a client that stops reading is dropped too.
        self.connection.settimeout(self.server.request_timeout_s)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The standard error page quotes the request line back; this one says only the code.
        self.close_connection = True
        reason = self.responses.get(code, ("error",))[0]
        body = f"{code} {reason}\n".encode()
        self._send(code, body, "text/plain", None, getattr(self, "command", "") != "HEAD")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Method and path only: never the query string or headers, where a token could be.
        # (A request line that did not parse leaves no command or path.)
        path = urlsplit(getattr(self, "path", "")).path
        command = getattr(self, "command", None)
        logger.debug("status: %s %s %s -> %s", self.client_address[0], command, path, code)

    def log_error(self, format: str, *args: Any) -> None:
        logger.debug("status: %s: %s", self.client_address[0], format % args)


class StatusServer:
    """The status server; `start()` binds and serves in background threads, `stop()` ends it.

    Args:
        listen: `host:port`; port 0 picks a free one (read `.port` after `start()`).
        snapshot: builds the current snapshot; called at most once per `cache_s`, from the
            server's threads (it must be thread-safe).
        token: the run token; required when `listen` is not a loopback address.
        workers: threads answering requests.
        request_timeout_s: the most a connection may take to send its request, and to take
            each write of the answer.
        cache_s: how long one snapshot is served before the next is built.
        max_requests_per_s: connections accepted per second, on average (after a burst of
            `BURST_REQUESTS`); a page refreshing every 3 s costs 1/3.

    Raises:
        ConfigError: `listen` is malformed or does not resolve, or is not loopback and there
            is no token.
    """

    def __init__(
        self,
        listen: str,
        snapshot: Callable[[], StatusSnapshot],
        *,
        token: str | None = None,
        workers: int = 4,
        request_timeout_s: float = 5.0,
        cache_s: float = 0.5,
        max_requests_per_s: float = 20.0,
    ):
        self._listen = listen
        host, self._requested_port = parse_listen(listen)
        self._family, self._bind_host, self.loopback = resolve_listen(host, self._requested_port)
        if not self.loopback and not token:
            raise ConfigError(
                f"{LISTEN_KEY} {listen!r} is not a loopback address: serving the status there "
                "needs the run token, got none (or bind 127.0.0.1 and use an SSH tunnel)"
            )
        self.cache = SnapshotCache(snapshot, cache_s)
        bearer = BearerCheck(None if self.loopback else token)
        self._answers = _Answers(self.cache, load_page(), bearer, self.loopback)
        self._workers = workers
        self._request_timeout_s = request_timeout_s
        self._max_requests_per_s = max_requests_per_s
        self._server: _PooledHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "StatusServer.port is known once start() returned"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The page's URL, e.g. http://127.0.0.1:8080/ (IPv6 hosts in brackets)."""
        host = self._bind_host if self._family == socket.AF_INET else f"[{self._bind_host}]"
        return f"http://{host}:{self.port}/"

    @property
    def unauthorized_requests(self) -> int:
        """Requests for /status.json refused for a missing or wrong token."""
        return self._answers.bearer.refused

    def start(self) -> None:
        """Bind and serve.

        Raises:
            OSError: the address is taken or cannot be bound; ConfigError: it is not this
                machine's (both naming the key).
        """
        assert self._server is None, "StatusServer.start() called twice"
        try:
            self._server = _PooledHTTPServer(
                self._family,
                (self._bind_host, self._requested_port),
                workers=self._workers,
                request_timeout_s=self._request_timeout_s,
                max_requests_per_s=self._max_requests_per_s,
                answer=self._answers,
            )
        except OSError as error:
            raise listen_error(LISTEN_KEY, self._listen, error) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="status-server", daemon=True
        )
        self._thread.start()
        logger.info("status page on %s", self.url)

    def stop(self) -> None:
        """Stop accepting, close waiting connections, and end the workers (each ends its
        current request within `request_timeout_s`). Safe to call twice."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        thread.join()
        server.server_close()
        server.close_workers(timeout_s=self._request_timeout_s + 1.0)
        self._thread = None

    def __enter__(self) -> StatusServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
