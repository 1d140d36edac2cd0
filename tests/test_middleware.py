"""The middleware: which raw requests it marks, and what marking does to identity.

Requests are raw WSGI environs (``EnvironBuilder`` with ``PATH_INFO``
overwritten afterwards), because the test client normalises exactly the
paths we need to send. The app is the example app with the middleware and
without the user cache, so every identity load is a loader call and SQL.
"""

from __future__ import annotations

import logging
import os
import threading

import pytest
from conftest import count_sql
from flask import Blueprint, Flask, jsonify, request
from werkzeug.test import EnvironBuilder

from identity_middleware import ConfigError, IdentityMiddleware, is_static_request, static_safe
from identity_middleware.flask_hooks import MARK, MARKED_PATH, SAFE_ATTRIBUTE, StaticAwareSessionInterface


@pytest.fixture
def app(sqlite_url):
    from examples.app import create_app

    return create_app(sqlite_url, cache=False)


@pytest.fixture
def session_cookie(app) -> str:
    client = app.test_client()
    assert client.post("/login", data={"email": "alice@example.com"}).status_code == 302
    return client.get_cookie("session").value


def call(wsgi_app, environ: dict):
    """Call a WSGI app with this very environ dict (werkzeug's run_wsgi_app copies it)."""
    started: list = []

    def start_response(status, headers, exc_info=None):
        started[:] = [status, dict(headers)]

    app_iter = wsgi_app(environ, start_response)
    try:
        body = b"".join(app_iter)
    finally:
        getattr(app_iter, "close", lambda: None)()
    return started[0], started[1], body


def raw_request(app: Flask, path: str, method: str = "GET", cookie: str | None = None, query: str = ""):
    """Send ``path`` verbatim as PATH_INFO; return (environ, status, headers, body)."""
    headers = {"Cookie": f"session={cookie}"} if cookie else {}
    environ = EnvironBuilder(path="/", method=method, headers=headers).get_environ()
    environ["PATH_INFO"] = path.encode("utf-8").decode("latin-1")
    environ["QUERY_STRING"] = query
    status, response_headers, body = call(app, environ)
    return environ, status, response_headers, body


MARKED = [
    ("GET", "/static/app.css"),
    ("HEAD", "/static/app.css"),
    ("GET", "/static/app.js"),
    ("GET", "/widgets/static/widget.css"),
    ("HEAD", "/widgets/static/widget.css"),
    ("GET", "/favicon.ico"),
    ("HEAD", "/favicon.ico"),
]

NOT_MARKED = [
    ("GET", "/static-reports", ""),
    ("GET", "/staticx/a.css", ""),
    ("GET", "/STATIC/app.css", ""),
    ("GET", "/static//app.css", ""),
    ("GET", "/static/../admin/", ""),
    ("GET", "/static/./app.css", ""),
    ("GET", "/static/app.css\x00", ""),
    ("GET", "/static/..\\app.css", ""),
    ("GET", "/static\\app.css", ""),
    ("GET", "/static/config.js", ""),
    ("GET", "/files/evil.css", ""),
    ("GET", "/", "x=.css"),
    ("POST", "/static/app.css", ""),
    ("PUT", "/favicon.ico", ""),
    ("GET", "/favicon.ico.bak", ""),
]


@pytest.mark.parametrize(("method", "path"), MARKED)
def test_static_files_and_listed_paths_are_marked_and_load_no_identity(app, session_cookie, method, path):
    stats = app.extensions["example"]
    before = (stats.loader_calls, stats.identity_loaded_calls)
    with count_sql(stats.engine) as statements:
        environ, status, headers, body = raw_request(app, path, method, session_cookie)
    assert environ.get(MARK) is True and environ[MARKED_PATH] == environ["PATH_INFO"]
    assert status.startswith("200")
    assert (stats.loader_calls, stats.identity_loaded_calls) == before
    assert statements == []
    assert "Set-Cookie" not in headers
    assert "Cookie" not in headers.get("Vary", "")


@pytest.mark.parametrize(("method", "path", "query"), NOT_MARKED)
def test_hostile_dynamic_and_unsafe_requests_are_not_marked_and_load_identity(
    app, session_cookie, method, path, query
):
    stats = app.extensions["example"]
    before = stats.loader_calls
    with count_sql(stats.engine) as statements:
        environ, status, headers, body = raw_request(app, path, method, session_cookie, query)
    assert MARK not in environ
    assert stats.loader_calls == before + 1, status
    assert len(statements) >= 2  # the user and the roles


def test_shadowing_view_still_sees_the_logged_in_user(app, session_cookie):
    *_, body = raw_request(app, "/static/config.js", cookie=session_cookie)
    assert body == b'window.APP_USER = "alice@example.com";\n'
    *_, body = raw_request(app, "/files/evil.css", cookie=session_cookie)
    assert b"for alice@example.com" in body


def test_dynamic_page_still_loads_the_user_and_renders_roles(app, session_cookie):
    environ, status, headers, body = raw_request(app, "/", cookie=session_cookie)
    assert status.startswith("200")
    assert b'<span id="roles">admin, editor</span>' in body


# -- is_static_request -----------------------------------------------------------------


def test_is_static_request_reads_the_mark_from_an_environ_or_the_current_request(tmp_path):
    (tmp_path / "static").mkdir()
    app = Flask("mark", root_path=str(tmp_path))
    seen = []

    @app.get("/favicon.ico")
    def favicon():
        seen.append(is_static_request())
        return "icon"

    @app.get("/page")
    def page():
        seen.append(is_static_request())
        return "page"

    app.wsgi_app = IdentityMiddleware(app.wsgi_app, ["/favicon.ico"])
    client = app.test_client()
    client.get("/favicon.ico")
    client.get("/page")
    assert seen == [True, False]
    assert is_static_request() is False  # outside any request
    assert is_static_request({MARK: True, MARKED_PATH: "/a.css", "PATH_INFO": "/a.css"}) is True
    assert is_static_request({}) is False


def test_a_mark_whose_path_was_rewritten_inside_the_middleware_is_ignored(tmp_path):
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "app.css").write_text("body {}")
    app = Flask("rewrite", root_path=str(tmp_path))
    seen = []

    @app.get("/static/app.css/raw")
    def raw():
        seen.append(is_static_request())
        return "raw"

    flask_app = app.wsgi_app

    def add_suffix(environ, start_response):  # an inner middleware that rewrites the path
        environ["PATH_INFO"] += "/raw"
        return flask_app(environ, start_response)

    add_suffix.app = flask_app  # exposes the app, as many wrappers do
    app.wsgi_app = IdentityMiddleware(add_suffix)
    environ = EnvironBuilder(path="/static/app.css").get_environ()
    status, headers, body = call(app, environ)
    assert body == b"raw" and environ[MARK] is True
    assert seen == [False]  # Flask routes /static/app.css/raw: the mark does not apply to it


# -- wrapping ---------------------------------------------------------------------------


def _hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [repr(environ.get(MARK)).encode()]


def test_any_wsgi_callable_can_be_wrapped_and_only_listed_paths_are_marked(caplog):
    with caplog.at_level(logging.WARNING, logger="identity_middleware"):
        middleware = IdentityMiddleware(_hello, static_paths="/favicon.ico, /assets/")
    assert middleware.app is None
    assert middleware.listed == ("/favicon.ico", "/assets/")
    for path, expected in [("/favicon.ico", b"True"), ("/assets/a.js", b"True"), ("/static/app.css", b"None")]:
        environ = EnvironBuilder(path=path).get_environ()
        status, headers, body = call(middleware, environ)
        assert body == expected, path
    assert not middleware.explain("/static/app.css").marked
    # Said loudly, once, at construction: no app found, only listed paths, and the fix.
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "test_middleware._hello" in warning and "found no Flask app" in warning
    assert "app.wsgi_app = Other(IdentityMiddleware(app.wsgi_app))" in warning


def test_proxy_fix_outside_the_app_is_seen_through_without_a_warning(tmp_path, caplog):
    from werkzeug.middleware.proxy_fix import ProxyFix

    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "app.css").write_text("body {}")
    app = Flask("proxied", root_path=str(tmp_path))
    app.config["SECRET_KEY"] = "test"
    seen = []

    @app.after_request
    def record(response):
        seen.append((is_static_request(), request.scheme))
        return response

    proxy_fix = ProxyFix(app.wsgi_app, x_proto=1)
    with caplog.at_level(logging.WARNING, logger="identity_middleware"):
        app.wsgi_app = IdentityMiddleware(proxy_fix)
    assert app.wsgi_app.app is app and app.wsgi_app.wrappers == (proxy_fix,)
    assert app.extensions["identity_middleware"] is app.wsgi_app
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    response = app.test_client().get("/static/app.css", headers={"X-Forwarded-Proto": "https"})
    assert response.status_code == 200 and "Set-Cookie" not in response.headers
    assert seen == [(True, "https")]
    assert isinstance(app.session_interface, StaticAwareSessionInterface)


def test_an_unknown_wrapper_that_exposes_the_app_is_named_in_a_warning(tmp_path, caplog):
    class Prefixer:
        def __init__(self, app):
            self.app = app

        def __call__(self, environ, start_response):
            return self.app(environ, start_response)

    app = Flask("prefixed", root_path=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="identity_middleware"):
        middleware = IdentityMiddleware(Prefixer(app.wsgi_app))
    assert middleware.app is app
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert ".Prefixer," in warning and "not known to keep PATH_INFO unchanged" in warning
    assert "app.wsgi_app = Other(IdentityMiddleware(app.wsgi_app))" in warning


def test_wrapping_the_flask_app_object_itself_knows_the_app(tmp_path):
    app = Flask("direct", root_path=str(tmp_path))
    middleware = IdentityMiddleware(app)
    assert middleware.app is app
    assert app.extensions["identity_middleware"] is middleware


def test_blueprint_registered_after_wrapping_is_covered(tmp_path):
    (tmp_path / "static").mkdir()
    (tmp_path / "late" / "static").mkdir(parents=True)
    (tmp_path / "late" / "static" / "late.css").write_text("p {}")
    app = Flask("late", root_path=str(tmp_path))
    app.wsgi_app = IdentityMiddleware(app.wsgi_app)
    assert not app.wsgi_app.explain("/late/static/late.css").marked
    app.register_blueprint(
        Blueprint("late", __name__, static_folder=str(tmp_path / "late" / "static"), url_prefix="/late")
    )
    assert app.wsgi_app.explain("/late/static/late.css").marked  # before any request, built on demand
    environ = EnvironBuilder(path="/late/static/late.css").get_environ()
    status, headers, body = call(app, environ)
    assert status.startswith("200") and environ.get(MARK) is True


def test_routes_added_directly_to_the_url_map_later_are_seen_after_rebuild(tmp_path):
    (tmp_path / "static").mkdir()
    app = Flask("rebuild", root_path=str(tmp_path))
    app.wsgi_app = IdentityMiddleware(app.wsgi_app)
    app.test_client().get("/")  # first request: classifier built
    assert app.wsgi_app.explain("/static/config.js").marked
    from werkzeug.routing import Rule

    app.url_map.add(Rule("/static/config.js", endpoint="config_js"))
    app.view_functions["config_js"] = lambda: "dynamic"
    app.wsgi_app.rebuild()
    assert "shadowed" in app.wsgi_app.explain("/static/config.js").reason


def test_first_requests_in_parallel_install_the_hooks_once(app, session_cookie):
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def request_static():
        barrier.wait()
        environ, status, headers, body = raw_request(app, "/static/app.css", cookie=session_cookie)
        results.append(environ.get(MARK) is True and status.startswith("200"))

    threads = [threading.Thread(target=request_static) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 8
    hooks = app.before_request_funcs[None] + app.after_request_funcs[None]
    assert [getattr(f, "__wrapped__", f).__name__ for f in hooks if getattr(f, SAFE_ATTRIBUTE, False)] == [
        "_on_before_request",
        "_update_remember_cookie",
    ]
    assert app.extensions["example"].loader_calls == 0


# -- settings ----------------------------------------------------------------------------


def test_settings_resolve_environment_over_argument_over_app_config(tmp_path, monkeypatch):
    app = Flask("settings", root_path=str(tmp_path))
    app.config["IDENTITY_STATIC_PATHS"] = "/from-config.ico"
    app.config["IDENTITY_SERVE_STATIC"] = False
    middleware = IdentityMiddleware(app.wsgi_app)
    assert middleware.settings["IDENTITY_STATIC_PATHS"].value == ("/from-config.ico",)
    assert middleware.settings["IDENTITY_STATIC_PATHS"].source == "app.config"
    assert middleware.settings["IDENTITY_DEBUG_HEADERS"].source == "default"

    middleware = IdentityMiddleware(app.wsgi_app, ["/from-argument.ico"], debug_headers=True)
    assert middleware.listed == ("/from-argument.ico",)
    assert middleware.settings["IDENTITY_DEBUG_HEADERS"].value is True

    monkeypatch.setenv("IDENTITY_STATIC_PATHS", "/from-env.ico,/env/")
    monkeypatch.setenv("IDENTITY_DEBUG_HEADERS", "0")
    middleware = IdentityMiddleware(app.wsgi_app, ["/from-argument.ico"], debug_headers=True)
    # The environment extends the code's list (an operator adding a path keeps the others).
    assert middleware.listed == ("/from-argument.ico", "/from-env.ico", "/env/")
    assert middleware.settings["IDENTITY_STATIC_PATHS"].source == "argument + environment"
    assert middleware.settings["IDENTITY_DEBUG_HEADERS"].value is False


@pytest.mark.parametrize(
    ("kwargs", "env", "name"),
    [
        ({"static_paths": ["favicon.ico"]}, {}, "IDENTITY_STATIC_PATHS"),
        ({}, {"IDENTITY_STATIC_PATHS": "/a/../b"}, "IDENTITY_STATIC_PATHS"),
        ({"static_paths": "/"}, {}, "IDENTITY_STATIC_PATHS"),
        ({}, {"IDENTITY_SERVE_STATIC": "maybe"}, "IDENTITY_SERVE_STATIC"),
        ({"debug_headers": "loud"}, {}, "IDENTITY_DEBUG_HEADERS"),
        ({"static_dirs": {"/assets": "."}}, {}, "static_dirs"),
        ({"static_dirs": {"/": "."}}, {}, "static_dirs"),
        ({"static_dirs": {"/a/../b/": "."}}, {}, "static_dirs"),
        ({"static_dirs": {"/assets/": "/no/such/folder"}}, {}, "static_dirs"),
        ({"static_dirs": ["/assets/"]}, {}, "static_dirs"),
    ],
)
def test_bad_settings_raise_config_error_at_construction(tmp_path, monkeypatch, kwargs, env, name):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    app = Flask("bad", root_path=str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        IdentityMiddleware(app.wsgi_app, **kwargs)
    assert caught.value.name == name
    assert name in str(caught.value)


def test_bad_app_config_value_names_its_source(tmp_path):
    app = Flask("badconfig", root_path=str(tmp_path))
    app.config["IDENTITY_STATIC_PATHS"] = "no-slash"
    with pytest.raises(ConfigError, match="app.config"):
        IdentityMiddleware(app.wsgi_app)


def test_static_dirs_prefixes_are_listed_static_paths(tmp_path):
    assets = tmp_path / "build"
    assets.mkdir()
    app = Flask("dirs", root_path=str(tmp_path))
    middleware = IdentityMiddleware(app.wsgi_app, ["/favicon.ico"], static_dirs={"/assets/": assets})
    assert middleware.static_dirs == {"/assets/": os.path.abspath(assets)}
    assert middleware.listed == ("/favicon.ico", "/assets/")
    assert middleware.explain("/assets/app.js").marked


# -- serve mode hook ----------------------------------------------------------------------


def test_serve_mode_answers_indexed_files_before_flask_and_falls_through_otherwise(tmp_path):
    pytest.importorskip("identity_middleware.static", reason="serve mode (static.py) has not landed yet")
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "app.css").write_text("body { color: red }")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "bundle.js").write_text("run()")
    app = Flask("serve", root_path=str(tmp_path))
    entered: list[str] = []

    @app.before_request
    @static_safe  # a probe: declared harmless, so it does not keep the files from being served
    def record():
        from flask import request

        entered.append(request.path)

    @app.get("/static/config.js")
    def config_js():
        return jsonify(dynamic=True)

    app.wsgi_app = IdentityMiddleware(app.wsgi_app, serve_static=True, static_dirs={"/assets/": tmp_path / "build"})
    client = app.test_client()
    response = client.get("/static/app.css")
    assert response.status_code == 200 and response.data == b"body { color: red }"
    assert client.get("/assets/bundle.js").data == b"run()"
    assert entered == []
    assert client.get("/static/config.js").json == {"dynamic": True}
    assert client.get("/static/missing.css").status_code == 404
    assert client.post("/static/app.css").status_code == 405
    assert client.get("/assets/missing.js").status_code == 404
    assert entered == ["/static/config.js", "/static/missing.css", "/static/app.css", "/assets/missing.js"]


def test_behind_a_wrapper_a_host_matching_map_marks_only_listed_paths(tmp_path):
    from werkzeug.middleware.proxy_fix import ProxyFix

    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "app.css").write_text("body {}")
    app = Flask("hosts", root_path=str(tmp_path), host_matching=True, static_host="cdn.test")
    middleware = IdentityMiddleware(ProxyFix(app.wsgi_app, x_host=1), ["/favicon.ico"])
    environ = EnvironBuilder(path="/static/app.css", headers={"Host": "cdn.test"}).get_environ()
    assert not middleware.classifier.classify(environ)
    assert "may change the host" in middleware.classifier.explain("/static/app.css", environ=environ).reason
    # Wrapped directly, the host seen is the host Flask routes on: confirmed.
    assert IdentityMiddleware(app.wsgi_app).classifier.classify(environ)


def test_server_timing_of_a_marked_request_that_loads_the_user_names_the_cache_outcome(sqlite_url):
    from examples.app import create_app
    from flask_login import current_user

    from conftest import log_in

    app = create_app(sqlite_url, config={"IDENTITY_DEBUG_HEADERS": True})

    @app.after_request
    def audit(response):
        if request.path.startswith("/widgets/"):
            response.headers["X-User"] = current_user.get_id() or "anonymous"
        return response

    client = log_in(app.test_client())
    app.extensions["example"].user_cache.invalidate_all()

    def desc(path):
        [value] = [v for v in client.get(path).headers.getlist("Server-Timing") if v.startswith("identity;")]
        return value.split('"')[1]

    assert desc("/static/app.css") == "static"  # nothing asked
    assert desc("/widgets/static/widget.css") == "miss"  # the audit hook asked: loaded on demand
    assert desc("/widgets/static/widget.css") == "hit"
