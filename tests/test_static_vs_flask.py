"""Serve mode agrees with Flask's own static view, and keeps assets out of Flask entirely.

Two identical Flask apps serve the same folders (app static, a blueprint
static, a dynamic view shadowing ``/static/config.js``) on two real servers:
one plain, one wrapped in ``IdentityMiddleware(serve_static=True)``. For the
same request headers -- validators taken from each server's own previous
answer, since ETag values differ on purpose -- status and body must agree.
Each deliberate difference listed in ``identity_middleware/static.py`` has a
test of its own stating both answers. The end-to-end test drives the example
app logged in and counts SQL statements and Flask requests for the assets.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

import pytest
from conftest import count_sql
from flask import Blueprint, Flask, request_started

from identity_middleware import IdentityMiddleware, static_safe
from servers import Reply, fetch, log_in, serving

CSS = b"".join(b".parity-%04d { margin: 0; }\n" % i for i in range(100))
BIG = bytes(range(251)) * 5000  # > 64 KiB: streamed from disk
MTIME = 1_650_000_000


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    os.utime(path, (MTIME, MTIME))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = str(tmp_path_factory.mktemp("parity"))
    static, widgets = os.path.join(root, "static"), os.path.join(root, "widgets", "static")
    for name, data in {
        "app.css": CSS,
        "app.js": b"console.log('parity');\n" * 50,
        "app.js.gz": b"\x1f\x8b not really gzip",
        "big.bin": BIG,
        "empty.txt": b"",
        "sub/x.txt": b"x",
        "caf\u00e9.css": "/* caf\u00e9 */".encode(),
        ".env": b"DOT=1",
        "config.js": b"the file under the dynamic view",
    }.items():
        _write(os.path.join(static, name), data)
    _write(os.path.join(widgets, "widget.css"), b".widget { color: red; }")
    return static, widgets


def make_app(folders: tuple[str, str], **config: Any) -> Flask:
    static, widgets = folders
    app = Flask("parity", static_folder=static, static_url_path="/static")
    app.config.update(config)
    app.register_blueprint(Blueprint("widgets", "parity", static_folder=widgets, url_prefix="/widgets"))

    @app.get("/static/config.js")
    def config_js() -> str:
        return "dynamic"

    return app


@dataclass
class Pair:
    """The same app twice: plain Flask, and Flask behind serve mode."""

    flask: int
    served: int
    flask_requests: list[str]  # paths that entered the served app's Flask

    def both(
        self, path: str, headers: Callable[[Reply], dict[str, str]] | None = None, method: str = "GET"
    ) -> list[Reply]:
        """Ask both servers; ``headers`` is built from each server's own plain GET of ``path``."""
        replies = []
        for port in (self.flask, self.served):
            extra = headers(fetch(port, path)) if headers else {}
            replies.append(fetch(port, path, extra, method))
        return replies


@contextlib.contextmanager
def pair_of(folders: tuple[str, str], **config: Any) -> Iterator[Pair]:
    plain, served = make_app(folders, **config), make_app(folders, **config)
    served.wsgi_app = IdentityMiddleware(served.wsgi_app, serve_static=True)  # type: ignore[method-assign]
    entered: list[str] = []

    @static_safe  # the probe itself must not keep the mounts from being served before Flask
    def started(sender: Flask, **extra: Any) -> None:
        from flask import request

        entered.append(request.path)

    request_started.connect(started, served)
    try:
        with serving(plain) as flask_port, serving(served) as served_port:
            yield Pair(flask_port, served_port, entered)
    finally:
        request_started.disconnect(started, served)


@pytest.fixture(scope="module")
def pair(folders: tuple[str, str]) -> Iterator[Pair]:
    with pair_of(folders, SEND_FILE_MAX_AGE_DEFAULT=3600) as both:
        yield both


def _fixed(headers: dict[str, str]) -> Callable[[Reply], dict[str, str]]:
    return lambda first: headers


def _if_none_match(first: Reply) -> dict[str, str]:
    return {"If-None-Match": first["ETag"] or ""}


def _if_modified_since(first: Reply) -> dict[str, str]:
    return {"If-Modified-Since": first["Last-Modified"] or ""}


PARITY = [
    ("/static/app.css", None, "GET"),
    ("/static/app.css", None, "HEAD"),
    ("/static/app.js", None, "GET"),
    ("/static/app.js.gz", None, "GET"),
    ("/static/big.bin", None, "GET"),
    ("/static/empty.txt", None, "GET"),
    ("/static/sub/x.txt", None, "GET"),
    ("/static/caf%C3%A9.css", None, "GET"),
    ("/widgets/static/widget.css", None, "GET"),
    ("/static/app.css", _if_none_match, "GET"),
    ("/static/app.css", _if_none_match, "HEAD"),
    ("/static/app.css", lambda r: {"If-None-Match": "W/" + (r["ETag"] or "")}, "GET"),
    ("/static/app.css", lambda r: {"If-None-Match": '"a", ' + (r["ETag"] or "") + ', "b"'}, "GET"),
    ("/static/app.css", _fixed({"If-None-Match": "*"}), "GET"),
    ("/static/app.css", _fixed({"If-None-Match": '"other"'}), "GET"),
    ("/static/app.css", _if_modified_since, "GET"),
    ("/static/app.css", _fixed({"If-Modified-Since": formatdate(MTIME - 10, usegmt=True)}), "GET"),
    ("/static/big.bin", _if_none_match, "GET"),
    ("/static/app.css", _fixed({"Range": "bytes=0-0"}), "GET"),
    ("/static/app.css", _fixed({"Range": "bytes=0-99"}), "GET"),
    ("/static/app.css", _fixed({"Range": "bytes=100-"}), "GET"),
    ("/static/app.css", _fixed({"Range": "bytes=-10"}), "GET"),
    ("/static/app.css", _fixed({"Range": "bytes=2000-999999"}), "GET"),
    ("/static/big.bin", _fixed({"Range": "bytes=70000-170000"}), "GET"),
    ("/static/big.bin", _fixed({"Range": "bytes=-3"}), "GET"),
    ("/static/empty.txt", _fixed({"Range": "bytes=0-0"}), "GET"),
    ("/static/app.css", lambda r: {"Range": "bytes=5-9", "If-Range": r["ETag"] or ""}, "GET"),
    ("/static/app.css", _fixed({"Range": "bytes=5-9", "If-Range": '"old"'}), "GET"),
    ("/static/app.css", lambda r: {"Range": "bytes=5-9", "If-Range": r["Last-Modified"] or ""}, "GET"),
    # not answered by serve mode: Flask decides in both
    ("/static/missing.css", None, "GET"),
    ("/static/.env", None, "GET"),
    ("/static/config.js", None, "GET"),
    ("/static/app.css", None, "POST"),
    ("/static/app.css", None, "OPTIONS"),
    # preconditions, each server's own tag
    ("/static/app.css", lambda r: {"If-Match": r["ETag"] or ""}, "GET"),
    ("/static/big.bin", lambda r: {"If-Match": r["ETag"] or ""}, "GET"),
    ("/static/app.css", _fixed({"If-Unmodified-Since": formatdate(MTIME, usegmt=True)}), "GET"),
]

COMPARED_HEADERS = (
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Content-Encoding",
    "Last-Modified",
    "Cache-Control",
    "Accept-Ranges",
)


@pytest.mark.parametrize(
    "path, headers, method", PARITY, ids=[f"{m} {p} #{i}" for i, (p, _, m) in enumerate(PARITY)]
)
def test_status_body_and_headers_agree_with_flask(pair: Pair, path: str, headers: Any, method: str) -> None:
    flask, served = pair.both(path, headers, method)
    assert served.status == flask.status
    assert served.body == flask.body
    for name in COMPARED_HEADERS:
        if flask.status == 304 and name in ("Content-Type", "Content-Length", "Last-Modified", "Accept-Ranges"):
            continue  # a 304 carries only what caches need (RFC 9110 section 15.4.5)
        if name == "Accept-Ranges" and flask[name] is None and served[name] == "bytes":
            continue  # Werkzeug < 3.1.7 answers ranges without saying so; serve mode says so
        assert served[name] == flask[name], name
    assert (served["ETag"] is None) == (flask["ETag"] is None)


def test_the_served_answers_never_entered_flask(pair: Pair) -> None:
    pair.flask_requests.clear()
    for path in ("/static/app.css", "/static/big.bin", "/widgets/static/widget.css", "/static/caf%C3%A9.css"):
        assert fetch(pair.served, path).status == 200
    assert fetch(pair.served, "/static/app.css", {"Range": "bytes=0-0"}).status == 206
    assert pair.flask_requests == []
    fetch(pair.served, "/static/config.js")
    fetch(pair.served, "/static/missing.css")
    assert pair.flask_requests == ["/static/config.js", "/static/missing.css"]


@pytest.mark.parametrize("max_age", [None, 0, 60, 3600])
def test_cache_control_agrees_with_flask_for_send_file_max_age_default(
    folders: tuple[str, str], max_age: int | None
) -> None:
    with pair_of(folders, SEND_FILE_MAX_AGE_DEFAULT=max_age) as both:
        for path in ("/static/app.css", "/widgets/static/widget.css", "/static/big.bin"):
            flask, served = both.both(path)
            assert served["Cache-Control"] == flask["Cache-Control"]
            assert both.flask_requests == []


def test_not_modified_carries_the_cache_headers_flask_sends(pair: Pair) -> None:
    flask, served = pair.both("/static/app.css", _if_none_match)
    assert served.status == flask.status == 304
    assert served["Cache-Control"] == flask["Cache-Control"]
    assert served["ETag"] and flask["ETag"]


# -- the deliberate differences, each stated ---------------------------------------------


def test_difference_etag_is_a_content_hash_not_flasks_mtime_tag(pair: Pair) -> None:
    flask, served = pair.both("/static/app.css")
    assert re.fullmatch(r'"[0-9a-f]{32}"', served["ETag"] or "")
    assert str(MTIME) in (flask["ETag"] or "")


def test_difference_no_expires_or_content_disposition(pair: Pair) -> None:
    flask, served = pair.both("/static/app.css")
    assert flask["Expires"] and flask["Content-Disposition"] == "inline; filename=app.css"
    assert served["Expires"] is None and served["Content-Disposition"] is None


def test_difference_if_none_match_beats_range(pair: Pair) -> None:
    flask, served = pair.both("/static/app.css", lambda r: {**_if_none_match(r), "Range": "bytes=0-0"})
    assert (flask.status, served.status) == (206, 304)


def test_difference_range_is_ignored_on_head(pair: Pair) -> None:
    flask, served = pair.both("/static/app.css", _fixed({"Range": "bytes=0-0"}), "HEAD")
    assert (flask.status, served.status) == (206, 200)


def test_difference_multiple_ranges_give_the_whole_file(pair: Pair) -> None:
    flask, served = pair.both("/static/app.css", _fixed({"Range": "bytes=0-1,5-6"}))
    assert (flask.status, served.status) == (416, 200) and served.body == CSS


def test_difference_unknown_range_unit_is_ignored(pair: Pair) -> None:
    flask, served = pair.both("/static/app.css", _fixed({"Range": "lines=0-1"}))
    assert (flask.status, served.status) == (416, 200)


def test_difference_suffix_longer_than_the_file_gives_the_whole_file(pair: Pair) -> None:
    flask, served = pair.both("/static/app.css", _fixed({"Range": "bytes=-999999"}))
    assert (flask.status, served.status) == (416, 206) and served.body == CSS


def test_difference_if_range_with_a_weak_tag_gives_the_whole_file(pair: Pair) -> None:
    weak_if_range = lambda r: {"Range": "bytes=0-0", "If-Range": "W/" + (r["ETag"] or "")}  # noqa: E731
    flask, served = pair.both("/static/app.css", weak_if_range)
    assert (flask.status, served.status) == (206, 200)


def test_difference_unsatisfiable_range_has_an_empty_body(pair: Pair) -> None:
    flask, served = pair.both("/static/app.css", _fixed({"Range": "bytes=99999-"}))
    assert flask.status == served.status == 416
    assert served["Content-Range"] == flask["Content-Range"] == f"bytes */{len(CSS)}"
    assert served.body == b"" and b"<title>" in flask.body


def test_difference_failed_if_match_gives_412_without_the_file(pair: Pair) -> None:
    flask, served = pair.both("/static/app.css", _fixed({"If-Match": '"other"'}))
    assert flask.status == served.status == 412
    assert served.body == b"" and flask.body == CSS


def test_difference_if_unmodified_since_is_evaluated(pair: Pair) -> None:
    headers = {"If-Unmodified-Since": formatdate(MTIME - 60, usegmt=True)}
    flask, served = pair.both("/static/app.css", _fixed(headers))
    assert (flask.status, served.status) == (200, 412)


def test_difference_a_precompressed_sibling_is_sent_when_accepted(pair: Pair) -> None:
    flask, served = pair.both("/static/app.js", _fixed({"Accept-Encoding": "gzip"}))
    assert flask["Content-Encoding"] is None and served["Content-Encoding"] == "gzip"
    assert served.body == b"\x1f\x8b not really gzip"


# -- end to end: the example app in serve mode --------------------------------------------


@pytest.mark.parametrize("serve_static", [True, False])
def test_logged_in_page_load_runs_no_sql_for_assets_and_skips_flask_in_serve_mode(
    sqlite_url: str, serve_static: bool
) -> None:
    from examples.app import create_app

    app = create_app(sqlite_url, cache=False, config={"IDENTITY_SERVE_STATIC": serve_static})
    stats = app.extensions["example"]
    entered: list[str] = []

    @static_safe  # the probe itself must not keep the mounts from being served before Flask
    def started(sender: Flask, **extra: Any) -> None:
        from flask import request

        entered.append(request.path)

    request_started.connect(started, app)
    try:
        with serving(app) as port:
            cookie = {"Cookie": log_in(port)}
            page = fetch(port, "/", cookie)
            assert page.status == 200 and b"admin" in page.body  # the user and roles were loaded
            assets = re.findall(rb'(?:href|src)="(/[^"]+)"', page.body)
            static_assets = [a.decode() for a in assets if b"/static/" in a]
            assert len(static_assets) == 3
            entered.clear()
            loads_before = stats.loader_calls
            with count_sql(stats.engine) as statements:
                replies = [fetch(port, path, cookie) for path in static_assets]
            assert [r.status for r in replies] == [200, 200, 200]
            assert statements == [] and stats.loader_calls == loads_before
            for reply in replies:
                assert reply["Set-Cookie"] is None and "Cookie" not in (reply["Vary"] or "")
            if serve_static:
                assert entered == []  # answered before Flask
            else:
                assert sorted(entered) == sorted(static_assets)  # Flask ran, identity skipped
    finally:
        request_started.disconnect(started, app)
