"""The scenario this project was built for, as a runnable app.

Flask-Login loads the user, Flask-Principal turns its roles into needs, and
SQLAlchemy holds users and roles (many-to-many). Without identity_middleware
every request -- every stylesheet, script and favicon -- runs the user query and
the roles query. ``create_app(middleware=False, cache=False)`` builds exactly
that naive app, so tests, the demo and the benchmarks compare the two.

Run it::

    flask --app examples.app run          # SQLite file in ./instance by default
    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1/test flask --app examples.app run

This is a demo: logging in takes an e-mail address and no password.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from flask import Blueprint, Flask, abort, current_app, g, jsonify, redirect, render_template_string
from flask import request, send_from_directory, session
from flask_login import LoginManager, current_user, login_user, logout_user
from flask_principal import (
    AnonymousIdentity,
    Identity,
    Permission,
    Principal,
    RoleNeed,
    UserNeed,
    identity_changed,
    identity_loaded,
)
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Column, ForeignKey, String, Table, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

HERE = os.path.dirname(os.path.abspath(__file__))


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)

user_roles = Table(
    "user_roles",
    Base.metadata,
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("role_id", ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True),
)


class Role(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "roles"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)


class User(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(255), unique=True)
    active: Mapped[bool] = mapped_column(default=True)
    roles: Mapped[list[Role]] = relationship(secondary=user_roles, order_by=Role.name)

    # Flask-Login's user protocol, written out so the demo needs no mixin.
    @property
    def is_active(self) -> bool:
        return self.active

    is_authenticated = True
    is_anonymous = False

    def get_id(self) -> str:
        return str(self.id)


admin_permission = Permission(RoleNeed("admin"))

PAGE = """<!doctype html>
<html><head><title>identity_middleware example</title>
<link rel="icon" href="/favicon.ico">
<link rel="stylesheet" href="{{ url_for('static', filename='app.css') }}">
<link rel="stylesheet" href="{{ url_for('widgets.static', filename='widget.css') }}">
<script src="{{ url_for('static', filename='app.js') }}" defer></script></head>
<body>
{% if current_user.is_authenticated %}
<p>Signed in as <b id="email">{{ current_user.email }}</b>.
Roles: <span id="roles">{{ current_user.roles | map(attribute='name') | join(', ') }}</span></p>
<p><a href="/admin">Admin</a> · <a href="/logout">Log out</a></p>
{% else %}
<form method="post" action="/login"><input name="email" placeholder="alice@example.com">
<button>Log in</button></form>
{% endif %}
</body></html>
"""

SEED = {
    "alice@example.com": (True, ["admin", "editor"]),
    "bob@example.com": (True, ["editor"]),
    "carol@example.com": (False, ["editor"]),
}


def seed(database: SQLAlchemy = db) -> None:
    """Create the tables and the three demo users, once."""
    database.create_all()
    if database.session.scalar(select(User).limit(1)) is not None:
        return
    roles = {name: Role(name=name) for name in ("admin", "editor", "viewer")}
    database.session.add_all(roles.values())
    for email, (active, names) in SEED.items():
        database.session.add(User(email=email, active=active, roles=[roles[n] for n in names]))
    database.session.commit()


def create_app(
    database_url: str | None = None,
    *,
    middleware: bool = True,
    cache: bool = True,
    skip_static: bool = False,
    config: dict[str, Any] | None = None,
) -> Flask:
    """Build the example app.

    ``middleware`` wraps ``app.wsgi_app`` in IdentityMiddleware, ``cache`` puts the
    user loader behind a UserCache bound to SQLAlchemy, and ``skip_static`` turns on
    Flask-Principal's own prefix check (one of the alternatives we measure against).
    """
    app = Flask(__name__, static_folder=os.path.join(HERE, "static"), instance_path=os.path.join(HERE, "instance"))
    app.config.update(
        SECRET_KEY=os.environ.get("SECRET_KEY", "example-only-secret"),
        SQLALCHEMY_DATABASE_URI=database_url
        or os.environ.get("DATABASE_URL")
        or "sqlite:///" + os.path.join(app.instance_path, "example.db"),
    )
    app.config.update(config or {})
    os.makedirs(app.instance_path, exist_ok=True)
    db.init_app(app)

    stats = SimpleNamespace(db=db, loader_calls=0, identity_loaded_calls=0, user_cache=None, engine=None)
    app.extensions["example"] = stats

    login_manager = LoginManager(app)
    Principal(app, skip_static=skip_static)

    def load_user(user_id: str) -> User | None:
        stats.loader_calls += 1
        user = db.session.get(User, int(user_id))
        return user if user is not None and user.active else None

    if cache:
        from identity_middleware import UserCache
        from identity_middleware.sqlalchemy import bind_sqlalchemy

        user_cache = UserCache(app)
        bind_sqlalchemy(user_cache, db.session, User, relationships=("roles",), related=(Role,))
        stats.user_cache = user_cache
        login_manager.user_loader(user_cache.cached(load_user))
    else:
        login_manager.user_loader(load_user)

    @identity_loaded.connect_via(app)
    def on_identity_loaded(sender: Flask, identity: Identity) -> None:
        # The handler from Flask-Principal's documentation, as apps copy it.
        stats.identity_loaded_calls += 1
        identity.user = current_user
        if current_user.is_authenticated:
            identity.provides.add(UserNeed(current_user.id))
            for role in current_user.roles:
                identity.provides.add(RoleNeed(role.name))

    widgets = Blueprint(
        "widgets", __name__, static_folder=os.path.join(HERE, "widgets", "static"), url_prefix="/widgets"
    )
    app.register_blueprint(widgets)

    _add_routes(app)

    with app.app_context():
        seed()
        stats.engine = db.engine
        # Leave no pooled connection behind: a server that forks workers after
        # importing the app (gunicorn --preload) must not share one between them.
        db.engine.dispose()

    if middleware:
        from identity_middleware import IdentityMiddleware

        app.wsgi_app = IdentityMiddleware(app.wsgi_app, static_paths=["/favicon.ico"])  # type: ignore[method-assign]
    return app


def _add_routes(app: Flask) -> None:
    @app.get("/")
    def index() -> str:
        return render_template_string(PAGE)

    @app.post("/login")
    def login() -> Any:
        user = db.session.scalar(select(User).where(User.email == request.form.get("email", "")))
        if user is None or not login_user(user):
            abort(401)
        identity_changed.send(current_app._get_current_object(), identity=Identity(user.id))
        return redirect("/")

    @app.get("/logout")
    def logout() -> Any:
        logout_user()
        for key in ("identity.id", "identity.auth_type"):
            session.pop(key, None)
        identity_changed.send(current_app._get_current_object(), identity=AnonymousIdentity())
        return redirect("/")

    @app.get("/me")
    def me() -> Any:
        user = current_user
        return jsonify(
            anonymous=user.is_anonymous,
            email=None if user.is_anonymous else user.email,
            roles=[] if user.is_anonymous else [role.name for role in user.roles],
            identity_id=getattr(g.identity, "id", None),
            pid=os.getpid(),
        )

    @app.get("/admin")
    @admin_permission.require(http_exception=403)
    def admin() -> str:
        # Renders only from the (cached) user, so the page costs no SQL once warm.
        return render_template_string("<h1>Admin</h1><p>{{ current_user.email }} may manage users.</p>")

    @app.post("/admin/users/<int:user_id>/roles")
    @admin_permission.require(http_exception=403)
    def change_role(user_id: int) -> Any:
        user = db.get_or_404(User, user_id)
        role = db.one_or_404(select(Role).where(Role.name == request.form.get("role", "")))
        if request.form.get("action") == "revoke":
            if role in user.roles:
                user.roles.remove(role)
        elif role not in user.roles:
            user.roles.append(role)
        db.session.commit()  # bind_sqlalchemy invalidates the user after this commit
        return jsonify(email=user.email, roles=[r.name for r in user.roles])

    @app.post("/admin/roles/<name>/rename")
    @admin_permission.require(http_exception=403)
    def rename_role(name: str) -> Any:
        role = db.one_or_404(select(Role).where(Role.name == name))
        role.name = request.form["name"]
        db.session.commit()
        return jsonify(name=role.name)

    @app.post("/admin/users/<int:user_id>/deactivate")
    @admin_permission.require(http_exception=403)
    def deactivate(user_id: int) -> Any:
        user = db.get_or_404(User, user_id)
        user.active = False
        db.session.commit()
        return jsonify(email=user.email, active=user.active)

    @app.get("/favicon.ico")
    def favicon() -> Any:
        # A dynamic view: only the owner's static_paths make it skip identity.
        return send_from_directory(app.static_folder or "", "favicon.ico")

    @app.get("/static/config.js")
    def config_js() -> Any:
        # Shadows the static mount and reads the user: must never be treated as static.
        name = "null" if current_user.is_anonymous else f'"{current_user.email}"'
        return app.response_class(f"window.APP_USER = {name};\n", mimetype="text/javascript")

    @app.get("/files/<name>")
    def files(name: str) -> Any:
        # Looks like an asset, is a view: the middleware must leave it alone.
        who = "anonymous" if current_user.is_anonymous else current_user.email
        return app.response_class(f"/* {name} for {who} */\n", mimetype="text/css")


def main() -> None:  # pragma: no cover - convenience for `python -m examples.app`
    create_app().run(debug=True)


if __name__ == "__main__":  # pragma: no cover
    main()
