"""What authentication costs a small logged-in JSON request, and which part of it costs what.

The endpoint (issue 11)::

    @app.get("/api/me")
    @login_required
    @Permission(RoleNeed("admin")).require(http_exception=403)
    def me():
        return jsonify(name=current_user.name, roles=[r.name for r in current_user.roles])

Users and roles are many-to-many in SQLAlchemy (Flask-SQLAlchemy, SQLite file),
the ``identity_loaded`` handler is the one from Flask-Principal's documentation.
The same logged-in request (the same signed cookie) goes to:

* ``no authentication``: the same endpoint returning the same bytes from
  constants, in an app without Flask-Login, Flask-Principal, SQLAlchemy or a
  ``SECRET_KEY`` (so no session cookie is read) -- the anchor, target <= 3.0x;
* ``no authentication, session decoded``: the same with a ``SECRET_KEY``, so
  Flask verifies and decodes the cookie it is sent (shows what that alone costs);
* ``naive``: Flask-Login + Flask-Principal + SQLAlchemy, nothing of ours;
* ``ours, sessions left to Flask``: the same app behind ``IdentityMiddleware``
  with ``UserCache`` and ``bind_sqlalchemy``, but with a session interface that
  :mod:`identity_middleware.sessions` does not take over (what the package did
  before it had that module);
* ``ours``: the same as installed by default, with the signed-cookie session
  layer (no re-signing of an unchanged session, a cache of verified cookies);
* ``ours, and the handler under @memoize_identity``: the same, with the app's
  opt-in that its ``identity_loaded`` handler depends only on the user
  (:mod:`identity_middleware.identity_memo`): on a cache hit its recorded effect
  is replayed instead of running it.

Every app must answer with the same status and body before anything is timed.
Requests are interleaved in short rounds whose order rotates, so a noisy
neighbour hits every app alike; the median round is reported.

In the same rounds, an instrumented twin of each authenticated app times each
part of the identity work inside its real requests (exclusive time: a part
excludes the parts it calls), per request:

* ``session open`` / ``session save``: the session interface's methods (the
  save is where Flask re-signs the cookie Flask-Principal's saver marked modified);
* ``identity load``: Flask-Principal's ``before_request`` -- the session
  identity loader, ``set_identity``, the saver, ``identity_loaded`` and its
  handler -- without the user load the handler triggers;
* ``user hit``: Flask-Login's ``_load_user`` -- session protection, the loader
  and, for ours, the cache and the user's reattachment to the SQLAlchemy session;
* ``SQLAlchemy teardown``: Flask-SQLAlchemy removing the request's session.

``rest`` is the twin's request time minus its parts: Flask itself, routing,
the view and its decorators, JSON, our middleware and hooks, and the timers.
Ratios matter; microseconds do not.

Run: ``python -m benchmarks.dynamic [--quick]``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from flask import Flask, jsonify
from flask.sessions import SecureCookieSessionInterface, SessionInterface
from flask_login import LoginManager, current_user, login_required, login_user
from flask_principal import (
    Identity,
    Permission,
    Principal,
    RoleNeed,
    UserNeed,
    identity_changed,
    identity_loaded,
)
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Column, ForeignKey, String, Table, event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from werkzeug.test import EnvironBuilder

from identity_middleware import sessions

from ._common import markdown_table, standalone

BENCHMARK = "dynamic"
PATH = "/api/me"
SECRET = "benchmark-only-secret"

NO_AUTH = "no authentication"
NO_AUTH_SESSION = "no authentication, session decoded"
NAIVE = "naive Login + Principal + SQLAlchemy"
OURS = "ours, sessions left to Flask"
OURS_SESSIONS = "ours: middleware + UserCache + bind_sqlalchemy (+ its session layer)"
OURS_MEMO = "ours, and the handler under @memoize_identity"

#: The apps whose parts are timed, each through an instrumented twin.
TIMED = (NAIVE, OURS, OURS_SESSIONS, OURS_MEMO)


class Models(NamedTuple):
    """One app's Flask-SQLAlchemy extension and models."""

    db: SQLAlchemy
    User: Any
    Role: Any


def models() -> Models:
    """A Flask-SQLAlchemy extension with its own users and roles, for one app.

    Every app of the run gets its own, as a deployed app has: apps sharing one
    session factory and one mapped class would each pay every other app's
    ``bind_sqlalchemy`` listeners (measured: +2.4% instructions per request of
    ours with six bindings in the process), and the naive app would pay them too.
    """

    class Base(DeclarativeBase):
        pass

    db = SQLAlchemy(model_class=Base)
    user_roles = Table(
        "dyn_user_roles",
        Base.metadata,
        Column("user_id", ForeignKey("dyn_users.id"), primary_key=True),
        Column("role_id", ForeignKey("dyn_roles.id"), primary_key=True),
    )

    class Role(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "dyn_roles"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(80))

    class User(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "dyn_users"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(80))
        active: Mapped[bool] = mapped_column(default=True)
        roles: Mapped[list[Role]] = relationship(secondary=user_roles, order_by=Role.name)

        is_authenticated = True
        is_anonymous = False

        @property
        def is_active(self) -> bool:
            return self.active

        def get_id(self) -> str:
            return str(self.id)

    return Models(db, User, Role)


admin = Permission(RoleNeed("admin"))


# -- the apps ---------------------------------------------------------------------------


def no_auth_app(*, secret: bool = False) -> Flask:
    """The endpoint with constants instead of a user; ``secret`` makes Flask read the session cookie."""
    app = Flask(f"no_auth_{int(secret)}")
    if secret:
        app.config["SECRET_KEY"] = SECRET

    @app.get(PATH)
    def me() -> Any:
        return jsonify(name="alice", roles=["admin", "editor"])

    return app


def auth_app(
    database_url: str, *, ours: bool = False, with_sessions: bool = False, memoize: bool = False
) -> Flask:
    """The endpoint behind Flask-Login + Flask-Principal + SQLAlchemy; ``ours`` adds the middleware."""
    app = Flask("ours_memo" if memoize else "ours_sessions" if with_sessions else "ours" if ours else "naive")
    app.config.update(SECRET_KEY=SECRET, SQLALCHEMY_DATABASE_URI=database_url)
    db, User, Role = models()
    db.init_app(app)
    login_manager = LoginManager(app)
    Principal(app)

    def load_user(user_id: str) -> Any:
        return db.session.get(User, int(user_id))

    if ours:
        from identity_middleware import IdentityMiddleware, UserCache
        from identity_middleware.sqlalchemy import bind_sqlalchemy

        user_cache = UserCache(app, ttl=3600)  # hits only: the run must not outlive an entry
        bind_sqlalchemy(user_cache, db.session, User, relationships=("roles",), related=(Role,))
        login_manager.user_loader(user_cache.cached(load_user))
        app.extensions["dynamic_user_cache"] = user_cache
    else:
        login_manager.user_loader(load_user)

    def on_identity_loaded(sender: Flask, identity: Identity) -> None:
        identity.user = current_user
        if current_user.is_authenticated:
            identity.provides.add(UserNeed(current_user.id))
            for role in current_user.roles:
                identity.provides.add(RoleNeed(role.name))

    if memoize:
        from identity_middleware import memoize_identity

        on_identity_loaded = memoize_identity(on_identity_loaded)
    identity_loaded.connect(on_identity_loaded, sender=app, weak=False)

    @app.get(PATH)
    @login_required
    @admin.require(http_exception=403)
    def me() -> Any:
        return jsonify(name=current_user.name, roles=[role.name for role in current_user.roles])

    @app.post("/login")
    def login() -> Any:
        user = db.session.get(User, 1)
        assert user is not None
        login_user(user)
        identity_changed.send(app, identity=Identity(user.id))
        return "", 204

    with app.app_context():
        db.create_all()
        if db.session.get(User, 1) is None:
            admin_role, editor = Role(id=1, name="admin"), Role(id=2, name="editor")
            db.session.add(User(id=1, name="alice", roles=[admin_role, editor]))
            db.session.commit()
        app.extensions["dynamic_engine"] = db.engine

    if ours:
        from identity_middleware import IdentityMiddleware

        app.wsgi_app = IdentityMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    if ours and not with_sessions:
        app.session_interface = _FlaskOnlySessions()
    if with_sessions and not sessions.install(app):  # what the middleware's first request does
        raise RuntimeError("sessions.install left the app's session interface alone")
    return app


class _FlaskOnlySessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions with a method overridden, so sessions.py leaves them alone."""

    def should_set_cookie(self, app: Flask, session: Any) -> bool:
        return super().should_set_cookie(app, session)


def build(folder: str) -> dict[str, Flask]:
    """Every variant, each with its own SQLite file in ``folder``."""
    os.makedirs(folder, exist_ok=True)

    def url(name: str) -> str:
        return f"sqlite:///{os.path.join(folder, name + '.db')}"

    return {
        NO_AUTH: no_auth_app(),
        NO_AUTH_SESSION: no_auth_app(secret=True),
        NAIVE: auth_app(url("naive")),
        OURS: auth_app(url("ours"), ours=True),
        OURS_SESSIONS: auth_app(url("ours_sessions"), ours=True, with_sessions=True),
        OURS_MEMO: auth_app(url("ours_memo"), ours=True, with_sessions=True, memoize=True),
    }


def shared_login(*apps: Flask) -> dict[str, Any]:
    """Log in once in every authenticated app, then return the environ of the last login.

    Each app's first request installs the middleware's hooks and its first save
    starts its session layer, which re-signs once any cookie signed before that
    (sessions.py: its attributes may predate the settings). A browser keeps the
    re-signed cookie; this fixed environ cannot, so it is signed after every app
    has saved once, and is valid in all of them (one SECRET_KEY).
    """
    authenticated = [app for app in apps if "dynamic_engine" in app.extensions]
    for app in authenticated:
        logged_in_environ(app)
    return logged_in_environ(authenticated[-1])


def logged_in_environ(app: Flask) -> dict[str, Any]:
    """A GET of the endpoint carrying the session cookie of a fresh login (valid in every app)."""
    client = app.test_client()
    if client.post("/login").status_code != 204:
        raise RuntimeError("login failed")
    cookie = client.get_cookie("session")
    if cookie is None:
        raise RuntimeError("login set no session cookie")
    # The login's own address and User-Agent: with others Flask-Login's session
    # protection would mark the session non-fresh on every request (a real change).
    headers = [("Cookie", f"session={cookie.value}")]
    return EnvironBuilder(path=PATH, headers=headers, environ_base=client.environ_base).get_environ()


class Answer:
    """What one request returned: status, headers and body."""

    def __init__(self) -> None:
        self.status = ""
        self.headers: list[tuple[str, str]] = []

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        self.status, self.headers = status, headers

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


def call(app: Any, environ: dict[str, Any]) -> tuple[Answer, bytes]:
    """One request with a fresh copy of ``environ``; the body consumed and closed."""
    answer = Answer()
    app_iter = app(dict(environ), answer.start_response)
    try:
        body = b"".join(app_iter)
    finally:
        close = getattr(app_iter, "close", None)
        if close is not None:
            close()
    return answer, body


def _request(app: Any, environ: dict[str, Any]) -> None:
    app_iter = app(dict(environ), _ignore)
    try:
        for _ in app_iter:
            pass
    finally:
        close = getattr(app_iter, "close", None)
        if close is not None:
            close()


def _ignore(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    return None


# -- the parts --------------------------------------------------------------------------


class _PartTimer:
    """Exclusive time per named part: a part's time excludes the parts it calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PARTS, 0.0)
        self.requests = 0
        self._children: list[float] = []

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.requests = 0

    def wrap(self, part: str, function: Callable[..., Any]) -> Callable[..., Any]:
        children = self._children

        def timed(*args: Any, **kwargs: Any) -> Any:
            children.append(0.0)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                self.seconds[part] += elapsed - children.pop()
                if children:
                    children[-1] += elapsed

        return timed

    def us_per_request(self) -> dict[str, float]:
        return {part: seconds / max(1, self.requests) * 1e6 for part, seconds in self.seconds.items()}


#: The parts timed inside real requests, in the order they run.
PARTS = ("session open", "identity load", "user hit", "session save", "SQLAlchemy teardown")


class _TimedSessions(SessionInterface):
    """The app's session interface with its open and save timed; everything else forwarded."""

    def __init__(self, wrapped: SessionInterface, timer: _PartTimer) -> None:
        self.__dict__["_wrapped"] = wrapped
        self.__dict__["open_session"] = timer.wrap("session open", wrapped.open_session)
        self.__dict__["save_session"] = timer.wrap("session save", wrapped.save_session)
        self.__dict__["is_null_session"] = wrapped.is_null_session
        self.__dict__["make_null_session"] = wrapped.make_null_session

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_wrapped"], name)


def instrument(app: Flask) -> _PartTimer:
    """Time each part of the identity work inside ``app``'s real requests (after its first request).

    * session open / save: the session interface's methods;
    * identity load: Flask-Principal's ``before_request`` (the session identity
      loader, ``set_identity``, the saver, ``identity_loaded`` and its handler),
      without the user load it triggers;
    * user hit: Flask-Login's ``_load_user`` (session protection, the loader and,
      for ours, the cache and the reattachment in the SQLAlchemy session);
    * SQLAlchemy teardown: Flask-SQLAlchemy removing the request's session.
    """
    timer = _PartTimer()
    app.session_interface = _TimedSessions(app.session_interface, timer)
    manager = app.login_manager  # type: ignore[attr-defined]
    manager._load_user = timer.wrap("user hit", manager._load_user)
    functions = app.before_request_funcs[None]
    for index, function in enumerate(functions):
        # The middleware's first request puts its own wrapper in Principal's place; the
        # wrapper runs Principal's load on a dynamic request, so timing it times the load.
        owner = getattr(getattr(function, "__wrapped__", function), "__self__", None)
        if isinstance(owner, Principal):
            functions[index] = timer.wrap("identity load", function)
    app.teardown_appcontext_funcs[:] = [
        timer.wrap("SQLAlchemy teardown", function)
        if isinstance(getattr(function, "__self__", None), SQLAlchemy)
        else function
        for function in app.teardown_appcontext_funcs
    ]
    return timer


def _measure(
    apps: dict[str, Flask], timed: dict[str, tuple[Flask, _PartTimer]], environ: dict[str, Any], *, rounds: int, batch: int
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Median microseconds per request of each app; mean microseconds per part of each timed twin.

    One round takes every app and every instrumented twin in turn (the order
    rotates from round to round), ``batch`` requests each, so the totals and the
    parts share their neighbours' noise. Round 0 warms up and is not recorded.
    """
    subjects: list[tuple[str, Flask, _PartTimer | None]] = [(name, app, None) for name, app in apps.items()]
    subjects += [(name, app, timer) for name, (app, timer) in timed.items()]
    samples: dict[str, list[float]] = {name: [] for name in apps}
    instrumented: dict[str, list[float]] = {name: [] for name in timed}
    for index in range(rounds + 1):
        shift = index % len(subjects)
        for name, app, timer in subjects[shift:] + subjects[:shift]:
            started = time.perf_counter()
            for _ in range(batch):
                _request(app, environ)
            elapsed = (time.perf_counter() - started) / batch * 1e6
            if timer is not None:
                if index == 0:
                    timer.reset()
                else:
                    timer.requests += batch
                    instrumented[name].append(elapsed)
            elif index:
                samples[name].append(elapsed)
    totals = {name: statistics.median(values) for name, values in samples.items()}
    parts = {}
    for name, (_, timer) in timed.items():
        parts[name] = timer.us_per_request()
        parts[name]["_instrumented request"] = statistics.median(instrumented[name])
    return totals, parts


# -- the run ----------------------------------------------------------------------------


def _check(apps: dict[str, Flask], environ: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every app answers 200 with the same body; what each sends besides, and its SQL per request."""
    notes: dict[str, dict[str, Any]] = {}
    expected: bytes | None = None
    for name, app in apps.items():
        for _ in range(3):  # the first requests fill caches
            answer, body = call(app, environ)
        if not answer.status.startswith("200"):
            raise RuntimeError(f"{name} answered {answer.status}: {body[:200]!r}")
        if expected is None:
            expected = body
        elif body != expected:
            raise RuntimeError(f"{name} answered {body!r}, the no-auth app {expected!r}")
        statements = 0
        engine = app.extensions.get("dynamic_engine")
        if engine is not None:
            seen: list[str] = []

            def count(*args: Any, seen: list[str] = seen) -> None:
                seen.append(args[2])

            event.listen(engine, "before_cursor_execute", count)
            try:
                call(app, environ)
            finally:
                event.remove(engine, "before_cursor_execute", count)
            statements = len(seen)
        notes[name] = {
            "set_cookie": bool(answer.header("Set-Cookie")),
            "vary": ", ".join(answer.header("Vary")) or None,
            "sql": statements,
        }
    return notes


def run(quick: bool = False) -> list[dict[str, Any]]:
    """One row per app (time, × the no-auth app), then one row per part per authenticated app."""
    rounds, batch = (20, 10) if quick else (201, 10)
    with tempfile.TemporaryDirectory() as folder:
        apps = build(folder)
        twins = {name: app for name, app in build(os.path.join(folder, "timed")).items() if name in TIMED}
        environ = shared_login(*apps.values(), *twins.values())
        notes = _check(apps, environ)
        _check(twins, environ)
        timed = {name: (app, instrument(app)) for name, app in twins.items()}
        started = time.perf_counter()
        totals, parts = _measure(apps, timed, environ, rounds=rounds, batch=batch)
        seconds = time.perf_counter() - started
        stats = sessions.find(apps[OURS_SESSIONS]).stats()  # type: ignore[union-attr]
    anchor = totals[NO_AUTH]
    rows: list[dict[str, Any]] = []
    for name, us in totals.items():
        row: dict[str, Any] = {
            "benchmark": BENCHMARK,
            "case": f"GET {PATH} JSON, logged in admin",
            "variant": name,
            "us_per_request": round(us, 1),
            "vs_no_auth": round(us / anchor, 2),
        }
        if name in (OURS, OURS_SESSIONS, OURS_MEMO):
            row["target"] = "<= 3.0x"
        row.update({k: v for k, v in notes[name].items() if v})
        rows.append(row)
    for name, by_part in parts.items():
        whole = by_part.pop("_instrumented request")
        for part, us in by_part.items():
            rows.append(
                {
                    "benchmark": BENCHMARK,
                    "case": f"part: {part}",
                    "variant": name,
                    "us": round(us, 1),
                    "share_of_request": f"{us / whole:.0%}",
                }
            )
        rest = whole - sum(by_part.values())
        rows.append(
            {
                "benchmark": BENCHMARK,
                "case": "rest: Flask, routing, view, JSON, decorators, our hooks",
                "variant": name,
                "us": round(rest, 1),
                "share_of_request": f"{rest / whole:.0%}",
                "instrumented_request_us": round(whole, 1),
            }
        )
    rows.append(
        {
            "benchmark": BENCHMARK,
            "case": "sessions.install decode cache during the run",
            "variant": OURS_SESSIONS,
            "hits": stats.hits,
            "misses": stats.misses,
            "writes_skipped": stats.writes_skipped,
            "writes": stats.writes,
            "timed_seconds": round(seconds, 1),
        }
    )
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    cells = []
    for row in rows:
        if "us_per_request" in row:
            cells.append((row["case"], row["variant"], f"{row['us_per_request']:.1f}", f"{row['vs_no_auth']:.2f}x"))
        elif "us" in row:
            cells.append((row["case"], row["variant"], f"{row['us']:.1f}", row["share_of_request"]))
    return markdown_table(("case", "variant", "us", "x no-auth / share"), cells)


if __name__ == "__main__":
    standalone("Authentication overhead on a logged-in JSON request", run, _table)
