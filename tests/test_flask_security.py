"""A real Flask-Security-Too app: its static folder and ours skip identity.

Flask-Security-Too initialises Flask-Login (user loader and request loader),
Flask-Principal (``use_sessions=False``, its own identity loader) and an
``identity_loaded`` handler that reads ``current_user.roles``; its blueprint
serves ``/fs-static`` (``SECURITY_STATIC_FOLDER_URL``). None of it is written
for us, and wrapping ``app.wsgi_app`` must be all it takes.
"""

from __future__ import annotations

import functools

import pytest
from conftest import count_sql

pytest.importorskip("flask_security")

from flask import Flask  # noqa: E402
from flask_security import Security, SQLAlchemyUserDatastore, auth_required, current_user, login_user  # noqa: E402
from flask_security.models import fsqla_v3 as fsqla  # noqa: E402
from flask_sqlalchemy import SQLAlchemy  # noqa: E402

from identity_middleware import IdentityMiddleware  # noqa: E402

ASSETS = ["/static/app.css", "/fs-static/js/webauthn.js"]


@functools.cache
def _models():
    """Flask-Security's models, defined once per process (they register global tables)."""
    db = SQLAlchemy()
    fsqla.FsModels.set_db_info(db)

    class Role(db.Model, fsqla.FsRoleMixin):
        pass

    class User(db.Model, fsqla.FsUserMixin):
        pass

    class WebAuthn(db.Model, fsqla.FsWebAuthnMixin):  # FsUserMixin links to it when webauthn is installed
        pass

    User.webauthn_model = WebAuthn  # held: SQLAlchemy's class registry keeps only weak references
    return db, User, Role


def make_app(tmp_path, *, middleware: bool):
    db, User, Role = _models()
    (tmp_path / "static").mkdir(parents=True)
    (tmp_path / "static" / "app.css").write_text("body {}")
    app = Flask("fst", root_path=str(tmp_path))
    app.config.update(
        SECRET_KEY="test",
        SECURITY_PASSWORD_SALT="test",
        SECURITY_PASSWORD_HASH="pbkdf2_sha512",
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'fst.db'}",
        WTF_CSRF_ENABLED=False,
    )
    if middleware:  # wrapped before any extension exists, as the README suggests
        app.wsgi_app = IdentityMiddleware(app.wsgi_app)
    db.init_app(app)
    datastore = SQLAlchemyUserDatastore(db, User, Role)
    Security(app, datastore)

    @app.get("/test-login")
    def test_login():
        login_user(datastore.find_user(email="alice@example.com"))
        datastore.commit()
        return "ok"

    @app.get("/private")
    @auth_required()
    def private():
        return f"{current_user.email}: " + ", ".join(role.name for role in current_user.roles)

    with app.app_context():
        db.create_all()
        datastore.create_role(name="admin")
        datastore.create_user(email="alice@example.com", password=None, roles=["admin"])
        datastore.commit()
        engine = db.engine
    return app, engine


@pytest.mark.parametrize("path", ASSETS)
def test_static_and_fs_static_run_no_sql_when_logged_in(tmp_path, path):
    app, engine = make_app(tmp_path, middleware=True)
    client = app.test_client()
    assert client.get("/test-login").status_code == 200
    with count_sql(engine) as statements:
        response = client.get(path)
    assert response.status_code == 200
    assert statements == []
    assert "Set-Cookie" not in response.headers
    assert "Cookie" not in response.vary


def test_fs_static_is_a_mount_found_in_the_url_map(tmp_path):
    app, _ = make_app(tmp_path, middleware=True)
    decision = app.wsgi_app.explain("/fs-static/js/webauthn.js")
    assert decision.marked and decision.endpoint == "security.static" and decision.mount == "/fs-static/"


def test_protected_page_still_loads_the_user_and_roles(tmp_path):
    app, engine = make_app(tmp_path, middleware=True)
    client = app.test_client()
    client.get("/test-login")
    with count_sql(engine) as statements:
        response = client.get("/private")
    assert response.status_code == 200 and response.data == b"alice@example.com: admin"
    assert statements  # the user was loaded
    assert app.test_client().get("/private").status_code in (302, 401)


def test_without_the_middleware_the_same_assets_run_sql(tmp_path):
    app, engine = make_app(tmp_path, middleware=False)
    client = app.test_client()
    client.get("/test-login")
    for path in ASSETS:
        with count_sql(engine) as statements:
            assert client.get(path).status_code == 200
        assert statements, path
