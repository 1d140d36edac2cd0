"""Observational equivalence (DESIGN §5.0): wrapping an app changes nothing its code can see.

Each test builds the same app twice -- bare, and wrapped in ``IdentityMiddleware``
(with or without a ``UserCache``) -- applies the same customisations to both,
drives both with the same kind of client and the same requests, and compares
what comes back: status, body and every header. The one allowed difference
(§5.0): on a request the middleware marked, the wrapped response may *lack* a
``Set-Cookie`` that the bare app's identity machinery (Principal's saver, the
remember-cookie upkeep) added merely to restate the session, or ``Vary: Cookie``
when nothing read the session; it never adds or changes one. After every
sequence a page that shows the user, the identity and the session's keys is
compared too, so a skipped write that mattered would show.

The customisations are the ways real apps observe identity on static requests:
a login gate, a Permission gate, an audit header, observers that run before any
``before_request``, a static view wrapped in ``login_required``, a blueprint
view named ``static``, a websocket rule under ``/static/``. A hypothesis test
draws combinations of them, clients and request paths.
"""

from __future__ import annotations

import json

import pytest
from conftest import count_sql
from flask import Blueprint, Flask, g, jsonify, request, request_finished, request_started, session
from flask_login import LoginManager, UserMixin, current_user, login_required, login_user
from flask_principal import Identity, Permission, Principal, RoleNeed, UserNeed, identity_changed, identity_loaded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from identity_middleware import IdentityMiddleware, UserCache, is_static_request

USERS = {"1": ("alice", ("staff",)), "2": ("bob", ())}

CUSTOMISATIONS = (
    "login_gate",
    "permission_gate",
    "audit_header",
    "early_observers",
    "wrapped_static_view",
    "blueprint_view_named_static",
    "websocket_rule",
)

CLIENTS = ("anonymous", "staff", "not_staff", "remember_only")

WEBSOCKET = {"Upgrade": "websocket", "Connection": "Upgrade"}

#: (path, extra headers): static, missing static, blueprint static, listed dynamic, pages.
REQUESTS = (
    ("/static/app.css", {}),
    ("/static/missing.css", {}),
    ("/widgets/static/widget.css", {}),
    ("/favicon.ico", {}),
    ("/static/pages/report", {}),
    ("/static/live", WEBSOCKET),
    ("/static/live", {}),
    ("/", {}),
)


class User(UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id
        self.name, self.roles = USERS[user_id]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One folder for every app: the same files, so ETag and Last-Modified agree."""
    root = tmp_path_factory.mktemp("equivalence")
    (root / "static").mkdir()
    (root / "static" / "app.css").write_text("body { color: teal }")
    (root / "widgets" / "static").mkdir(parents=True)
    (root / "widgets" / "static" / "widget.css").write_text(".widget {}")
    return str(root)

SECRET_KEY = "equivalence-secret"


def _name(user) -> str:
    return user.get_id() or "anonymous"


def build(root: str, customisations=(), *, wrapped: bool, cache: bool = False) -> Flask:
    """The app under test; ``wrapped`` adds IdentityMiddleware, ``cache`` a UserCache."""
    app = Flask("equivalence", root_path=root)
    app.config.update(SECRET_KEY=SECRET_KEY, TESTING=True)
    counts = {"loader": 0}
    app.extensions["counts"] = counts
    manager = LoginManager(app)

    def load_user(user_id):
        counts["loader"] += 1
        return User(user_id) if user_id in USERS else None

    if cache:
        manager.user_loader(UserCache(app).cached(load_user))
    else:
        manager.user_loader(load_user)
    Principal(app)

    @identity_loaded.connect_via(app)
    def on_identity_loaded(sender, identity):
        identity.user = current_user
        if current_user.is_authenticated:
            identity.provides.add(UserNeed(current_user.id))
            for role in current_user.roles:
                identity.provides.add(RoleNeed(role))

    app.extensions["receivers"] = [on_identity_loaded]  # blinker holds receivers weakly

    app.register_blueprint(
        Blueprint("widgets", __name__, static_folder=f"{root}/widgets/static", url_prefix="/widgets")
    )

    @app.get("/login/<user_id>")
    def login(user_id):
        login_user(User(user_id), remember=True)
        identity_changed.send(app, identity=Identity(user_id))
        return "ok"

    @app.get("/")
    def index():
        return f"page for {_name(current_user)}"

    @app.get("/favicon.ico")  # listed as a static path in the wrapped app: a dynamic view
    def favicon():
        return f"icon for {_name(current_user)}"

    @app.get("/whoami")
    def whoami():
        return jsonify(
            user=_name(current_user),
            identity=str(g.identity.id),
            provides=sorted(map(str, g.identity.provides)),
            session=sorted(k for k in session if k != "_id"),
        )

    for name in customisations:
        CUSTOMISE[name](app)
    if wrapped:
        app.wsgi_app = IdentityMiddleware(app.wsgi_app, static_paths=["/favicon.ico"])
        marks: list[bool] = []
        app.extensions["marks"] = marks

        def record_mark(sender, response, **extra):
            marks.append(is_static_request())

        request_finished.connect(record_mark, app)
        app.extensions["receivers"].append(record_mark)
    return app


# -- the customisations ------------------------------------------------------------


def login_gate(app: Flask) -> None:
    @app.before_request
    def require_login():
        if not request.path.startswith("/login/") and not current_user.is_authenticated:
            return "log in first", 401
        return None


def permission_gate(app: Flask) -> None:
    staff = Permission(RoleNeed("staff"))

    @app.before_request
    def staff_only_assets():
        if request.path.startswith("/static/") and not staff.can():
            return "staff only", 403
        return None


def audit_header(app: Flask) -> None:
    @app.after_request
    def record_user(response):
        response.headers["X-User"] = _name(current_user)
        return response


def early_observers(app: Flask) -> None:
    @app.url_value_preprocessor
    def early(endpoint, values):
        g.early_user = _name(current_user)

    def started(sender, **extra):
        g.started_user = _name(current_user)

    request_started.connect(started, app)
    app.extensions["receivers"].append(started)

    @app.after_request
    def report(response):
        response.headers["X-Early-User"] = g.get("early_user", "-")
        response.headers["X-Started-User"] = g.get("started_user", "-")
        return response


def wrapped_static_view(app: Flask) -> None:
    app.view_functions["static"] = login_required(app.view_functions["static"])


def blueprint_view_named_static(app: Flask) -> None:
    pages = Blueprint("pages", __name__, url_prefix="/static/pages")

    @pages.get("/<name>", endpoint="static")
    def page(name):
        return f"{name} for {_name(current_user)}"

    app.register_blueprint(pages)


def websocket_rule(app: Flask) -> None:
    def live():
        return f"live for {_name(current_user)}"

    app.add_url_rule("/static/live", "live", live, websocket=True)


CUSTOMISE = {f.__name__: f for f in (
    login_gate, permission_gate, audit_header, early_observers,
    wrapped_static_view, blueprint_view_named_static, websocket_rule,
)}  # fmt: skip


# -- clients and comparison -----------------------------------------------------------


def client_for(app: Flask, kind: str):
    client = app.test_client()
    if kind in ("staff", "not_staff", "remember_only"):
        assert client.get("/login/" + ("2" if kind == "not_staff" else "1")).status_code == 200
    if kind == "remember_only":
        client.delete_cookie("session")
        assert client.get_cookie("remember_token") is not None
    return client


def _cookie_names(response) -> list[str]:
    return sorted(value.split("=", 1)[0] for value in response.headers.getlist("Set-Cookie"))


def _vary(response) -> list[str]:
    return sorted(response.vary)


def _rest(response) -> tuple:
    # Date is the clock's second when each answer was made (werkzeug's conditional responses
    # add it): the bare and the wrapped request may straddle a second boundary, so only
    # whether both send it is compared.
    headers = sorted(
        (k, "<present>" if k == "Date" else v) for k, v in response.headers.items() if k not in ("Set-Cookie", "Vary")
    )
    return response.status_code, response.get_data(), headers


def _session_data(client):
    """What the client's session cookie holds (verified with the test apps' shared key)."""
    cookie = client.get_cookie("session")
    if cookie is None:
        return None
    probe = Flask(__name__)
    probe.secret_key = SECRET_KEY
    return probe.session_interface.get_signing_serializer(probe).loads(cookie.value)


def assert_equivalent(bare_client, wrapped_client, wrapped_app, requests) -> None:
    marks = wrapped_app.extensions["marks"]
    for path, headers in requests:
        marks.clear()
        sent = _session_data(bare_client)
        bare, wrapped = bare_client.get(path, headers=headers), wrapped_client.get(path, headers=headers)
        where = f"{path} {headers}"
        assert _rest(wrapped) == _rest(bare), where
        if (_cookie_names(wrapped), _vary(wrapped)) != (_cookie_names(bare), _vary(bare)):
            # The allowed differences (DESIGN 5.0) only ever leave something out:
            assert set(_cookie_names(wrapped)) <= set(_cookie_names(bare)), where
            assert set(_vary(wrapped)) <= set(_vary(bare)), where
            if marks != [True]:
                # ...on any request, a session cookie that only restates the session the
                # client sent (sessions.py: Principal's saver re-signs it every request);
                assert _vary(wrapped) == _vary(bare), where
                assert set(_cookie_names(bare)) - set(_cookie_names(wrapped)) == {"session"}, where
                assert _session_data(bare_client) == sent, where
            # ...and on a marked request, also a cookie the identity machinery would only
            # have restated (Flask-Login's remember-cookie upkeep), or Vary: Cookie when
            # nothing read the session.
    bare, wrapped = bare_client.get("/whoami"), wrapped_client.get("/whoami")
    assert (wrapped.status_code, wrapped.json) == (bare.status_code, bare.json)


def compare(root, customisations, client_kind, *, cache, requests=REQUESTS) -> None:
    bare_app = build(root, customisations, wrapped=False)
    wrapped_app = build(root, customisations, wrapped=True, cache=cache)
    assert_equivalent(client_for(bare_app, client_kind), client_for(wrapped_app, client_kind), wrapped_app, requests)


# -- the tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "user-cache"])
@pytest.mark.parametrize("client_kind", CLIENTS)
@pytest.mark.parametrize("customisation", ("none", *CUSTOMISATIONS, "all"))
def test_each_customisation_sees_the_same_as_in_the_bare_app(root, customisation, client_kind, cache):
    chosen = {"none": (), "all": CUSTOMISATIONS}.get(customisation, (customisation,))
    compare(root, chosen, client_kind, cache=cache)


def test_the_cases_of_the_issue_answer_as_the_bare_app_does(root):
    # Spelled out, so a reader sees what the parametrized comparison covers.
    app = build(root, ("login_gate", "audit_header"), wrapped=True)
    staff = client_for(app, "staff")
    response = staff.get("/static/app.css")
    assert response.status_code == 200 and response.headers["X-User"] == "1"  # was 401 / "anonymous"
    assert app.test_client().get("/static/app.css").status_code == 401
    app = build(root, ("permission_gate", "wrapped_static_view"), wrapped=True, cache=True)
    assert client_for(app, "staff").get("/static/app.css").status_code == 200
    assert client_for(app, "not_staff").get("/static/app.css").status_code == 403
    app = build(root, ("blueprint_view_named_static", "websocket_rule"), wrapped=True)
    staff = client_for(app, "staff")
    assert staff.get("/static/pages/q3").data == b"q3 for 1"
    assert staff.get("/static/live", headers=WEBSOCKET).data == b"live for 1"
    assert app.extensions["marks"][-2:] == [False, False]


def test_unobserved_static_requests_run_no_loader_and_send_no_cookie(root):
    for cache in (False, True):
        app = build(root, (), wrapped=True, cache=cache)
        for kind in CLIENTS:
            client = client_for(app, kind)
            app.extensions["counts"]["loader"] = 0
            for path in ("/static/app.css", "/static/missing.css", "/widgets/static/widget.css"):
                response = client.get(path)
                assert response.status_code == (404 if "missing" in path else 200)
                assert "Set-Cookie" not in response.headers, (kind, path)
                assert "Cookie" not in response.vary, (kind, path)
            assert app.extensions["counts"]["loader"] == 0, kind


def test_unobserved_assets_of_the_example_app_run_no_sql(sqlite_url):
    from conftest import log_in

    from examples.app import create_app

    for cache in (False, True):
        app = create_app(sqlite_url, cache=cache)
        stats = app.extensions["example"]
        for client in (app.test_client(), log_in(app.test_client())):
            stats.loader_calls = stats.identity_loaded_calls = 0
            with count_sql(stats.engine) as statements:
                for path in ("/static/app.css", "/widgets/static/widget.css", "/static/missing.css"):
                    response = client.get(path)
                    assert response.status_code == (404 if "missing" in path else 200)
                    assert "Set-Cookie" not in response.headers and "Cookie" not in response.vary
            assert statements == [] and stats.loader_calls == stats.identity_loaded_calls == 0


def test_several_wrapped_apps_in_one_process_each_match_their_bare_twin(root):
    pairs = []
    for customisations in (("login_gate",), ("audit_header", "early_observers"), ("permission_gate",)):
        bare = build(root, customisations, wrapped=False)
        wrapped = build(root, customisations, wrapped=True, cache=True)
        pairs.append((client_for(bare, "staff"), client_for(wrapped, "staff"), wrapped))
    for path, headers in REQUESTS:  # interleaved: each request goes to every app in turn
        for bare_client, wrapped_client, wrapped in pairs:
            assert_equivalent(bare_client, wrapped_client, wrapped, [(path, headers)])


def test_a_session_written_by_a_marked_request_reaches_the_next_request(root):
    def remember_theme(app):
        @app.get("/static/theme/<name>")
        def theme(name):  # shadows the mount: not static, for contrast
            session["theme"] = name
            return "ok"

        @app.after_request
        def stamp(response):
            if request.path == "/static/app.css":
                session["last_asset"] = request.path
            return response

    bare, wrapped = build(root, (), wrapped=False), build(root, (), wrapped=True)
    for app in (bare, wrapped):
        remember_theme(app)
    bare_client, wrapped_client = client_for(bare, "staff"), client_for(wrapped, "staff")
    assert_equivalent(bare_client, wrapped_client, wrapped, [("/static/app.css", {}), ("/static/theme/dark", {})])
    assert json.loads(wrapped_client.get("/whoami").data)["session"] == [
        "_fresh", "_user_id", "identity.auth_type", "identity.id", "last_asset", "theme",
    ]  # fmt: skip


# -- generated apps and paths --------------------------------------------------------------

PATHS = st.sampled_from([
    "/static/app.css", "/static/missing.css", "/static/", "/static", "/static//app.css", "/static/./app.css",
    "/static/../favicon.ico", "/STATIC/app.css", "/static-reports", "/widgets/static/widget.css",
    "/widgets/static/../static/widget.css", "/static/pages/x", "/static/pages/", "/static/live", "/favicon.ico",
    "/favicon.ico/", "/", "/whoami", "/static/app.css%00",
])  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    customisations=st.sets(st.sampled_from(CUSTOMISATIONS)),
    client_kind=st.sampled_from(CLIENTS),
    cache=st.booleans(),
    requests=st.lists(st.tuples(PATHS, st.sampled_from([{}, WEBSOCKET, {"X-Other": "1"}])), min_size=1, max_size=6),
)
def test_generated_apps_and_paths_see_the_same_as_the_bare_app(root, customisations, client_kind, cache, requests):
    compare(root, sorted(customisations), client_kind, cache=cache, requests=requests)
