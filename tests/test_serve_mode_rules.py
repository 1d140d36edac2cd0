"""Serve mode never answers what the app would refuse (serve_rules.py).

Each protected app is built twice -- bare, and wrapped with
``IdentityMiddleware(serve_static=True)`` -- and both run behind a real HTTP
server; an anonymous client must get exactly the same status, body and
``Location`` from both. A plain Login + Principal app (the example app) must
still be answered before Flask, which a declared-safe ``request_started``
receiver proves: it never runs for the served files.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Blueprint, Flask, Response, request, request_started
from flask_login import LoginManager, UserMixin, login_required
from flask_principal import Principal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.middleware.proxy_fix import ProxyFix

from identity_middleware import ConfigError, IdentityMiddleware, cli, static_safe
from identity_middleware.serve_rules import SAFE_HOOKS_SETTING, plan
from servers import fetch, serving

CSS = b"body { color: red }"


def _folders(root: Any) -> tuple[str, str]:
    static = os.path.join(root, "static")
    widgets = os.path.join(root, "widgets")
    for folder, name, data in ((static, "internal.js", b"secret()"), (static, "app.css", CSS), (widgets, "w.css", CSS)):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(data)
    return static, widgets


def _login(app: Flask) -> LoginManager:
    app.config["SECRET_KEY"] = "test"
    manager = LoginManager(app)

    @manager.user_loader
    def load(user_id: str) -> UserMixin | None:
        return None

    return manager


def wrapped_static_view(folders: tuple[str, str]) -> Flask:
    """The usual recipe for assets that need a login: wrap Flask's static view."""
    app = Flask("wrapped", static_folder=folders[0], static_url_path="/static")
    _login(app)
    Principal(app)
    app.view_functions["static"] = login_required(app.view_functions["static"])
    return app


def app_login_gate(folders: tuple[str, str]) -> Flask:
    """An internal tool: every request, assets included, needs a login."""
    app = Flask("gate", static_folder=folders[0], static_url_path="/static")
    _login(app)

    @app.before_request
    def gate() -> Any:
        from flask_login import current_user

        if not current_user.is_authenticated:
            return Response("login first", 401)
        return None

    return app


def blueprint_gate(folders: tuple[str, str]) -> Flask:
    """Only one blueprint's static folder is protected, by the blueprint's own hook."""
    app = Flask("blueprint", static_folder=folders[0], static_url_path="/static")
    _login(app)
    admin = Blueprint("admin", "admin", static_folder=folders[1], static_url_path="/static", url_prefix="/admin")

    @admin.before_request
    def admins_only() -> Any:
        return Response("admins only", 403)

    app.register_blueprint(admin)
    return app


PROTECTED: dict[str, tuple[Callable[[tuple[str, str]], Flask], str]] = {
    "wrapped static view": (wrapped_static_view, "/static/internal.js"),
    "app-level before_request gate": (app_login_gate, "/static/internal.js"),
    "blueprint before_request gate": (blueprint_gate, "/admin/static/w.css"),
}


@contextlib.contextmanager
def bare_and_served(build: Callable[[], Flask], **options: Any) -> Iterator[tuple[int, int, Flask]]:
    bare, served = build(), build()
    served.wsgi_app = IdentityMiddleware(served.wsgi_app, serve_static=True, **options)  # type: ignore[method-assign]
    with serving(bare) as bare_port, serving(served) as served_port:
        yield bare_port, served_port, served


@pytest.mark.parametrize("case", list(PROTECTED))
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_protected_files_give_anonymous_clients_exactly_what_the_bare_app_gives(
    tmp_path: Any, case: str, method: str
) -> None:
    build, path = PROTECTED[case]
    folders = _folders(tmp_path)
    with bare_and_served(lambda: build(folders)) as (bare_port, served_port, _):
        bare, served = fetch(bare_port, path, method=method), fetch(served_port, path, method=method)
    assert bare.status in (401, 403)  # the app refuses: the comparison means something
    assert (served.status, served.body, served["Location"]) == (bare.status, bare.body, bare["Location"])


@pytest.mark.parametrize("case", list(PROTECTED))
def test_the_report_names_what_keeps_a_protected_mount_from_being_served(tmp_path: Any, case: str) -> None:
    build, path = PROTECTED[case]
    app = build(_folders(tmp_path))
    app.wsgi_app = IdentityMiddleware(app.wsgi_app, serve_static=True)  # type: ignore[method-assign]
    verdicts = {v.prefix: v for v in app.wsgi_app.serve_verdicts()}
    prefix = path.rsplit("/", 1)[0] + "/"
    expected = {
        "wrapped static view": "is not Flask's own static view",
        "app-level before_request gate": "before_request test_serve_mode_rules.app_login_gate.<locals>.gate",
        "blueprint before_request gate": "admins_only of blueprint 'admin'",
    }[case]
    assert not verdicts[prefix].served
    assert any(expected in blocker for blocker in verdicts[prefix].blockers)


def test_an_unprotected_mount_beside_a_protected_blueprint_is_still_served(tmp_path: Any) -> None:
    folders = _folders(tmp_path)
    with bare_and_served(lambda: blueprint_gate(folders)) as (_, served_port, app):
        assert fetch(served_port, "/static/app.css").body == CSS
        verdicts = {v.prefix: v.served for v in app.wsgi_app.serve_verdicts()}
    assert verdicts == {"/static/": True, "/admin/static/": False}


def test_a_logged_in_client_still_gets_the_gated_file_through_flask(tmp_path: Any) -> None:
    folders = _folders(tmp_path)
    app = app_login_gate(folders)
    app.wsgi_app = IdentityMiddleware(app.wsgi_app, serve_static=True)  # type: ignore[method-assign]
    assert app.test_client().get("/static/internal.js").status_code == 401


# -- a plain Login + Principal app is still served before Flask ----------------------------


def test_a_login_and_principal_app_is_answered_before_flask(sqlite_url: str) -> None:
    from examples.app import create_app

    app = create_app(sqlite_url, config={"IDENTITY_SERVE_STATIC": True})
    contexts: list[str] = []

    @static_safe
    def opened(sender: Flask, **extra: Any) -> None:
        contexts.append(request.path)

    request_started.connect(opened, app)
    try:
        with serving(app) as port:
            for path in ("/static/app.css", "/widgets/static/widget.css", "/static/app.js"):
                assert fetch(port, path).status == 200
            assert contexts == []  # Flask's request context never opened
            assert fetch(port, "/").status in (200, 302, 401)
            assert contexts == ["/"]  # ...while it does for a page: the probe works
    finally:
        request_started.disconnect(opened, app)
    assert all(v.served for v in app.wsgi_app.serve_verdicts())
    skipped = {s for v in app.wsgi_app.serve_verdicts() for s in v.skipped}
    assert "before_request flask_principal.Principal._on_before_request" in skipped
    assert "after_request flask_login.login_manager.LoginManager._update_remember_cookie" in skipped


def test_an_undeclared_request_started_receiver_keeps_files_with_flask(tmp_path: Any) -> None:
    app = Flask("observed", static_folder=_folders(tmp_path)[0], static_url_path="/static")
    seen: list[str] = []

    def observe(sender: Flask, **extra: Any) -> None:
        seen.append(request.path)

    request_started.connect(observe, app)
    try:
        app.wsgi_app = IdentityMiddleware(app.wsgi_app, serve_static=True)  # type: ignore[method-assign]
        assert app.test_client().get("/static/app.css").data == CSS
        assert seen == ["/static/app.css"]  # the receiver ran, as without the middleware
        (verdict,) = app.wsgi_app.serve_verdicts()
        assert verdict.blockers == ("request_started receiver " + observe.__module__ + "." + observe.__qualname__,)
    finally:
        request_started.disconnect(observe, app)


# -- what blocks, what does not -------------------------------------------------------------


def _verdict(app: Flask, prefix: str = "/static/", **options: Any) -> Any:
    app.wsgi_app = IdentityMiddleware(app.wsgi_app, serve_static=True, **options)  # type: ignore[method-assign]
    return {v.prefix: v for v in app.wsgi_app.serve_verdicts()}[prefix]


def _plain(tmp_path: Any, cls: type[Flask] = Flask) -> Flask:
    return cls("plain", static_folder=_folders(tmp_path)[0], static_url_path="/static")


def test_a_plain_app_is_served(tmp_path: Any) -> None:
    verdict = _verdict(_plain(tmp_path))
    assert verdict.served and verdict.blockers == ()


@pytest.mark.parametrize("kind", ["before_request", "after_request", "url_value_preprocessor"])
def test_each_kind_of_app_hook_blocks_unless_declared(tmp_path: Any, kind: str) -> None:
    def hook(*args: Any) -> Any:
        return args[-1] if kind == "after_request" else None

    app = _plain(tmp_path)
    getattr(app, kind)(hook)
    assert not _verdict(app).served
    declared = _plain(tmp_path)
    getattr(declared, kind)(hook)
    assert _verdict(declared, static_safe_hooks=[hook]).served


def test_hooks_can_be_declared_in_app_config(tmp_path: Any) -> None:
    def audit(response: Response) -> Response:
        return response

    app = _plain(tmp_path)
    app.after_request(audit)
    app.config[SAFE_HOOKS_SETTING] = [audit]
    verdict = _verdict(app)
    assert verdict.served and "after_request " + audit.__module__ + "." + audit.__qualname__ in verdict.skipped


def test_the_static_safe_decorator_declares_a_hook(tmp_path: Any) -> None:
    app = _plain(tmp_path)

    @app.after_request
    @static_safe
    def audit(response: Response) -> Response:
        return response

    assert _verdict(app).served


def test_teardown_functions_do_not_block_and_are_reported_as_skipped(tmp_path: Any) -> None:
    app = _plain(tmp_path)

    @app.teardown_request
    def cleanup(error: BaseException | None) -> None:
        pass

    verdict = _verdict(app)
    assert verdict.served and any("teardown_request" in s and "cleanup" in s for s in verdict.skipped)


def test_a_parent_blueprints_hook_blocks_a_nested_blueprints_static_folder(tmp_path: Any) -> None:
    app = _plain(tmp_path)
    parent = Blueprint("parent", "parent", url_prefix="/parent")
    child = Blueprint(
        "child", "child", static_folder=_folders(tmp_path)[1], static_url_path="/static", url_prefix="/child"
    )

    @parent.before_request
    def parent_gate() -> None:
        return None

    parent.register_blueprint(child)
    app.register_blueprint(parent)
    verdict = _verdict(app, "/parent/child/static/")
    assert verdict.endpoint == "parent.child.static" and not verdict.served
    assert any("parent_gate of blueprint 'parent'" in b for b in verdict.blockers)


def test_an_app_class_overriding_the_request_cycle_blocks(tmp_path: Any) -> None:
    class HeaderApp(Flask):
        def process_response(self, response: Response) -> Response:
            response.headers["X-Frame-Options"] = "DENY"
            return super().process_response(response)

    verdict = _verdict(_plain(tmp_path, HeaderApp))
    assert not verdict.served and "HeaderApp.process_response" in verdict.reason


def test_a_custom_response_class_blocks(tmp_path: Any) -> None:
    class SecureResponse(Response):
        pass

    app = _plain(tmp_path)
    app.response_class = SecureResponse
    assert not _verdict(app).served


def test_a_middleware_between_us_and_flask_blocks_but_proxy_fix_does_not(tmp_path: Any) -> None:
    app = _plain(tmp_path)
    mounts = {"/static/": "static"}
    folders: dict[str, str | None] = {"/static/": app.static_folder}

    def headers(environ: Any, start_response: Any) -> Any:
        return app.wsgi_app(environ, start_response)

    assert plan(app, mounts, folders, {}, ProxyFix(app.wsgi_app), ()).verdicts[0].served
    assert plan(app, mounts, folders, {}, app, ()).verdicts[0].served
    blocked = plan(app, mounts, folders, {}, headers, ()).verdicts[0]
    assert not blocked.served and "not the app's wsgi_app" in blocked.reason


def test_a_static_dirs_folder_is_held_back_by_an_app_level_gate(tmp_path: Any) -> None:
    build = tmp_path / "build"
    build.mkdir()
    (build / "bundle.js").write_bytes(b"run()")
    app = app_login_gate(_folders(tmp_path))
    verdict = _verdict(app, "/assets/", static_dirs={"/assets/": str(build)})
    assert verdict.endpoint is None and not verdict.served
    assert app.test_client().get("/assets/bundle.js").status_code == 401


def test_declarations_must_be_functions_from_code(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app = _plain(tmp_path)
    with pytest.raises(ConfigError, match="static_safe_hooks"):
        IdentityMiddleware(app.wsgi_app, static_safe_hooks=["myapp.audit"])
    with pytest.raises(ConfigError, match="static_safe_hooks"):
        IdentityMiddleware(app.wsgi_app, static_safe_hooks=print)  # one function, not a list
    monkeypatch.setenv(SAFE_HOOKS_SETTING, "myapp.audit")
    with pytest.raises(ConfigError, match=SAFE_HOOKS_SETTING):
        IdentityMiddleware(app.wsgi_app)


# -- the report ----------------------------------------------------------------------------


def test_startup_line_and_status_say_per_mount_whether_it_is_served(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = blueprint_gate(_folders(tmp_path))
    app.wsgi_app = IdentityMiddleware(app.wsgi_app, serve_static=True)  # type: ignore[method-assign]
    cli.register(app)  # `flask` itself finds the group through the flask.commands entry point
    status = app.test_cli_runner().invoke(args=["identity", "status"]).output
    assert "/static/ (static): served before Flask" in status
    assert "/admin/static/ (admin.static): not served before Flask -- before_request " in status
    assert "admins_only of blueprint 'admin'" in status
    with caplog.at_level(logging.INFO, logger="identity_middleware"):
        app.test_client().get("/static/app.css")
    started = [r.getMessage() for r in caplog.records if "URL map read" in r.getMessage()]
    assert len(started) == 1
    assert "/static/ (static): served before Flask" in started[0]
    assert "/admin/static/ (admin.static): not served before Flask" in started[0]


def test_status_says_serve_mode_is_off(tmp_path: Any) -> None:
    app = _plain(tmp_path)
    app.wsgi_app = IdentityMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    cli.register(app)
    assert "Serve mode (IDENTITY_SERVE_STATIC): off" in app.test_cli_runner().invoke(args=["identity", "status"]).output


# -- Flask-Security-Too ------------------------------------------------------------------------


def test_flask_security_static_is_served_but_its_blueprint_folder_is_not(tmp_path: Any) -> None:
    pytest.importorskip("flask_security")
    from test_flask_security import make_app

    app, _ = make_app(tmp_path, middleware=False)
    bare = app.test_client().get("/fs-static/js/webauthn.js")
    app.wsgi_app = IdentityMiddleware(app.wsgi_app, serve_static=True)  # type: ignore[method-assign]
    verdicts = {v.prefix: v for v in app.wsgi_app.serve_verdicts()}
    assert verdicts["/static/"].served
    fs_static = verdicts["/fs-static/"]
    if app.after_request_funcs.get("security"):  # newer releases: private, no-store on its answers
        assert not fs_static.served and fs_static.blockers == (
            "after_request flask_security.utils._add_cache_control of blueprint 'security'",
        )
    else:  # older releases run nothing of their own for /fs-static: served before Flask
        assert fs_static.served
    served = app.test_client().get("/fs-static/js/webauthn.js")
    assert served.status_code == bare.status_code == 200
    assert served.headers["Cache-Control"] == bare.headers["Cache-Control"]


def test_a_blueprint_folder_gets_the_cache_control_its_own_view_would_send(tmp_path: Any) -> None:
    class LongLivedAssets(Blueprint):
        def get_send_file_max_age(self, filename: str | None) -> int | None:
            return 86400

    def build() -> Flask:
        app = _plain(tmp_path)
        app.register_blueprint(
            LongLivedAssets("assets", "assets", static_folder=_folders(tmp_path)[1], static_url_path="/static", url_prefix="/a")
        )
        return app

    bare, served = build(), build()
    served.wsgi_app = IdentityMiddleware(served.wsgi_app, serve_static=True)  # type: ignore[method-assign]
    expected = bare.test_client().get("/a/static/w.css").headers["Cache-Control"]
    assert expected == "public, max-age=86400"
    assert served.test_client().get("/a/static/w.css").headers["Cache-Control"] == expected
    assert {v.prefix: v.served for v in served.wsgi_app.serve_verdicts()}["/a/static/"]


# -- generated apps: serve mode never gives an answer the bare app would not ------------------

_HOOK_KINDS = ("before_request", "after_request", "url_value_preprocessor")
_hook = st.tuples(st.sampled_from(_HOOK_KINDS), st.sampled_from(["app", "bp"]), st.booleans(), st.booleans())


def _generated(folders: tuple[str, str], hooks: list[tuple[str, str, bool, bool]], wrap_view: bool) -> tuple[Flask, list[Any]]:
    """An app with the drawn hooks; each one either acts (refuses, or adds a header) or is a no-op,
    and only no-ops may be declared safe -- declaring an acting hook would be the owner's lie."""
    from flask import abort

    app = Flask("generated", static_folder=folders[0], static_url_path="/static")
    _login(app)
    bp = Blueprint("bp", "bp", static_folder=folders[1], static_url_path="/static", url_prefix="/bp")
    declared: list[Any] = []
    for index, (kind, scope, acts, declare) in enumerate(hooks):
        def hook(*args: Any, _kind: str = kind, _acts: bool = acts, _index: int = index) -> Any:
            if _kind == "after_request":
                response = args[0]
                if _acts:
                    response.headers.add("X-Hook", str(_index))
                return response
            if _acts:
                abort(401 if _kind == "before_request" else 403)
            return None

        getattr(app if scope == "app" else bp, kind)(hook)
        if declare and not acts:
            declared.append(hook)
    app.register_blueprint(bp)
    if wrap_view:
        app.view_functions["static"] = login_required(app.view_functions["static"])
    return app, declared


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    hooks=st.lists(_hook, max_size=4),
    wrap_view=st.booleans(),
    path=st.sampled_from(["/static/app.css", "/bp/static/w.css", "/static/missing.css"]),
    method=st.sampled_from(["GET", "HEAD"]),
)
def test_property_generated_apps_answer_anonymous_clients_as_the_bare_app_does(
    tmp_path: Any, hooks: list[tuple[str, str, bool, bool]], wrap_view: bool, path: str, method: str
) -> None:
    folders = _folders(tmp_path)
    bare, _ = _generated(folders, hooks, wrap_view)
    served, declared = _generated(folders, hooks, wrap_view)
    served.wsgi_app = IdentityMiddleware(  # type: ignore[method-assign]
        served.wsgi_app, serve_static=True, static_safe_hooks=declared
    )
    expected = bare.test_client().open(path, method=method)
    got = served.test_client().open(path, method=method)
    assert (got.status_code, got.data, got.headers.getlist("X-Hook")) == (
        expected.status_code,
        expected.data,
        expected.headers.getlist("X-Hook"),
    )


def test_flask_wtf_csrf_protection_is_harmless_unless_it_checks_get(tmp_path: Any) -> None:
    CSRFProtect = pytest.importorskip("flask_wtf.csrf").CSRFProtect  # noqa: N806

    app = _plain(tmp_path)
    app.config["SECRET_KEY"] = "test"
    CSRFProtect(app)
    assert _verdict(app).served
    checks_get = _plain(tmp_path)
    checks_get.config.update(SECRET_KEY="test", WTF_CSRF_METHODS=["GET", "POST"])
    CSRFProtect(checks_get)
    verdict = _verdict(checks_get)
    assert not verdict.served and "csrf_protect" in verdict.reason
    assert checks_get.test_client().get("/static/app.css").status_code == 400  # as without the middleware
