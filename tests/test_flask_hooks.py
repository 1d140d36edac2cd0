"""The Flask-side hooks: a marked request does no identity work until something asks.

Against the example app (Flask-Login + Flask-Principal + SQLAlchemy, user cache
off so every identity load shows as SQL) and small real apps built here for the
situations the example does not cover. The naive app (no middleware) is run
next to it where a contrast proves the assertion could fail. Unobserved static
requests load nothing; a marked request whose code asks for the user, the
session or the identity gets the real one (tests/test_equivalence.py compares
whole responses with the bare app).
"""

from __future__ import annotations

import pytest
from conftest import count_sql, log_in
from flask import Blueprint, Flask, g, jsonify, session
from flask.json.tag import TaggedJSONSerializer
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface, SessionInterface
from flask_login import LoginManager, UserMixin, current_user, login_user
from flask_principal import (
    AnonymousIdentity,
    Identity,
    Permission,
    Principal,
    RoleNeed,
    identity_changed,
    identity_loaded,
)

from identity_middleware import IdentityMiddleware
from identity_middleware.flask_hooks import SAFE_ATTRIBUTE, LazySession, install, principals_of

ASSETS = ["/static/app.css", "/static/app.js", "/widgets/static/widget.css", "/favicon.ico"]


@pytest.fixture
def app(sqlite_url):
    from examples.app import create_app

    return create_app(sqlite_url, cache=False)


@pytest.fixture
def naive(sqlite_url):
    from examples.app import create_app

    return create_app(sqlite_url, middleware=False, cache=False)


# -- the example app, logged in --------------------------------------------------------


def test_assets_of_a_logged_in_page_run_no_sql_no_loader_and_no_identity_loaded(app):
    client = log_in(app.test_client())
    stats = app.extensions["example"]
    stats.loader_calls = stats.identity_loaded_calls = 0
    with count_sql(stats.engine) as statements:
        for path in ASSETS:
            assert client.get(path).status_code == 200, path
    assert statements == []
    assert stats.loader_calls == 0
    assert stats.identity_loaded_calls == 0


def test_the_naive_app_loads_identity_for_every_asset(naive):
    client = log_in(naive.test_client())
    stats = naive.extensions["example"]
    stats.loader_calls = 0
    with count_sql(stats.engine) as statements:
        for path in ASSETS:
            client.get(path)
    assert stats.loader_calls == len(ASSETS)
    assert len(statements) >= 2 * len(ASSETS)


def test_the_page_itself_still_loads_the_user_and_renders_roles(app):
    client = log_in(app.test_client())
    stats = app.extensions["example"]
    stats.loader_calls = 0
    with count_sql(stats.engine) as statements:
        response = client.get("/")
    assert b'<span id="roles">admin, editor</span>' in response.data
    assert stats.loader_calls == 1
    assert stats.identity_loaded_calls >= 1
    assert len(statements) >= 2


def test_admin_page_is_200_for_an_admin_and_403_for_an_editor(app):
    assert log_in(app.test_client(), "alice@example.com").get("/admin").status_code == 200
    assert log_in(app.test_client(), "bob@example.com").get("/admin").status_code == 403


def test_static_responses_carry_no_set_cookie_and_no_vary_cookie(app, naive):
    wrapped_client, naive_client = log_in(app.test_client()), log_in(naive.test_client())
    for path in ASSETS:
        response = wrapped_client.get(path)
        assert "Set-Cookie" not in response.headers, path
        assert "Cookie" not in response.vary, path
    # The naive app shows what the hooks remove (Principal's session saver).
    response = naive_client.get("/static/app.css")
    assert "Set-Cookie" in response.headers and "Cookie" in response.vary


def test_dynamic_responses_are_the_same_as_without_the_middleware(app, naive):
    wrapped_client, naive_client = log_in(app.test_client()), log_in(naive.test_client())
    for path in ("/me", "/", "/static/config.js", "/files/a.css", "/admin", "/static-reports"):
        wrapped, plain = wrapped_client.get(path), naive_client.get(path)
        assert wrapped.status_code == plain.status_code, path
        if path == "/me":
            assert {**wrapped.json, "pid": 0} == {**plain.json, "pid": 0}
        else:
            assert wrapped.data == plain.data, path
        # Never a cookie the bare app would not send; an unchanged session that the bare app
        # only re-signs (Principal's saver) is not resent (sessions.py, DESIGN 5.0).
        assert ("Set-Cookie" in wrapped.headers) <= ("Set-Cookie" in plain.headers), path
        assert wrapped.vary == plain.vary, path


def test_session_keeps_working_across_static_requests(app):
    client = log_in(app.test_client())
    for path in ASSETS:
        client.get(path)
    assert client.get("/me").json["email"] == "alice@example.com"
    client.get("/logout")
    client.get("/static/app.css")
    assert client.get("/me").json["anonymous"] is True


# -- small apps -------------------------------------------------------------------------


class User(UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id


def make_app(tmp_path, *, wrap: str = "first", static_url_path=None, static_folder="static", **config):
    """Login + Principal app with counters; ``wrap`` = 'first' (before the extensions), 'last' or 'no'."""
    (tmp_path / "static").mkdir(parents=True, exist_ok=True)
    (tmp_path / "static" / "app.css").write_text("body {}")
    app = Flask("hooks", root_path=str(tmp_path), static_url_path=static_url_path, static_folder=static_folder)
    app.config.update(SECRET_KEY="test", **config)
    calls = {"user_loader": 0, "request_loader": 0, "identity_loaded": 0}
    app.extensions["calls"] = calls
    if wrap == "first":
        app.wsgi_app = IdentityMiddleware(app.wsgi_app, ["/favicon.ico", "/listed/"])
    manager = LoginManager(app)

    @manager.user_loader
    def load_user(user_id):
        calls["user_loader"] += 1
        return User(user_id)

    @manager.request_loader
    def load_from_request(request):
        calls["request_loader"] += 1
        token = request.headers.get("X-Token")
        return User(token) if token else None

    Principal(app)

    @identity_loaded.connect_via(app)
    def on_identity_loaded(sender, identity):
        calls["identity_loaded"] += 1
        identity.user = current_user
        if current_user.is_authenticated:
            identity.provides.add(RoleNeed("admin"))

    @app.get("/login")
    def login():
        login_user(User("7"), remember=True)
        identity_changed.send(app, identity=Identity("7"))
        return "ok"

    @app.get("/")
    def index():
        return jsonify(anonymous=current_user.is_anonymous, identity=str(g.identity.id))

    @app.get("/favicon.ico")
    def favicon():
        return jsonify(
            anonymous=current_user.is_anonymous,
            user_class=type(current_user._get_current_object()).__name__,
            identity_class=type(g.identity).__name__,
        )

    @app.get("/listed/session")
    def listed_session():
        seen = dict(session)
        session["written"] = "by a static request"
        session.pop("theme", None)
        return jsonify(seen=seen)

    @app.get("/listed/admin")
    @Permission(RoleNeed("admin")).require(http_exception=403)
    def listed_admin():
        return "admin only"

    @app.get("/theme")
    def theme():
        session["theme"] = "dark"
        return "ok"

    @app.get("/session")
    def show_session():
        return jsonify(dict(session))

    if wrap == "last":
        app.wsgi_app = IdentityMiddleware(app.wsgi_app, ["/favicon.ico", "/listed/"])
    return app


def _hooks_of(app):
    return app.before_request_funcs[None] + app.after_request_funcs[None]


@pytest.mark.parametrize("wrap", ["first", "last"])
def test_wrapping_before_or_after_the_extensions_are_initialised(tmp_path, wrap):
    app = make_app(tmp_path, wrap=wrap)
    client = app.test_client()
    client.get("/login")
    calls = app.extensions["calls"]
    calls.update(user_loader=0, identity_loaded=0)
    assert client.get("/static/app.css").status_code == 200
    assert calls == {"user_loader": 0, "request_loader": 0, "identity_loaded": 0}
    # A listed path whose view asks gets the real user and identity, loaded on demand.
    assert client.get("/favicon.ico").json == {
        "anonymous": False,
        "user_class": "User",
        "identity_class": "Identity",
    }
    assert calls == {"user_loader": 1, "request_loader": 0, "identity_loaded": 1}
    assert client.get("/").json == {"anonymous": False, "identity": "7"}
    assert calls["user_loader"] == 2 and calls["identity_loaded"] == 2
    ours = [f for f in _hooks_of(app) if getattr(f, SAFE_ATTRIBUTE, False)]
    assert [f.__wrapped__.__name__ for f in ours] == ["_on_before_request", "_update_remember_cookie"]


def test_the_extensions_hooks_are_replaced_in_place_keeping_the_app_order(tmp_path):
    app = make_app(tmp_path, wrap="no")

    @app.before_request
    def gate():
        return None

    before = [getattr(f, "__name__", "") for f in app.before_request_funcs[None]]
    app.wsgi_app = IdentityMiddleware(app.wsgi_app)
    app.test_client().get("/")
    after = [getattr(getattr(f, "__wrapped__", f), "__name__", "") for f in app.before_request_funcs[None]]
    assert after == before == ["_on_before_request", "gate"]


def test_remember_cookie_and_request_loader_do_not_run_for_unobserved_static_requests(tmp_path):
    app = make_app(tmp_path)
    client = app.test_client()
    client.get("/login")
    client.delete_cookie("session")  # only the remember-me cookie is left
    calls = app.extensions["calls"]
    calls.update(user_loader=0, request_loader=0, identity_loaded=0)
    response = client.get("/static/app.css", headers={"X-Token": "9"})
    assert calls == {"user_loader": 0, "request_loader": 0, "identity_loaded": 0}
    assert "Set-Cookie" not in response.headers
    assert client.get("/").json["anonymous"] is False  # the cookie logs the user back in
    assert calls["user_loader"] == 1


def test_a_marked_view_that_asks_logs_in_from_the_remember_cookie_or_the_request_loader(tmp_path):
    app = make_app(tmp_path)
    client = app.test_client()
    client.get("/login")
    client.delete_cookie("session")
    calls = app.extensions["calls"]
    calls.update(user_loader=0, request_loader=0)
    assert client.get("/favicon.ico").json["anonymous"] is False  # remember cookie
    assert calls["user_loader"] == 1
    token_client = app.test_client()  # no cookies: only the request loader can log in
    assert token_client.get("/favicon.ico", headers={"X-Token": "9"}).json["anonymous"] is False
    assert calls["request_loader"] == 1


def test_remember_cookie_refresh_each_request_skips_unobserved_static_responses(tmp_path):
    wrapped = make_app(tmp_path / "wrapped", REMEMBER_COOKIE_REFRESH_EACH_REQUEST=True)
    naive = make_app(tmp_path / "naive", wrap="no", REMEMBER_COOKIE_REFRESH_EACH_REQUEST=True)
    for app, expect_cookie in ((wrapped, False), (naive, True)):
        client = app.test_client()
        client.get("/login")
        response = client.get("/static/app.css")
        assert ("remember_token" in response.headers.get("Set-Cookie", "")) is expect_cookie
    client = wrapped.test_client()
    client.get("/login")
    assert "remember_token" in client.get("/").headers.get("Set-Cookie", "")
    # A marked request that opened the session runs Flask-Login's upkeep as the bare app does.
    assert "remember_token" in client.get("/favicon.ico").headers.get("Set-Cookie", "")


def test_a_static_request_that_uses_the_session_sees_and_saves_the_real_one(tmp_path):
    results = {}
    for wrap in ("first", "no"):
        app = make_app(tmp_path / wrap, wrap=wrap)
        client = app.test_client()
        client.get("/login")
        client.get("/theme")
        before = client.get("/session").json
        assert before["theme"] == "dark" and "_user_id" in before and "identity.id" in before
        response = client.get("/listed/session")
        assert response.status_code == 200
        assert "Set-Cookie" in response.headers and "Cookie" in response.vary
        after = client.get("/session").json
        assert after["written"] == "by a static request" and "theme" not in after
        results[wrap] = (response.json, after)
    assert results["first"] == results["no"]


def test_permission_in_a_listed_view_sees_the_real_identity(tmp_path):
    client = make_app(tmp_path).test_client()
    assert client.get("/listed/admin").status_code == 403  # anonymous
    client.get("/login")
    assert client.get("/listed/admin").status_code == 200  # RoleNeed("admin"), loaded on demand


def test_custom_anonymous_user_class_is_used(tmp_path):
    app = make_app(tmp_path)

    class Guest(UserMixin):
        is_anonymous = True
        is_authenticated = False

    app.login_manager.anonymous_user = Guest
    assert app.test_client().get("/favicon.ico").json["user_class"] == "Guest"


def test_static_url_path_empty_keeps_pages_logged_in(tmp_path):
    app = make_app(tmp_path, static_url_path="")
    client = app.test_client()
    client.get("/login")
    calls = app.extensions["calls"]
    calls.update(user_loader=0)
    assert client.get("/app.css").data == b"body {}"
    assert calls["user_loader"] == 0
    assert client.get("/").json == {"anonymous": False, "identity": "7"}
    assert client.get("/session").json["_user_id"] == "7"
    assert calls["user_loader"] == 2


def test_static_folder_none_does_not_crash_and_listed_paths_still_skip(tmp_path):
    app = make_app(tmp_path, static_folder=None)
    client = app.test_client()
    client.get("/login")
    calls = app.extensions["calls"]
    calls.update(user_loader=0)
    assert client.get("/static/app.css").status_code == 404
    assert calls["user_loader"] == 1  # not static: identity loaded as usual
    response = client.get("/listed/nothing-here")
    assert response.status_code == 404 and "Set-Cookie" not in response.headers
    assert calls["user_loader"] == 1


def test_blueprint_static_registered_after_wrapping_skips_identity(tmp_path):
    app = make_app(tmp_path)
    (tmp_path / "late" / "static").mkdir(parents=True)
    (tmp_path / "late" / "static" / "late.css").write_text("p {}")
    app.register_blueprint(Blueprint("late", __name__, static_folder=str(tmp_path / "late" / "static"), url_prefix="/late"))
    client = app.test_client()
    client.get("/login")
    calls = app.extensions["calls"]
    calls.update(user_loader=0, identity_loaded=0)
    assert client.get("/late/static/late.css").status_code == 200
    assert calls["user_loader"] == calls["identity_loaded"] == 0


# -- the session interface ---------------------------------------------------------------


class CountingSerializer(TaggedJSONSerializer):
    """Flask's cookie payload serializer, counting the cookies it decodes."""

    def __init__(self) -> None:
        super().__init__()
        self.decoded = 0

    def loads(self, value):
        self.decoded += 1
        return super().loads(value)


class CountingInterface(SecureCookieSessionInterface):
    """Flask's cookie interface with its own cookie name and attribute, counting opens and saves."""

    pickle_based = True  # a class attribute SessionInterface also defines
    team = "platform"  # one it does not

    def __init__(self, cookie_name: str = "session") -> None:
        self.cookie_name = cookie_name
        self.serializer = CountingSerializer()
        self.opened = self.saved = 0

    def get_cookie_name(self, app):
        return self.cookie_name

    def open_session(self, app, request):
        self.opened += 1
        return super().open_session(app, request)

    def save_session(self, app, session, response):
        self.saved += 1
        super().save_session(app, session, response)


def test_an_unobserved_static_request_does_not_decode_the_session_cookie(tmp_path):
    app = make_app(tmp_path)
    interface = app.session_interface = SecureCookieSessionInterface()
    serializer = interface.serializer = CountingSerializer()
    client = app.test_client()
    client.get("/login")
    client.get("/theme")
    decoded = serializer.decoded
    assert decoded >= 1  # the theme request read the login cookie
    for path in ("/static/app.css", "/static/missing.css", "/listed/nothing-here"):
        response = client.get(path)
        assert "Set-Cookie" not in response.headers and "Cookie" not in response.vary, path
    assert serializer.decoded == decoded
    assert client.get("/favicon.ico").json["anonymous"] is False  # a view that asks decodes once
    assert serializer.decoded == decoded + 1
    assert client.get("/").json == {"anonymous": False, "identity": "7"}  # pages still read it...
    assert serializer.decoded == decoded + 1  # ...from the verified decode of the same cookie (sessions.py)


def test_a_custom_session_interface_set_before_the_first_request_is_wrapped_and_used(tmp_path):
    app = make_app(tmp_path)
    custom = app.session_interface = CountingInterface("sid")
    client = app.test_client()
    client.get("/login")
    assert client.get_cookie("sid") is not None and client.get_cookie("session") is None
    wrapper = app.session_interface
    assert wrapper is not custom and wrapper.__wrapped__ is custom
    assert wrapper.get_cookie_name(app) == "sid"
    assert wrapper.pickle_based is True and wrapper.team == "platform" and wrapper.serializer is custom.serializer
    assert wrapper.null_session_class is custom.null_session_class
    opened, saved = custom.opened, custom.saved
    response = client.get("/static/app.css")
    assert (custom.opened, custom.saved) == (opened, saved)
    assert "Set-Cookie" not in response.headers and "Cookie" not in response.vary
    assert client.get("/").json == {"anonymous": False, "identity": "7"}
    assert custom.opened == opened + 1 and custom.saved == saved + 1
    client.get("/theme")
    assert client.get("/session").json["theme"] == "dark"
    wrapper.team = "identity"  # writes reach the wrapped interface too
    assert custom.team == "identity" and "team" not in vars(type(wrapper))


def test_session_transaction_of_the_test_client_opens_and_saves_the_real_session(tmp_path):
    app = make_app(tmp_path)
    client = app.test_client()
    client.get("/login")  # the first request wrapped the interface
    assert hasattr(app.session_interface, "__wrapped__")
    with client.session_transaction() as transaction:
        assert transaction["_user_id"] == "7"
        transaction["theme"] = "light"
    assert client.get("/session").json["theme"] == "light"
    assert client.get("/").json["anonymous"] is False
    assert client.get("/listed/session").json["seen"]["theme"] == "light"


def test_installing_again_neither_wraps_twice_nor_duplicates_the_hooks(tmp_path):
    app = make_app(tmp_path)
    custom = app.session_interface = CountingInterface()
    client = app.test_client()
    client.get("/login")
    wrapper = app.session_interface
    hooks = _hooks_of(app)
    app.wsgi_app.rebuild()
    install(app)
    assert app.session_interface is wrapper and wrapper.__wrapped__ is custom
    assert _hooks_of(app) == hooks
    assert sum(1 for f in hooks if getattr(f, SAFE_ATTRIBUTE, False)) == 2
    opened = custom.opened
    client.get("/static/app.css")
    assert custom.opened == opened
    assert client.get("/").json["anonymous"] is False


def test_an_interface_replaced_after_installation_works_as_in_the_bare_app_and_is_wrapped_on_rebuild(tmp_path):
    app = make_app(tmp_path, REMEMBER_COOKIE_REFRESH_EACH_REQUEST=True)
    client = app.test_client()
    client.get("/login")
    client.get("/theme")
    replaced = app.session_interface = CountingInterface()
    opened = replaced.opened
    response = client.get("/static/app.css")
    # Not ours: it decodes the cookie as in the bare app (only slower than a wrapped one).
    assert replaced.opened == opened + 1 and response.status_code == 200
    assert client.get("/listed/session").json["seen"]["theme"] == "dark"
    app.wsgi_app.rebuild()
    assert app.session_interface.__wrapped__ is replaced
    opened = replaced.opened
    response = client.get("/static/app.css")
    assert replaced.opened == opened and "Set-Cookie" not in response.headers


def test_an_unopened_lazy_session_is_never_saved_even_by_an_interface_with_its_own_null_test(tmp_path):
    class StrictInterface(CountingInterface):
        def is_null_session(self, obj):
            return type(obj) is self.null_session_class  # anything else would be saved

    app = make_app(tmp_path)
    strict = app.session_interface = StrictInterface()
    client = app.test_client()
    client.get("/login")
    saved = strict.saved
    response = client.get("/static/app.css")
    assert strict.saved == saved
    assert "Set-Cookie" not in response.headers and "Cookie" not in response.vary
    response = client.get("/listed/session")  # reads and writes: the real session, saved by it
    assert strict.saved == saved + 1 and "Set-Cookie" in response.headers
    wrapper = app.session_interface
    assert wrapper.is_null_session(wrapper.make_null_session(app))
    assert not wrapper.is_null_session(strict.session_class())


def test_a_lazy_session_opens_on_first_use_and_then_is_the_real_session(tmp_path):
    app = make_app(tmp_path)
    seen = {}

    @app.get("/listed/inspect")
    def inspect_session():
        lazy = session._get_current_object()
        seen["lazy"] = type(lazy) is LazySession
        seen["opened_before"] = lazy.opened
        seen["is_secure_cookie_session"] = isinstance(session, SecureCookieSession)
        seen["opened_after"] = lazy.opened
        seen["user_id"] = session.get("_user_id")
        seen["keys"] = sorted(session)
        seen["permanent"] = session.permanent
        return "ok"

    client = app.test_client()
    client.get("/login")
    client.get("/listed/inspect")
    assert seen == {
        "lazy": True,
        "opened_before": False,
        "is_secure_cookie_session": True,
        "opened_after": True,
        "user_id": "7",
        "keys": ["_fresh", "_id", "_user_id", "identity.auth_type", "identity.id"],
        "permanent": False,
    }




# -- Principal --------------------------------------------------------------------------


def test_every_principal_of_the_app_is_wrapped_once(tmp_path):
    app = make_app(tmp_path)
    second = Principal(app)
    loaded = []
    second.identity_loader(lambda: loaded.append(1))
    client = app.test_client()
    client.get("/login")
    loaded.clear()
    client.get("/static/app.css")
    assert loaded == []
    client.get("/")
    assert loaded == [1]
    principals = principals_of(app)
    assert len(principals) == 2
    app.wsgi_app.rebuild()
    app.wsgi_app.rebuild()
    assert principals_of(app) == principals
    hooks = [f for f in app.before_request_funcs[None] if getattr(f, SAFE_ATTRIBUTE, False)]
    # rebuilding did not wrap the wrappers: each holds Principal's own bound method
    assert [f.__wrapped__.__self__ for f in hooks] == principals
    assert all(f.__wrapped__.__func__ is Principal._on_before_request for f in hooks)
    assert all("_is_static_route" not in vars(p) for p in principals)


def test_two_principals_on_a_marked_request_load_in_order_on_first_use(tmp_path):
    results = {}
    for wrap in ("first", "no"):
        app = make_app(tmp_path / wrap, wrap=wrap)
        second = Principal(app, use_sessions=False)
        second.identity_loader(lambda: Identity("from-second"))

        @app.get("/listed/who")
        def who(app=app):
            return jsonify(identity=str(g.identity.id), calls=app.extensions["calls"]["identity_loaded"])

        client = app.test_client()
        client.get("/login")
        app.extensions["calls"]["identity_loaded"] = 0
        results[wrap] = client.get("/listed/who").json
    # Both loads ran (identity_loaded twice), the last Principal's identity is the one seen.
    assert results["first"] == results["no"] == {"identity": "from-second", "calls": 2}


def test_principal_skip_static_keeps_its_own_meaning(tmp_path):
    # Principal's prefix test calls /static-reports static; the middleware does not
    # fix or change that for unmarked requests, it only adds marked ones.
    results = {}
    for wrap in ("first", "no"):
        app = make_app(tmp_path / wrap, wrap=wrap)
        principal = principals_of(app)[0]
        principal.skip_static = True

        @app.get("/static-reports")
        def reports():
            return jsonify(has_identity=hasattr(g, "identity"))

        client = app.test_client()
        client.get("/login")
        results[wrap] = client.get("/static-reports").json
    assert results["first"] == results["no"] == {"has_identity": False}


def test_identity_changed_during_a_static_request_works_as_in_the_bare_app(tmp_path):
    results = {}
    for wrap in ("first", "no"):
        app = make_app(tmp_path / wrap, wrap=wrap)

        @app.get("/listed/switch")
        def switch(app=app):
            identity_changed.send(app, identity=Identity("99"))
            return jsonify(identity=str(g.identity.id), cls=type(g.identity).__name__)

        client = app.test_client()
        client.get("/login")
        switched = client.get("/listed/switch").json
        results[wrap] = (switched, client.get("/").json["identity"])
    assert results["first"] == results["no"] == ({"identity": "99", "cls": "Identity"}, "99")


def test_g_identity_is_loaded_on_first_read_and_is_the_real_identity_object(tmp_path):
    app = make_app(tmp_path)
    seen = {}

    @app.get("/listed/identity")
    def identity():
        calls = app.extensions["calls"]
        seen["loaded_before"] = calls["identity_loaded"]
        seen["present"] = "identity" in g
        seen["type"] = type(g.identity).__name__
        seen["same_object"] = g.identity is g.get("identity")
        seen["loaded_after"] = calls["identity_loaded"]
        return "ok"

    client = app.test_client()
    client.get("/login")
    app.extensions["calls"]["identity_loaded"] = 0
    client.get("/listed/identity")
    assert seen == {"loaded_before": 0, "present": True, "type": "Identity", "same_object": True, "loaded_after": 1}


def test_an_app_g_class_of_its_own_keeps_working_with_an_eager_identity(tmp_path):
    class Namespace:  # not derived from Flask's: nothing to extend
        def get(self, name, default=None):
            return self.__dict__.get(name, default)

        def __contains__(self, name):
            return name in self.__dict__

    app = make_app(tmp_path)
    app.app_ctx_globals_class = Namespace
    client = app.test_client()
    client.get("/login")
    calls = app.extensions["calls"]
    calls.update(identity_loaded=0)
    assert client.get("/static/app.css").status_code == 200
    assert calls["identity_loaded"] == 1  # loaded eagerly, as without the middleware
    assert client.get("/listed/admin").status_code == 200


def test_a_g_subclass_set_by_the_app_is_extended_not_replaced(tmp_path):
    from flask.ctx import _AppCtxGlobals

    class Audited(_AppCtxGlobals):
        audited = True

    app = make_app(tmp_path)
    app.app_ctx_globals_class = Audited
    seen = {}

    @app.get("/listed/g")
    def show_g():
        seen["audited"] = g.audited and isinstance(g._get_current_object(), Audited)
        seen["identity"] = str(g.identity.id)
        return "ok"

    client = app.test_client()
    client.get("/login")
    client.get("/listed/g")
    assert seen == {"audited": True, "identity": "7"}


def test_a_g_class_with_its_own_contains_and_get_keeps_them_and_still_defers(tmp_path):
    from flask.ctx import _AppCtxGlobals

    asked = []

    class Recording(_AppCtxGlobals):
        def __contains__(self, item):
            asked.append(("in", item))
            return super().__contains__(item)

        def get(self, name, default=None):
            asked.append(("get", name))
            return super().get(name, default)

    app = make_app(tmp_path)
    app.app_ctx_globals_class = Recording
    calls = app.extensions["calls"]
    seen = {}

    @app.get("/listed/g")
    def show_g():
        seen["loaded_before"] = calls["identity_loaded"]
        seen["in"] = "identity" in g
        seen["get"] = str(g.get("identity").id)
        seen["loaded_after"] = calls["identity_loaded"]
        return "ok"

    client = app.test_client()
    client.get("/login")
    calls["identity_loaded"] = 0
    asked.clear()
    assert client.get("/").json == {"anonymous": False, "identity": "7"}  # dynamic: Flask-Login asks `in g`
    assert ("in", "_login_user") in asked
    client.get("/listed/g")
    assert ("in", "identity") in asked and ("get", "identity") in asked
    assert seen == {"loaded_before": 1, "in": True, "get": "7", "loaded_after": 2}


def test_the_g_class_built_for_flasks_own_answers_in_and_get_like_flasks(tmp_path):
    from flask.ctx import _AppCtxGlobals

    app = make_app(tmp_path)
    seen = {}

    @app.get("/listed/g")
    def show_g():
        plain = _AppCtxGlobals()
        for namespace in (g, plain):
            namespace.x = None
        # a marked request: nothing has loaded the user; asking for the identity loads both
        seen["in"] = [(name in g, name in plain) for name in ("x", "y", "_login_user", "identity", "_login_user")]
        seen["get"] = [(g.get(name, 0), plain.get(name, 0)) for name in ("x", "y")]
        return "ok"

    client = app.test_client()
    client.get("/login")
    client.get("/listed/g")
    assert seen["in"] == [(True, True), (False, False), (False, False), (True, False), (True, False)]
    assert seen["get"] == [(None, None), (0, 0)]


# -- startup checks ---------------------------------------------------------------------


def test_missing_principal_internal_fails_at_construction(tmp_path, monkeypatch):
    app = Flask("missing", root_path=str(tmp_path))
    monkeypatch.delattr(Principal, "_is_static_route")
    with pytest.raises(RuntimeError, match=r"Flask-Principal 0\.4\.0.*_is_static_route is missing"):
        IdentityMiddleware(app.wsgi_app)


def test_flask_login_without_its_remember_cookie_hook_fails_at_construction(tmp_path, monkeypatch):
    monkeypatch.delattr(LoginManager, "_update_remember_cookie")
    with pytest.raises(RuntimeError, match=r"Flask-Login 0\.6\.3.*_update_remember_cookie is missing"):
        IdentityMiddleware(Flask("missing", root_path=str(tmp_path)).wsgi_app)


def test_session_interface_without_open_session_fails_at_construction(tmp_path, monkeypatch):
    monkeypatch.delattr(SessionInterface, "open_session")
    with pytest.raises(RuntimeError, match=r"Flask 3\.\d+\.\d+.*SessionInterface\.open_session is missing"):
        IdentityMiddleware(Flask("missing", root_path=str(tmp_path)).wsgi_app)


def test_principal_subclass_that_ignores_the_seam_fails_at_first_request(tmp_path):
    class EagerPrincipal(Principal):
        def _on_before_request(self):
            g.identity = AnonymousIdentity()

    app = Flask("eager", root_path=str(tmp_path))
    app.wsgi_app = IdentityMiddleware(app.wsgi_app)
    EagerPrincipal(app)
    with pytest.raises(RuntimeError, match=r"EagerPrincipal\._on_before_request no longer consults"):
        app.test_client().get("/")


def test_shipped_example_app_with_the_user_cache_runs_no_sql_for_assets(example_app, logged_in, engine):
    stats = example_app.extensions["example"]
    stats.loader_calls = stats.identity_loaded_calls = 0
    with count_sql(engine) as statements:
        for path in ASSETS:
            response = logged_in.get(path)
            assert response.status_code == 200, path
            assert "Set-Cookie" not in response.headers and "Cookie" not in response.vary
    assert statements == [] and stats.loader_calls == 0 and stats.identity_loaded_calls == 0
    assert b'<span id="roles">admin, editor</span>' in logged_in.get("/").data
    assert stats.identity_loaded_calls == 1
