"""A WSGI app on a real loopback HTTP server, for tests that must see the wire.

Flask's test client calls the app in-process, so it cannot show what a server
adds or takes away: ``wsgi.file_wrapper``, streamed bodies, a client that hangs
up, many requests at once, raw request lines no client library would send. The
tests that need those (serve mode, its parity with Flask, its security, the
connection pool) all start the app the same way -- here -- on a free port, and
the server is always shut down, even when the test fails.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
import wsgiref.simple_server
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from werkzeug.serving import make_server

HOST = "127.0.0.1"


@contextlib.contextmanager
def serving(app: Any) -> Iterator[int]:
    """``app`` behind werkzeug's threaded server on a free loopback port; yields the port."""
    with _running(make_server(HOST, 0, app, threaded=True)) as port:
        yield port


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving_with_wsgiref(app: Any) -> Iterator[int]:
    """``app`` behind wsgiref's server, which (unlike werkzeug's) offers ``wsgi.file_wrapper``."""
    with _running(wsgiref.simple_server.make_server(HOST, 0, app, handler_class=_QuietHandler)) as port:
        yield port


@contextlib.contextmanager
def _running(server: Any) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# -- a client that adds nothing ----------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def __getitem__(self, name: str) -> str | None:
        return self.headers.get(name)


def fetch(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Reply:
    """One request; unlike ``conn.request`` no ``Accept-Encoding`` is added unless given."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


def log_in(port: int, email: str = "alice@example.com") -> str:
    """Log in to the example app served on ``port``; the ``Cookie`` value for later requests."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        body = "email=" + email.replace("@", "%40")
        conn.request("POST", "/login", body, {"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    assert response.status == 302
    return response.headers["Set-Cookie"].split(";", 1)[0]


# -- what serve mode puts in front of an app ---------------------------------------------


def fallback_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Answers 404 with ``X-Fallback: 1``, so "fell through to the app" is visible on the wire."""
    body = b"fallback " + environ["REQUEST_METHOD"].encode()
    start_response("404 Not Found", [("X-Fallback", "1"), ("Content-Length", str(len(body)))])
    return [body]


def in_front(files: Any, app: Any = fallback_app) -> Any:
    """What the middleware does in serve mode: ask ``files`` (a StaticFiles), else the app."""

    def dispatch(environ: dict[str, Any], start_response: Any) -> Any:
        response = files(environ, start_response)
        return app(environ, start_response) if response is None else response

    return dispatch
