"""UserCache behind real Flask apps: Flask-Login + Flask-Principal + SQLAlchemy,
Flask-Security-Too, and the example app.

What counts is what a user of the app sees: the loader runs once for many page
loads (SQL counted with ``before_cursor_execute``), a role change or a
deactivation shows on the very next request after ``invalidate``.
"""

from __future__ import annotations

import threading

import pytest
from flask import Flask, g, jsonify
from flask_login import LoginManager, UserMixin, current_user, login_user
from flask_principal import Identity, Permission, Principal, RoleNeed, identity_changed, identity_loaded
from sqlalchemy import Boolean, Column, ForeignKey, Integer, MetaData, String, Table, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from identity_middleware import UserCache
from identity_middleware.sqlalchemy import bind_sqlalchemy

from conftest import count_sql, log_in


@pytest.fixture(autouse=True)
def _no_settings_in_environment(monkeypatch):
    for name in ("IDENTITY_CACHE_TTL", "IDENTITY_CACHE_MAXSIZE", "IDENTITY_CACHE_NEGATIVE_TTL", "IDENTITY_VERSION_STORE"):
        monkeypatch.delenv(name, raising=False)


# -- an app built here: Login + Principal + SQLAlchemy Core, the loader returns a snapshot --

metadata = MetaData()
users_table = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("email", String(255)),
    Column("active", Boolean, default=True),
)
roles_table = Table(
    "user_roles",
    metadata,
    Column("user_id", ForeignKey("users.id"), primary_key=True),
    Column("role", String(80), primary_key=True),
)


class SnapshotUser(UserMixin):
    """Plain data: safe to share between requests without an adapter."""

    def __init__(self, id: int, email: str, roles: tuple[str, ...]) -> None:
        self.id, self.email, self.roles = id, email, roles


def build_app(tmp_path, *, wiring: str):
    """``wiring`` is ``"decorator"`` (``@user_cache.cached``) or ``"install"``."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(users_table.insert(), [{"id": 1, "email": "alice@example.com"}, {"id": 2, "email": "bob@example.com"}])
        conn.execute(roles_table.insert(), [{"user_id": 1, "role": "admin"}, {"user_id": 1, "role": "editor"}, {"user_id": 2, "role": "editor"}])

    app = Flask(__name__)
    app.config["SECRET_KEY"] = "test"
    login_manager = LoginManager(app)
    Principal(app)
    user_cache = UserCache(app)
    loads = []

    def load_user(user_id: str):
        loads.append(user_id)
        with engine.connect() as conn:
            row = conn.execute(select(users_table).where(users_table.c.id == int(user_id))).first()
            if row is None or not row.active:
                return None
            roles = conn.scalars(select(roles_table.c.role).where(roles_table.c.user_id == row.id).order_by("role"))
            return SnapshotUser(row.id, row.email, tuple(roles))

    if wiring == "decorator":
        login_manager.user_loader(user_cache.cached(load_user))
    else:
        login_manager.user_loader(load_user)
        user_cache.install(login_manager)

    @identity_loaded.connect_via(app)
    def on_identity_loaded(sender, identity):
        identity.user = current_user
        if current_user.is_authenticated:
            for role in current_user.roles:
                identity.provides.add(RoleNeed(role))

    @app.post("/login/<int:user_id>")
    def login(user_id):
        user = load_user(str(user_id))
        login_user(user)
        identity_changed.send(app, identity=Identity(user.id))
        return "ok"

    @app.get("/me")
    def me():
        return jsonify(
            anonymous=current_user.is_anonymous,
            roles=[] if current_user.is_anonymous else list(current_user.roles),
            cache=g.get("_identity_cache_outcome"),
        )

    @app.get("/admin")
    @Permission(RoleNeed("admin")).require(http_exception=403)
    def admin():
        return "admin"

    return app, engine, user_cache, loads


@pytest.fixture(params=["decorator", "install"])
def own_app(request, tmp_path):
    app, engine, user_cache, loads = build_app(tmp_path, wiring=request.param)
    client = app.test_client()
    assert client.post("/login/1").status_code == 200
    loads.clear()
    return app, engine, user_cache, loads, client


def test_twenty_page_loads_run_the_loader_once(own_app):
    app, engine, user_cache, loads, client = own_app
    with count_sql(engine) as statements:
        first = client.get("/me").get_json()
        assert first == {"anonymous": False, "roles": ["admin", "editor"], "cache": "miss"}
        after_first = len(statements)
        for _ in range(19):
            assert client.get("/me").get_json() == {"anonymous": False, "roles": ["admin", "editor"], "cache": "hit"}
    assert loads == ["1"]
    assert after_first == 2  # the user query and the roles query, once
    assert len(statements) == after_first
    assert user_cache.stats().hits == 19


def test_after_invalidate_the_next_request_shows_the_changed_roles(own_app):
    app, engine, user_cache, loads, client = own_app
    assert client.get("/admin").status_code == 200
    with engine.begin() as conn:
        conn.execute(roles_table.delete().where(roles_table.c.user_id == 1, roles_table.c.role == "admin"))
    # Without invalidation the cache still vouches for the old roles (until the TTL)...
    assert client.get("/me").get_json()["roles"] == ["admin", "editor"]
    user_cache.invalidate(1)
    # ...and right after it the revoked role is gone.
    assert client.get("/me").get_json()["roles"] == ["editor"]
    assert client.get("/admin").status_code == 403
    assert loads == ["1", "1"]


def test_a_deactivated_and_invalidated_user_is_anonymous_on_the_next_request(own_app):
    app, engine, user_cache, loads, client = own_app
    assert client.get("/me").get_json()["anonymous"] is False
    with engine.begin() as conn:
        conn.execute(users_table.update().where(users_table.c.id == 1).values(active=False))
    user_cache.invalidate("1")
    assert client.get("/me").get_json() == {"anonymous": True, "roles": [], "cache": "miss"}
    assert client.get("/admin").status_code == 403
    # The "no such user" answer is itself cached (negative TTL): no query per request.
    assert client.get("/me").get_json()["cache"] == "negative"
    assert loads == ["1", "1"]


def test_concurrent_requests_of_a_cold_user_run_one_load(tmp_path):
    app, engine, user_cache, loads = build_app(tmp_path, wiring="decorator")
    clients = [app.test_client() for _ in range(8)]
    for client in clients:
        assert client.post("/login/1").status_code == 200
    user_cache.clear()
    loads.clear()
    barrier = threading.Barrier(len(clients))
    answers = []

    def browse(client):
        barrier.wait(10)
        for _ in range(10):
            answers.append(client.get("/me").get_json()["roles"])

    threads = [threading.Thread(target=browse, args=(c,), daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    assert answers == [["admin", "editor"]] * 80
    assert loads == ["1"]


# -- Flask-Security-Too: the loader belongs to the extension; install() caches it --------


@pytest.fixture(scope="module")
def security_app(tmp_path_factory):
    from flask_security import Security, SQLAlchemyUserDatastore, auth_required, hash_password
    from flask_security import login_user as security_login_user
    from flask_security.models import fsqla_v3 as fsqla
    from flask_sqlalchemy import SQLAlchemy

    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="test",
        SECURITY_PASSWORD_SALT="salt",
        SECURITY_PASSWORD_HASH="plaintext",
        WTF_CSRF_ENABLED=False,
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path_factory.mktemp('fs') / 'fs.db'}",
    )
    db = SQLAlchemy(app)
    fsqla.FsModels.set_db_info(db)

    class Role(db.Model, fsqla.FsRoleMixin):
        pass

    class User(db.Model, fsqla.FsUserMixin):
        pass

    class WebAuthn(db.Model, fsqla.FsWebAuthnMixin):  # FsUserMixin links to it when webauthn is installed
        pass

    User.webauthn_model = WebAuthn  # held: SQLAlchemy's class registry keeps only weak references
    datastore = SQLAlchemyUserDatastore(db, User, Role)
    Security(app, datastore)

    @app.get("/page")
    @auth_required()
    def page():
        from flask_security import current_user as security_user

        return jsonify(email=security_user.email, roles=sorted(r.name for r in security_user.roles))

    @app.get("/session-only")
    @auth_required("session")
    def session_only():
        return "ok"

    @app.post("/test-login/<int:user_id>")
    def test_login(user_id):
        security_login_user(datastore.find_user(id=user_id))
        db.session.commit()
        return "ok"

    with app.app_context():
        db.create_all()
        admin = datastore.create_role(name="admin")
        datastore.create_role(name="editor")
        datastore.create_user(email="alice@example.com", password=hash_password("pw"), roles=[admin])
        db.session.commit()
        engine = db.engine
    return app, engine, db, datastore


def test_install_caches_flask_security_s_own_loader(security_app):
    app, engine, db, datastore = security_app
    original = app.login_manager._user_callback
    assert original.__module__ == "flask_security.core"  # registered by Flask-Security, not us
    user_cache = UserCache(app)
    user_cache.install(app.login_manager)
    User = datastore.user_model
    binding = bind_sqlalchemy(user_cache, db.session, User, relationships=("roles",), user_id="fs_uniquifier")
    try:
        client = app.test_client()
        assert client.post("/test-login/1").status_code == 200
        with count_sql(engine) as statements:
            for _ in range(20):
                response = client.get("/page")
                assert response.status_code == 200
                assert response.get_json() == {"email": "alice@example.com", "roles": ["admin"]}
            # A hit must also leave what Flask-Security's loader notes per request:
            # without it @auth_required("session") would refuse the user.
            assert client.get("/session-only").status_code == 200
        stats = user_cache.stats()
        assert (stats.loads, stats.hits) == (1, 20)
        assert len(statements) == 1  # the one find_user() of the one load (roles are joined eagerly)

        # A committed role change reaches the cache keyed by fs_uniquifier by itself...
        with app.app_context():
            user = datastore.find_user(id=1)
            uniquifier = user.fs_uniquifier
            datastore.add_role_to_user(user, "editor")
            db.session.commit()
        assert client.get("/page").get_json()["roles"] == ["admin", "editor"]
        # ...and a change behind the ORM's back needs invalidate() with that key.
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM roles_users WHERE role_id = (SELECT id FROM role WHERE name = 'editor')")
        assert client.get("/page").get_json()["roles"] == ["admin", "editor"]
        user_cache.invalidate(uniquifier)
        assert client.get("/page").get_json()["roles"] == ["admin"]
        assert user_cache.install(app.login_manager) is app.login_manager._user_callback  # never twice
        assert app.login_manager._user_callback.__wrapped__ is original
    finally:
        binding.remove()
        app.login_manager.user_loader(original)


def test_wrapping_flask_security_s_loader_without_install_breaks_its_session_check(security_app):
    # Why install() knows about Flask-Security: a plain wrapper skips what its loader
    # records per request, and the next request is sent to the login page.
    app, engine, db, datastore = security_app
    original = app.login_manager._user_callback
    user_cache = UserCache()
    binding = bind_sqlalchemy(user_cache, db.session, datastore.user_model, relationships=("roles",))
    app.login_manager.user_loader(user_cache.cached(original))
    try:
        client = app.test_client()
        assert client.post("/test-login/1").status_code == 200
        assert client.get("/page").status_code == 200  # a miss: the loader ran
        assert client.get("/page").status_code == 302  # a hit without the replay
    finally:
        binding.remove()
        app.login_manager.user_loader(original)


def test_install_without_bind_sqlalchemy_is_refused_naming_the_line_to_add(security_app):
    # Flask-Security's loader returns a mapped User: shared between requests it would go
    # detached after a commit. The first cached load refuses, with the fix in the message.
    app, engine, db, datastore = security_app
    original = app.login_manager._user_callback
    user_cache = UserCache()
    user_cache.install(app.login_manager)
    app.testing = True  # let the error reach the test instead of becoming a 500
    try:
        client = app.test_client()
        assert client.post("/test-login/1").status_code == 200
        with pytest.raises(TypeError, match=r"bind_sqlalchemy\(user_cache, db\.session, User, relationships=") as info:
            client.get("/page")
        assert "from identity_middleware.sqlalchemy import bind_sqlalchemy" in str(info.value)
        assert user_cache.stats().size == 0
    finally:
        app.testing = False
        app.login_manager.user_loader(original)


# -- the example app (examples/app.py), with its shared fixtures --------------------------


def test_example_app_twenty_page_loads_run_the_loader_once(logged_in, example_app, engine):
    stats = example_app.extensions["example"]
    with count_sql(engine) as statements:
        for _ in range(20):
            page = logged_in.get("/")
            assert page.status_code == 200
            assert b"admin, editor" in page.data
    assert stats.loader_calls == 1
    assert stats.user_cache.stats().hits == 19
    assert 0 < len(statements) <= 2  # the first page's user and roles queries only


def test_example_app_after_invalidate_the_next_request_shows_changed_roles(logged_in, example_app, engine):
    stats = example_app.extensions["example"]
    assert logged_in.get("/me").get_json()["roles"] == ["admin", "editor"]
    with engine.begin() as conn:  # behind the ORM's back: nothing invalidates automatically
        conn.exec_driver_sql(
            "DELETE FROM user_roles WHERE user_id = 1 AND role_id = (SELECT id FROM roles WHERE name = 'editor')"
        )
    assert logged_in.get("/me").get_json()["roles"] == ["admin", "editor"]  # still cached
    stats.user_cache.invalidate(1)
    assert logged_in.get("/me").get_json()["roles"] == ["admin"]


def test_example_app_deactivated_and_invalidated_user_is_anonymous(example_app, engine):
    stats = example_app.extensions["example"]
    client = log_in(example_app.test_client(), "bob@example.com")
    assert client.get("/me").get_json()["email"] == "bob@example.com"
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE users SET active = 0 WHERE id = 2")
    stats.user_cache.invalidate(2)
    me = client.get("/me").get_json()
    assert me["anonymous"] is True and me["email"] is None
    assert client.get("/admin").status_code == 403


# -- the README's quick start: Flask-SQLAlchemy, a loader returning the ORM user -------------


def quick_start_app(tmp_path, *, bind: bool):
    """The README's quick start, line for line, with ``bind`` choosing whether its
    ``bind_sqlalchemy`` line is there."""
    from flask import request
    from flask_sqlalchemy import SQLAlchemy

    from identity_middleware import IdentityMiddleware

    class Base(DeclarativeBase):
        pass

    db = SQLAlchemy(model_class=Base)
    links = Table(
        "qs_user_roles",
        Base.metadata,
        Column("user_id", ForeignKey("qs_users.id"), primary_key=True),
        Column("role_id", ForeignKey("qs_roles.id"), primary_key=True),
    )

    class Role(db.Model):
        __tablename__ = "qs_roles"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(50))

    class User(db.Model, UserMixin):
        __tablename__ = "qs_users"
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str] = mapped_column(String(100))
        roles: Mapped[list[Role]] = relationship(secondary=links, order_by=Role.id)

    app = Flask(__name__)
    app.config.update(SECRET_KEY="test", SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'qs.db'}")
    db.init_app(app)
    login_manager = LoginManager(app)

    app.wsgi_app = IdentityMiddleware(app.wsgi_app, static_paths=["/favicon.ico"])
    user_cache = UserCache(app)
    if bind:
        bind_sqlalchemy(user_cache, db.session, User, relationships=("roles",), related=(Role,))

    @login_manager.user_loader
    @user_cache.cached
    def load_user(user_id):
        return db.session.get(User, int(user_id))

    @app.post("/login")
    def login():
        login_user(db.session.get(User, 1))
        return "ok"

    @app.get("/me")
    def me():
        return jsonify(email=current_user.email, roles=[r.name for r in current_user.roles])

    @app.post("/me/email")
    def change_my_email():
        current_user.email = request.form["email"]
        db.session.commit()
        return "ok"

    @app.post("/admin/revoke/<name>")
    def revoke(name):
        user = db.session.get(User, 1)
        user.roles = [r for r in user.roles if r.name != name]
        db.session.commit()
        return "ok"

    with app.app_context():
        db.create_all()
        db.session.add(User(id=1, email="alice@example.com", roles=[Role(name="admin"), Role(name="editor")]))
        db.session.commit()
        engine = db.engine
    return app, engine, user_cache, db, User


def test_quick_start_without_bind_sqlalchemy_is_refused_at_the_first_cached_load(tmp_path):
    app, engine, user_cache, db, User = quick_start_app(tmp_path, bind=False)
    app.testing = True
    client = app.test_client()
    client.post("/login")
    with pytest.raises(TypeError, match=r"bind_sqlalchemy\(user_cache, db\.session, User, relationships=\(\"roles\",\)\)"):
        client.get("/me")
    assert user_cache.stats().size == 0  # nothing was cached


def test_quick_start_with_bind_survives_a_committing_view_and_saves_changes(tmp_path):
    app, engine, user_cache, db, User = quick_start_app(tmp_path, bind=True)
    client = app.test_client()
    client.post("/login")
    assert client.get("/me").get_json()["email"] == "alice@example.com"
    # Changed through current_user (a cache hit) and committed: saved, and seen next.
    assert client.post("/me/email", data={"email": "alice@new.example.com"}).status_code == 200
    for _ in range(3):  # no DetachedInstanceError in later requests, and hits again
        response = client.get("/me")
        assert response.status_code == 200
        assert response.get_json() == {"email": "alice@new.example.com", "roles": ["admin", "editor"]}
    with app.app_context():
        assert db.session.get(User, 1).email == "alice@new.example.com"
    assert client.post("/admin/revoke/admin").status_code == 200
    with count_sql(engine) as statements:
        assert client.get("/me").get_json()["roles"] == ["editor"]
        assert client.get("/me").get_json()["roles"] == ["editor"]
    assert len(statements) == 2  # one reload (user, roles); the second request is a hit
    assert user_cache.stats().hits >= 3
