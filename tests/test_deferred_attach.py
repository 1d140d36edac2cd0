"""A hit's rows wait for Flask-SQLAlchemy's session (deferred_attach), and the app cannot tell.

Each observation runs in a view of the same app built twice, bare (the loader
queries every request) and wrapped (``UserCache`` + ``bind_sqlalchemy`` +
``IdentityMiddleware``), after the same login and a warm-up request, so the
wrapped one answers from a hit whose rows wait. Both must return the same.
"""

from __future__ import annotations

import pickle
import sys
import threading
from typing import Any

import pytest
from flask import Flask, g, request
from flask_login import LoginManager, current_user, login_user
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Column, ForeignKey, String, Table, event, inspect
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, object_session, relationship, selectinload
from sqlalchemy.orm.events import SessionEvents
from sqlalchemy.orm.state import InstanceState

from identity_middleware import IdentityMiddleware, UserCache
from identity_middleware.deferred_attach import EVENTS, DeferringRegistry, seam_problem
from identity_middleware.sqlalchemy import bind_sqlalchemy


def _models(prefix: str) -> tuple[SQLAlchemy, Any, Any, Any]:
    """A Flask-SQLAlchemy extension with its own models, importable (so users pickle)."""

    class Base(DeclarativeBase):
        pass

    db = SQLAlchemy(model_class=Base)
    user_roles = Table(
        "user_roles",
        Base.metadata,
        Column("user_id", ForeignKey("users.id"), primary_key=True),
        Column("role_id", ForeignKey("roles.id"), primary_key=True),
    )

    class Role(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "roles"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(20))

    class Post(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))

    class User(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(20))
        roles: Mapped[list[Role]] = relationship(secondary=user_roles, order_by=Role.id)
        posts: Mapped[list[Post]] = relationship()  # not snapshotted: loads lazily

        is_authenticated, is_active, is_anonymous = True, True, False

        def get_id(self) -> str:
            return str(self.id)

    module = sys.modules[__name__]
    for cls in (Role, Post, User):
        cls.__qualname__ = cls.__name__ = prefix + cls.__name__
        setattr(module, cls.__name__, cls)
    return db, User, Role, Post


MODELS = {"bare": _models("Bare"), "ours": _models("Ours")}

#: Bindings and listeners made on the shared models' db.session, undone after each test.
_undo: list[Any] = []


@pytest.fixture(autouse=True)
def _undo_bindings_and_listeners():
    yield
    while _undo:
        _undo.pop()()


def build(tmp_path: Any, variant: str, observe: Any, **bind: Any) -> tuple[Flask, dict[str, Any]]:
    db, User, Role, Post = MODELS[variant]
    app = Flask(f"deferred_{variant}")
    app.config.update(SECRET_KEY="s", SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / variant}.db")
    context: dict[str, Any] = {"db": db, "User": User, "app": app, "kept": [], "sql": [], "teardown": []}

    def session_state(when: str) -> Any:
        def teardown(exc: BaseException | None) -> None:
            if g.get("_login_user") is not None and g._login_user.is_authenticated:
                state = inspect(g._login_user)
                context["teardown"].append((when, state.persistent, state.detached, state.session is not None))

        return teardown

    app.teardown_appcontext(session_state("after Flask-SQLAlchemy closed its session"))
    db.init_app(app)
    app.teardown_appcontext(session_state("before Flask-SQLAlchemy closed its session"))
    manager = LoginManager(app)

    def load(user_id: str) -> Any:  # the roles with the user, so the views' SQL is theirs alone
        return db.session.get(User, int(user_id), options=[selectinload(User.roles)])

    if variant == "ours":
        cache = UserCache(app, ttl=3600)
        binding = bind_sqlalchemy(cache, db.session, User, relationships=("roles",), related=(Role,), **bind)
        _undo.append(binding.remove)
        manager.user_loader(cache.cached(load))
        app.wsgi_app = IdentityMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    else:
        manager.user_loader(load)
    context["load"] = manager._user_callback

    @app.post("/login/<int:user_id>")
    def login(user_id: int) -> str:
        login_user(db.session.get(User, user_id))
        return ""

    @app.get("/observe")
    def view() -> Any:
        user = current_user._get_current_object()
        if request.args.get("warm"):
            return user.name
        context["kept"].append(user)
        del context["sql"][:]
        return repr(observe(context, user))

    with app.app_context():
        db.create_all()
        admin, editor = Role(id=1, name="admin"), Role(id=2, name="editor")
        db.session.add_all([User(id=1, name="alice", roles=[admin, editor]), User(id=2, name="bob", roles=[editor])])
        db.session.add(Post(id=1, user_id=1))
        db.session.commit()
        event.listen(db.engine, "before_cursor_execute", lambda *args: context["sql"].append(args[2]))
    return app, context


def differential(tmp_path: Any, observe: Any, *, requests: int = 2) -> dict[str, list[str]]:
    """What ``observe(context, user)`` returned in each app, per request after a warm-up.

    The wrapped app must actually defer: its warm-up fills the cache, so every
    observed request starts from a hit whose rows wait.
    """
    seen = {}
    for variant in ("bare", "ours"):
        app, context = build(tmp_path, variant, observe)
        client = app.test_client()
        assert client.post("/login/1").status_code == 200
        assert client.get("/observe?warm=1").status_code == 200
        answers = []
        for _ in range(requests):
            response = client.get("/observe")
            answers.append(f"{response.status_code} {response.get_data(as_text=True)}")
        seen[variant] = answers
    assert seen["bare"] == seen["ours"]
    return seen


def _loaded(context: dict[str, Any], user: Any) -> Any:
    return user.name, [role.name for role in user.roles], user.is_active, len(context["sql"])


def _object_session(context: dict[str, Any], user: Any) -> Any:
    return object_session(user) is context["db"].session(), len(context["sql"])


def _inspect(context: dict[str, Any], user: Any) -> Any:
    state = inspect(user)
    return state.persistent, state.detached, state.pending, state.was_deleted, state.key[1], state.session is not None


def _membership(context: dict[str, Any], user: Any) -> Any:
    db = context["db"]
    return user in db.session, sorted(key[1] for key in db.session.identity_map), db.session.is_modified(user)


def _get_returns_it(context: dict[str, Any], user: Any) -> Any:
    db = context["db"]
    return db.session.get(context["User"], 1) is user, len(context["sql"])


def _lazy_load(context: dict[str, Any], user: Any) -> Any:
    return [post.id for post in user.posts], len(context["sql"])


def _in_transaction(context: dict[str, Any], user: Any) -> Any:
    return context["db"].session().in_transaction()


def _rename_and_commit(context: dict[str, Any], user: Any) -> Any:
    before = user.name
    user.name = before + "!"
    context["db"].session.commit()
    return before, user.name


def _role_dropped(context: dict[str, Any], user: Any) -> Any:
    roles = [role.name for role in user.roles]
    if len(user.roles) > 1:
        user.roles.pop()
        context["db"].session.commit()
    return roles


def _change_without_commit(context: dict[str, Any], user: Any) -> Any:
    user.name = "not saved"
    return context["db"].session.is_modified(user), user in context["db"].session.dirty


def _session_with_arguments(context: dict[str, Any], user: Any) -> Any:
    try:
        context["db"].session(autoflush=False)
    except InvalidRequestError as exc:
        return str(exc)
    return "no error"


def _another_thread(context: dict[str, Any], user: Any) -> Any:
    seen = []
    thread = threading.Thread(target=lambda: seen.append(object_session(user)))
    thread.start()
    thread.join()
    return seen[0] is context["db"].session()


def _nested_app_context(context: dict[str, Any], user: Any) -> Any:
    db = context["db"]
    with context["app"].app_context():
        inner, from_inside = db.session(), object_session(user)
    return from_inside is db.session(), inner is db.session()


def _pickled(context: dict[str, Any], user: Any) -> Any:
    copy = pickle.loads(pickle.dumps(user))
    state = inspect(copy)
    return type(state).__name__, state.detached, copy.name, [role.name for role in copy.roles]


def _kept_from_last_request(context: dict[str, Any], user: Any) -> Any:
    kept = context["kept"]
    if len(kept) < 2:
        return None
    state = inspect(kept[-2])
    return type(state).__name__, state.detached, state.session, kept[-2].name, kept[-2] is user


def _teardowns(context: dict[str, Any], user: Any) -> Any:
    return context["teardown"][-2:]


def _removed_mid_request(context: dict[str, Any], user: Any) -> Any:
    context["db"].session.remove()
    state = inspect(user)
    return state.detached, object_session(user), user.name, context["db"].session.get(context["User"], 1) is user


def _second_user_shares_a_role(context: dict[str, Any], user: Any) -> Any:
    other = context["load"]("2")
    return other.roles[0] is user.roles[1], inspect(other).session is inspect(user).session, len(context["sql"])


def _expire_and_reload(context: dict[str, Any], user: Any) -> Any:
    # (How many statements the refresh takes differs, waiting or not: a loaded user
    # keeps the loader's selectinload option for its refresh, a built one has none.)
    context["db"].session.expire(user)
    return user.name, [role.name for role in user.roles]


def _expunged(context: dict[str, Any], user: Any) -> Any:
    context["db"].session.expunge(user)
    return inspect(user).detached, user in context["db"].session


OBSERVATIONS = [
    _loaded,
    _object_session,
    _inspect,
    _membership,
    _get_returns_it,
    _lazy_load,
    _in_transaction,
    _rename_and_commit,
    _role_dropped,
    _change_without_commit,
    _session_with_arguments,
    _another_thread,
    _nested_app_context,
    _pickled,
    _kept_from_last_request,
    _teardowns,
    _removed_mid_request,
    _second_user_shares_a_role,
    _expire_and_reload,
    _expunged,
]


@pytest.mark.parametrize("observe", OBSERVATIONS, ids=lambda f: f.__name__.strip("_"))
def test_the_app_sees_the_same_as_in_the_bare_app(tmp_path, observe):
    differential(tmp_path, observe)


def _has_session(context: dict[str, Any], user: Any) -> Any:
    return user.name, context["db"].session.registry.has()


def listen(context: dict[str, Any], name: str, fn: Any) -> None:
    event.listen(context["db"].session, name, fn)
    _undo.append(lambda: event.remove(context["db"].session, name, fn))


def logged_in(app: Flask) -> Any:
    """A client logged in as alice, whose first request filled the cache."""
    client = app.test_client()
    assert client.post("/login/1").status_code == 200
    assert client.get("/observe?warm=1").status_code == 200
    return client


def test_a_request_that_reads_only_loaded_attributes_creates_no_session(tmp_path):
    app, context = build(tmp_path, "ours", _has_session)
    client = logged_in(app)
    assert [client.get("/observe").get_data(as_text=True) for _ in range(3)] == ["('alice', False)"] * 3
    assert isinstance(context["db"].session.registry, DeferringRegistry)
    assert not context["db"].session.registry.pending  # every scope ended: nothing waits
    assert context["teardown"][-1] == ("after Flask-SQLAlchemy closed its session", False, True, False)


@pytest.mark.parametrize("name", EVENTS)
def test_a_listener_on_an_event_the_attach_fires_makes_hits_attach_at_once(tmp_path, name):
    """With a listener that would see the attach happen later, there is no waiting."""
    app, context = build(tmp_path, "ours", _has_session)
    client = logged_in(app)
    heard: list[str] = []
    listen(context, name, lambda *args: heard.append(name))
    assert client.get("/observe").get_data(as_text=True) == "('alice', True)"
    assert heard  # the attach, or the close, fired it


def test_events_lists_every_session_event_an_attach_and_its_close_fire(tmp_path):
    """A listener on any other event could not see when a hit's rows were attached."""
    app, context = build(tmp_path, "ours", _has_session)
    client = logged_in(app)
    fired: list[str] = []
    names = [name for name, value in vars(SessionEvents).items() if callable(value) and not name.startswith("_")]
    assert len(names) > 20  # every event SQLAlchemy has for sessions
    for name in names:
        listen(context, name, lambda *args, name=name: fired.append(name))
    assert client.get("/observe").get_data(as_text=True) == "('alice', True)"
    assert fired and set(fired) <= set(EVENTS), sorted(set(fired) - set(EVENTS))


def test_the_seams_pass_their_check_on_the_installed_sqlalchemy():
    assert seam_problem() is None


def test_rows_of_a_custom_state_class_attach_at_once(tmp_path):
    """Waiting swaps a row's state class; a state class of the app's own stays, attached at once."""
    app, context = build(tmp_path, "ours", lambda context, user: (type(inspect(user)).__name__, _has_session(context, user)))
    client = logged_in(app)
    manager = context["User"]._sa_class_manager

    class AppState(InstanceState):  # type: ignore[type-arg]
        __slots__ = ()

    manager._state_constructor = AppState
    _undo.append(lambda: vars(manager).pop("_state_constructor", None))
    assert client.get("/observe").get_data(as_text=True) == "('AppState', ('alice', True))"


def test_wait_for_session_false_attaches_every_hit_at_once(tmp_path):
    app, context = build(tmp_path, "ours", _has_session, wait_for_session=False)
    client = logged_in(app)
    assert [client.get("/observe").get_data(as_text=True) for _ in range(2)] == ["('alice', True)"] * 2


def test_wait_for_session_must_be_a_bool():
    db, User, Role, _ = MODELS["ours"]
    with pytest.raises(ValueError, match=r"wait_for_session.*'no'"):
        bind_sqlalchemy(UserCache(), db.session, User, wait_for_session="no")  # type: ignore[arg-type]
