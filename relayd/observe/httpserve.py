"""The metrics listener: /metrics for Prometheus and the read-only status page at /.

Takes: HTTP requests on the metrics address (loopback by default); the
metrics registry; a reader for the status snapshot (asked on the daemon's
event loop through `relayd.observe.metrics.loop_reader`); optionally the one
user name and password of HTTP basic authentication.
Emits: the Prometheus exposition (prometheus_client's own WSGI app, so gzip
and the OpenMetrics format work as they always did), the status page as
HTML, 401 without valid credentials, 404 for any other path, 405 for any
method but GET and HEAD.
Untrusted input: every request. Bounded: at most `MAX_CONNECTIONS` served at
once (more are closed unanswered), `READ_TIMEOUT` seconds for each read of a
request, request lines and headers by http.server's own limits (64 KiB a
line, 100 headers); there is no request body to read. Basic credentials are
compared in constant time. A snapshot is reused for `PAGE_REUSE` seconds, so
reloading the page in a loop cannot keep the event loop walking the queue.
Fails: a status reader that does not answer serves a short "busy" page; the
scrape and the page never raise into the server thread.

With basic authentication configured, /metrics needs it as well: a listener
an operator protects is protected whole (Prometheus sends it with
`basic_auth:` in the scrape config).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import socket
import threading
import time
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import prometheus_client
from prometheus_client import CollectorRegistry

from relayd.config.secret import Secret
from relayd.observe.status import StatusReader, StatusSnapshot
from relayd.observe.statuspage import render_loading, render_page

MAX_CONNECTIONS = 16
READ_TIMEOUT = 10.0
PAGE_REUSE = 1.0  # seconds one snapshot answers every page load
REALM = "relayd"
_HTML_HEADERS = [
    ("Content-Type", "text/html; charset=utf-8"),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
]


@dataclass(frozen=True, slots=True)
class BasicAuth:
    """The one login of the metrics listener (a credential store entry)."""

    user: str
    password: Secret

    def admits(self, header: str | None) -> bool:
        """Whether an Authorization header carries this user and password."""
        if not header or not header[:6].lower() == "basic ":
            return False
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        user_ok = hmac.compare_digest(user, self.user.encode())
        password_ok = hmac.compare_digest(password, self.password.reveal().encode())
        return bool(sep) and user_ok and password_ok


class ObserveApp:
    """The WSGI application of the metrics listener."""

    def __init__(
        self,
        registry: CollectorRegistry,
        status: StatusReader,
        hostname: Callable[[], str],
        auth: BasicAuth | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics: WSGIApplication = prometheus_client.make_wsgi_app(registry)
        self._status = status
        self._hostname = hostname
        self.auth = auth  # replaced whole on reload
        self._clock = clock
        self._lock = threading.Lock()
        self._last: tuple[float, StatusSnapshot] | None = None

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", "read-only: GET or HEAD\n",
                          [("Allow", "GET, HEAD")])
        auth = self.auth
        if auth is not None and not auth.admits(environ.get("HTTP_AUTHORIZATION")):
            return _plain(start_response, "401 Unauthorized", "authentication required\n",
                          [("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')])
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return self._metrics(environ, start_response)
        if path in ("/", "/status"):
            return self._page(start_response, method)
        return _plain(start_response, "404 Not Found", "not found: try /metrics or /\n")

    def _snapshot(self) -> StatusSnapshot | None:
        with self._lock:  # one request at a time asks the event loop; the others reuse its answer
            now = self._clock()
            if self._last is not None and now - self._last[0] < PAGE_REUSE:
                return self._last[1]
            snapshot = self._status()
            self._last = (now, snapshot) if snapshot is not None else None
            return snapshot

    def _page(self, start_response: StartResponse, method: str) -> Iterable[bytes]:
        snapshot = self._snapshot()
        body = (render_page(snapshot) if snapshot is not None else render_loading(self._hostname())).encode()
        start_response("200 OK", [*_HTML_HEADERS, ("Content-Length", str(len(body)))])
        return [b""] if method == "HEAD" else [body]


def _plain(start_response: StartResponse, status: str, text: str,
           extra: list[tuple[str, str]] | None = None) -> Iterable[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *(extra or [])])
    return [body]


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr (the daemon's stderr is its log), and a bounded wait for each read."""

    timeout = READ_TIMEOUT

    def log_message(self, format: str, *args: object) -> None:
        return None


_Request = socket.socket | tuple[bytes, socket.socket]


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per request, at most `MAX_CONNECTIONS` at once; past that a connection is closed."""

    daemon_threads = True
    connection_slots = threading.BoundedSemaphore(MAX_CONNECTIONS)  # replaced per server class

    def process_request(self, request: _Request, client_address: object) -> None:
        if not self.connection_slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connection_slots.release()  # no thread started: it cannot give the slot back
            raise

    def process_request_thread(self, request: _Request, client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connection_slots.release()


def _server_class(address: str, max_connections: int) -> type[_BoundedServer]:
    """A server class of its own for each server: its own address family and its own slots."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET

    class Server(_BoundedServer):
        address_family = family
        connection_slots = threading.BoundedSemaphore(max_connections)

    return Server


def start_observe_server(
    address: str, port: int, app: WSGIApplication, *,
    max_connections: int = MAX_CONNECTIONS, read_timeout: float = READ_TIMEOUT,
) -> tuple[WSGIServer, threading.Thread]:
    """Serve `app` on `address`:`port` (0 picks a free port) from a daemon thread.

    Stop it with ``server.shutdown(); server.server_close()``. `address` is an
    IP literal (the config insists), never looked up in DNS.
    """

    class Handler(_QuietHandler):
        timeout = read_timeout

    server = make_server(address, port, app, _server_class(address, max_connections), Handler)
    thread = threading.Thread(target=server.serve_forever, name="relayd-metrics", daemon=True)
    thread.start()
    return server, thread
