"""@memoize_identity: an identity_loaded handler's effect, replayed on cache hits.

Each test builds the same app twice -- bare (Flask-Login, Flask-Principal, SQLAlchemy,
nothing of ours) and wrapped (the middleware, a UserCache bound to the session, the
handler under ``@memoize_identity``) -- sends both the same requests from the same
kind of client, and compares the identity the view sees. Counting handler runs shows
that replays happen; the comparisons show that they change nothing the app sees,
including after invalidations and changes made inside the request.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import pytest
from flask import Flask, g, jsonify, request
from flask_login import LoginManager, current_user, login_user
from flask_principal import Identity, Principal, RoleNeed, UserNeed, identity_changed, identity_loaded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, select
from sqlalchemy.orm import scoped_session, sessionmaker
from werkzeug.local import LocalProxy

from identity_middleware import IdentityMiddleware, UserCache, memoize_identity
from identity_middleware.identity_memo import MAX_RECORDS_PER_ENTRY
from identity_middleware.sqlalchemy import bind_sqlalchemy

from memo_models import Role, User, documented, seed, user_roles


Handler = Callable[[Any, Identity], Any]


class Stack:
    """One app: bare or wrapped, with ``handlers`` connected in order (the wrapped app
    memoizes those listed in ``memoized``), and a counter of every handler run."""

    def __init__(
        self,
        url: str,
        *,
        wrapped: bool,
        handlers: list[Handler],
        memoized: tuple[int, ...] = (0,),
        name: str = "app",
        share: Stack | None = None,
        versions: Any = None,
    ) -> None:
        """``share``: another wrapped stack whose database session, cache and binding this app uses."""
        self.owner = share is None
        self.engine = create_engine(url) if share is None else share.engine
        self.db = db = scoped_session(sessionmaker(self.engine)) if share is None else share.db
        self.runs = [0] * len(handlers)
        app = self.app = Flask(name)
        app.config.update(SECRET_KEY="memo-tests", TESTING=True)
        manager = LoginManager(app)
        Principal(app)

        def load(user_id: str) -> User | None:
            return db.get(User, int(user_id))

        self.cache: UserCache | None = None
        self.binding = None
        if wrapped:
            if share is None:
                self.cache = cache = UserCache(ttl=300, versions=versions)
                self.binding = bind_sqlalchemy(cache, db, User, relationships=("roles",))
            else:
                self.cache = cache = share.cache
            cache.init_app(app)
            manager.user_loader(cache.cached(load))
            app.wsgi_app = IdentityMiddleware(app.wsgi_app)  # type: ignore[method-assign]
        else:
            manager.user_loader(load)

        for index, handler in enumerate(handlers):

            def counted(sender: Any, identity: Identity, handler: Handler = handler, index: int = index) -> Any:
                self.runs[index] += 1
                return handler(sender, identity)

            receiver = memoize_identity(counted) if wrapped and index in memoized else counted
            identity_loaded.connect(receiver, sender=app, weak=False)

        @app.teardown_appcontext
        def remove(exc: BaseException | None) -> None:
            db.remove()

        @app.post("/login/<int:user_id>")
        def log_in(user_id: int) -> Any:
            user = db.get(User, user_id)
            login_user(user)
            identity_changed.send(app, identity=Identity(user.id))
            return "", 204

        @app.get("/me")
        def me() -> Any:
            return jsonify(describe(g.identity))

        @app.post("/grant/<int:user_id>/<role>")
        def grant(user_id: int, role: str) -> Any:
            user = db.get(User, user_id)
            found = db.scalar(select(Role).where(Role.name == role)) or Role(name=role)
            user.roles.append(found)
            db.commit()
            return "", 204

        @app.post("/delete/<int:user_id>")
        def delete(user_id: int) -> Any:
            db.delete(db.get(User, user_id))  # its user_roles rows go with it
            db.commit()
            return "", 204

        @app.post("/grant-myself/<role>")
        def grant_myself(role: str) -> Any:
            """A change to the current user and a new identity in the same request."""
            current_user.roles.append(db.scalar(select(Role).where(Role.name == role)) or Role(name=role))
            db.commit()
            identity_changed.send(app, identity=Identity(current_user.id))
            return jsonify(describe(g.identity))

    def close(self) -> None:
        for receiver in list(identity_loaded.receivers_for(self.app)):
            identity_loaded.disconnect(receiver, sender=self.app)
        if self.binding is not None:
            self.binding.remove()
        if self.owner:
            self.db.remove()
            self.engine.dispose()


def describe(identity: Identity) -> dict[str, Any]:
    """Everything about ``identity`` a view can tell apart, as JSON."""
    user = current_user._get_current_object()
    attributes = {}
    for name, value in sorted(vars(identity).items()):
        if name == "provides":
            continue
        if isinstance(value, LocalProxy):
            attributes[name] = "the current_user proxy" if value is current_user else "another proxy"
        elif value is user:
            attributes[name] = "this request's user"
        elif isinstance(value, User):
            attributes[name] = "another User object"
        else:
            attributes[name] = repr(value)
    return {
        "id": repr(identity.id),
        "auth_type": repr(identity.auth_type),
        "provides": sorted(map(repr, identity.provides)),
        "attributes": attributes,
    }


@pytest.fixture
def database(tmp_path) -> Callable[[str], str]:
    """A function making a SQLite database, seeded with two users, per name."""

    def make(name: str) -> str:
        url = f"sqlite:///{tmp_path / name}.sqlite"
        seed(url)
        return url

    return make


@pytest.fixture
def pair(database):
    """Build a bare and a wrapped stack with the same handlers; closed after the test."""
    built: list[Stack] = []

    def make(handlers: list[Handler], **options: Any) -> tuple[Stack, Stack]:
        n = len(built)
        bare = Stack(database(f"bare{n}"), wrapped=False, handlers=handlers, **options)
        wrapped = Stack(database(f"wrapped{n}"), wrapped=True, handlers=handlers, **options)
        built.extend([bare, wrapped])
        return bare, wrapped

    yield make
    for stack in built:
        stack.close()


def same(bare: Stack, wrapped: Stack, clients: tuple[Any, Any], method: str, path: str) -> Any:
    answers = [getattr(client, method)(path) for client in clients]
    assert [a.status_code for a in answers] == [answers[0].status_code] * 2, path
    assert answers[0].get_json() == answers[1].get_json(), path
    return answers[1]


def logged_in(bare: Stack, wrapped: Stack, user_id: int = 1) -> tuple[Any, Any]:
    clients = (bare.app.test_client(), wrapped.app.test_client())
    for client in clients:
        assert client.post(f"/login/{user_id}").status_code == 204
    return clients


def test_the_documented_handler_is_replayed_and_the_identity_is_the_same(pair):
    bare, wrapped = pair([documented])
    clients = logged_in(bare, wrapped)
    for _ in range(6):
        me = same(bare, wrapped, clients, "get", "/me")
    assert me.get_json()["provides"] == sorted(
        map(repr, [UserNeed(1), RoleNeed("admin"), RoleNeed("editor")])
    )
    assert me.get_json()["attributes"]["user"] == "the current_user proxy"
    # Bare: the login and every request ran the handler. Wrapped: the login, the miss
    # that stored the user, and the first hit (which recorded the effect) ran it.
    assert bare.runs == [7]
    assert wrapped.runs == [3]


def test_after_a_committed_role_change_the_next_request_runs_the_handler_and_sees_it(pair):
    bare, wrapped = pair([documented])
    clients = logged_in(bare, wrapped)
    for _ in range(3):
        same(bare, wrapped, clients, "get", "/me")
    runs = wrapped.runs[0]
    same(bare, wrapped, clients, "post", "/grant/1/auditor")  # bind_sqlalchemy invalidates on commit
    for _ in range(3):  # the miss, the hit that records anew, a replay of the new record
        me = same(bare, wrapped, clients, "get", "/me")
        assert repr(RoleNeed("auditor")) in me.get_json()["provides"]
    assert wrapped.runs[0] == runs + 2


def test_invalidate_drops_the_record_with_the_entry(pair):
    bare, wrapped = pair([documented])
    clients = logged_in(bare, wrapped)
    for _ in range(3):
        same(bare, wrapped, clients, "get", "/me")
    # A change the binding does not see (another program), then invalidate() by hand.
    with wrapped.engine.begin() as connection:
        connection.execute(user_roles.delete().where(user_roles.c.role_id == 1))
    assert repr(RoleNeed("admin")) in clients[1].get("/me").get_json()["provides"]  # within the TTL: as documented
    assert wrapped.cache is not None
    wrapped.cache.invalidate(1)
    for _ in range(3):  # the miss, the hit that records anew, a replay of the new record
        assert repr(RoleNeed("admin")) not in clients[1].get("/me").get_json()["provides"]


def test_an_invalidation_from_another_process_through_redis_drops_the_record(database, redis_url, redis_prefix):
    """Another process (here: another cache on the same Redis prefix) invalidates; once
    its invalidate() returned, this process runs the handler again on the new roles."""
    from identity_middleware.redis_versions import RedisVersionStore

    here, elsewhere = (RedisVersionStore(redis_url, prefix=redis_prefix) for _ in range(2))
    stack = Stack(database("redis"), wrapped=True, handlers=[documented], versions=here)
    other = UserCache(ttl=300, versions=elsewhere)
    try:
        client = stack.app.test_client()
        client.post("/login/1")
        for _ in range(3):
            assert repr(RoleNeed("admin")) in client.get("/me").get_json()["provides"]
        runs = stack.runs[0]
        with stack.engine.begin() as connection:  # the other process's change, committed
            connection.execute(user_roles.delete().where(user_roles.c.role_id == 1))
        other.invalidate(1)
        for _ in range(3):  # the miss, the hit that records anew, a replay of the new record
            assert repr(RoleNeed("admin")) not in client.get("/me").get_json()["provides"]
        assert stack.runs[0] == runs + 2
    finally:
        stack.close()
        here.close()
        elsewhere.close()


def test_a_change_and_a_new_identity_in_the_same_request_run_the_handler(pair):
    """The user of this request changed after its hit: the new identity is computed, not replayed."""
    bare, wrapped = pair([documented])
    clients = logged_in(bare, wrapped)
    for _ in range(3):
        same(bare, wrapped, clients, "get", "/me")
    me = same(bare, wrapped, clients, "post", "/grant-myself/auditor")
    assert repr(RoleNeed("auditor")) in me.get_json()["provides"]


def test_each_user_gets_their_own_identity(pair):
    bare, wrapped = pair([documented])
    alice, bob = logged_in(bare, wrapped, 1), logged_in(bare, wrapped, 2)
    for _ in range(3):
        a = same(bare, wrapped, alice, "get", "/me").get_json()
        b = same(bare, wrapped, bob, "get", "/me").get_json()
    assert a != b and repr(RoleNeed("admin")) not in b["provides"]


def _keeps_the_user_object(sender: Any, identity: Identity) -> None:
    identity.user = current_user._get_current_object()
    identity.provides.add(RoleNeed(identity.user.roles[0].name))


def test_the_user_object_is_replayed_as_this_requests_user(pair):
    bare, wrapped = pair([_keeps_the_user_object])
    clients = logged_in(bare, wrapped)
    for _ in range(5):
        me = same(bare, wrapped, clients, "get", "/me")
    assert me.get_json()["attributes"]["user"] == "this request's user"
    assert wrapped.runs == [3]  # replayed, yet never another request's object


def _list_attribute(sender: Any, identity: Identity) -> None:
    identity.role_names = [role.name for role in current_user.roles]  # mutable: not shareable


def _removes_a_need(sender: Any, identity: Identity) -> None:
    identity.provides.add(RoleNeed("temporary"))
    identity.provides.discard(RoleNeed("temporary"))
    identity.provides.discard(RoleNeed("from-before"))


def _replaces_provides(sender: Any, identity: Identity) -> None:
    identity.provides = {RoleNeed(role.name) for role in current_user.roles}


def _returns_something(sender: Any, identity: Identity) -> str:
    identity.provides.add(RoleNeed("x"))
    return "a value"


def _a_user_object_from_elsewhere(sender: Any, identity: Identity) -> None:
    identity.other = current_user._get_current_object().__class__(id=9, name="not cached")


def _before(sender: Any, identity: Identity) -> None:
    identity.provides.add(RoleNeed("from-before"))


@pytest.mark.parametrize(
    "handler",
    [_list_attribute, _removes_a_need, _replaces_provides, _returns_something, _a_user_object_from_elsewhere],
)
def test_effects_that_cannot_be_shared_are_never_recorded(pair, handler):
    bare, wrapped = pair([_before, handler], memoized=(1,))
    clients = logged_in(bare, wrapped)
    for _ in range(5):
        same(bare, wrapped, clients, "get", "/me")
    assert wrapped.runs == bare.runs == [6, 6]


def test_a_record_is_replayed_only_onto_an_identity_like_the_one_it_was_made_on(pair):
    """An earlier receiver that adds a need on some requests only: the memoized handler adds
    the same need always. Its record from a request where the need was already there
    (so it added nothing) must not be replayed where it was not."""

    def beta_testers(sender: Any, identity: Identity) -> None:
        if request.args.get("beta"):
            identity.provides.add(RoleNeed("beta"))

    def everyone_is_beta(sender: Any, identity: Identity) -> None:
        identity.provides.add(RoleNeed("beta"))
        identity.provides.add(RoleNeed(current_user.roles[0].name))

    bare, wrapped = pair([beta_testers, everyone_is_beta], memoized=(1,))
    clients = logged_in(bare, wrapped)
    same(bare, wrapped, clients, "get", "/me")  # the miss
    for path in ("/me?beta=1", "/me?beta=1", "/me", "/me", "/me?beta=1"):
        me = same(bare, wrapped, clients, "get", path)
        assert repr(RoleNeed("beta")) in me.get_json()["provides"], path
    assert wrapped.runs[1] == 4  # login, miss, one recording run per starting state


def test_a_raising_handler_raises_every_time(pair):
    def broken(sender: Any, identity: Identity) -> None:
        identity.provides.add(RoleNeed("half"))
        if current_user.is_authenticated:
            raise RuntimeError("the handler failed")

    bare, wrapped = pair([broken])
    for stack in (bare, wrapped):
        stack.app.config["PROPAGATE_EXCEPTIONS"] = False
    clients = (bare.app.test_client(), wrapped.app.test_client())
    for client in clients:
        client.post("/login/1")
    for _ in range(4):
        same(bare, wrapped, clients, "get", "/me")  # 500 in both
    assert wrapped.runs == bare.runs


def test_other_receivers_run_on_every_request(pair):
    seen: list[str] = []

    def audit(sender: Any, identity: Identity) -> None:
        seen.append(sender.name)
        identity.provides.add(RoleNeed("audited"))

    bare, wrapped = pair([documented, audit], memoized=(0,))
    clients = logged_in(bare, wrapped)
    for _ in range(5):
        same(bare, wrapped, clients, "get", "/me")
    assert bare.runs[1] == wrapped.runs[1] == 6
    assert wrapped.runs[0] == 3


def test_a_user_that_is_gone_runs_the_handler_on_every_request(pair):
    """The session still names the user, the loader finds nobody (a cached "no such user")."""
    bare, wrapped = pair([documented])
    clients = logged_in(bare, wrapped)
    same(bare, wrapped, clients, "get", "/me")
    same(bare, wrapped, clients, "post", "/delete/1")
    runs = [bare.runs[0], wrapped.runs[0]]
    for _ in range(4):
        me = same(bare, wrapped, clients, "get", "/me")
    assert me.get_json()["provides"] == []
    assert [bare.runs[0], wrapped.runs[0]] == [runs[0] + 4, runs[1] + 4]


def test_the_record_is_per_sender(database):
    """One cache serving two apps, one handler whose effect names the app."""

    def names_the_app(sender: Any, identity: Identity) -> None:
        identity.provides.add(RoleNeed(f"{sender.name}:{current_user.roles[0].name}"))

    site = Stack(database("shared"), wrapped=True, handlers=[names_the_app], name="site")
    stacks = [site, Stack("", wrapped=True, handlers=[names_the_app], name="admin", share=site)]
    try:
        seen = []
        for stack in stacks:
            client = stack.app.test_client()
            client.post("/login/1")
            for _ in range(4):
                seen.append(client.get("/me").get_json()["provides"])
        assert seen[:4] == [[repr(RoleNeed("site:admin"))]] * 4
        assert seen[4:] == [[repr(RoleNeed("admin:admin"))]] * 4
        # site: its login, the miss, the first hit (recorded); admin: its login, its first
        # hit of the shared entry (recorded under its own sender), then replays.
        assert [stack.runs for stack in stacks] == [[3], [2]]
    finally:
        for stack in reversed(stacks):
            stack.close()


def test_records_per_entry_are_bounded(database):
    """A handler seen under many auth types: the entry keeps at most MAX_RECORDS_PER_ENTRY."""
    auth_types = itertools.count()

    stack = Stack(database("bounded"), wrapped=True, handlers=[documented])
    try:
        client = stack.app.test_client()
        client.post("/login/1")
        client.get("/me")  # the miss that stores the entry
        for _ in range(MAX_RECORDS_PER_ENTRY * 2):
            with client.session_transaction() as session:
                session["identity.auth_type"] = f"type-{next(auth_types)}"
            assert client.get("/me").status_code == 200
        assert stack.cache is not None
        entry = stack.cache._entries["1"]
        assert len(entry[3]) == MAX_RECORDS_PER_ENTRY
    finally:
        stack.close()


def test_decorating_something_that_is_not_a_function_fails_at_once():
    with pytest.raises(TypeError, match=r"memoize_identity decorates an identity_loaded receiver.*got str 'roles'"):
        memoize_identity("roles")  # type: ignore[type-var]


# -- generated handlers -------------------------------------------------------------------

#: Values a generated handler stores on the identity; some shareable, some not.
VALUES: dict[str, Callable[[], Any]] = {
    "text": lambda: "x",
    "number": lambda: 7,
    "none": lambda: None,
    "tuple": lambda: ("a", 1),
    "list": lambda: ["a"],
    "dict": lambda: {"a": 1},
    "set": lambda: {"a"},
    "proxy": lambda: current_user,
    "user": lambda: current_user._get_current_object(),
    "first role name": lambda: current_user.roles[0].name if current_user.roles else "",
    "user name": lambda: current_user.name,
}

steps = st.one_of(
    st.tuples(st.just("add role needs"), st.booleans()),
    st.tuples(st.just("add need"), st.sampled_from(["a", "b"])),
    st.tuples(st.just("discard need"), st.sampled_from(["a", "admin"])),
    st.tuples(st.just("set"), st.sampled_from(["user", "label", "extra"]), st.sampled_from(sorted(VALUES))),
    st.tuples(st.just("delete"), st.sampled_from(["label"])),
)


def generated(program: list[tuple[Any, ...]], *, flagged_only: bool = False) -> Handler:
    """A handler running ``program``; with ``flagged_only``, only for requests with ``?flag=1``
    (impure: fine for a receiver that is not memoized)."""

    def handler(sender: Any, identity: Identity) -> None:
        if flagged_only and request.args.get("flag") != "1":
            return
        for step in program:
            if step[0] == "add role needs":
                for role in current_user.roles:
                    identity.provides.add(RoleNeed(role.name) if step[1] else UserNeed(role.name))
            elif step[0] == "add need":
                identity.provides.add(RoleNeed(step[1]))
            elif step[0] == "discard need":
                identity.provides.discard(RoleNeed(step[1]))
            elif step[0] == "set":
                setattr(identity, step[1], VALUES[step[2]]())
            elif step[0] == "delete" and hasattr(identity, step[1]):
                delattr(identity, step[1])

    return handler


_databases = itertools.count()

requests = st.lists(
    st.sampled_from(["get alice", "get alice flagged", "get bob", "grant alice", "invalidate alice", "grant-myself"]),
    min_size=1,
    max_size=8,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=st.lists(steps, min_size=1, max_size=5), before=st.lists(steps, max_size=2), plan=requests)
def test_generated_handlers_see_what_they_see_bare(database, program, before, plan):
    names = itertools.count()
    handlers = ([generated(before, flagged_only=True)] if before else []) + [generated(program)]
    memoized = (len(handlers) - 1,)
    n = next(_databases)
    bare = Stack(database(f"gen-bare-{n}"), wrapped=False, handlers=handlers, memoized=memoized)
    wrapped = Stack(database(f"gen-wrapped-{n}"), wrapped=True, handlers=handlers, memoized=memoized)
    try:
        alice, bob = logged_in(bare, wrapped, 1), logged_in(bare, wrapped, 2)
        for step in plan:
            if step == "get alice":
                same(bare, wrapped, alice, "get", "/me")
            elif step == "get alice flagged":
                same(bare, wrapped, alice, "get", "/me?flag=1")
            elif step == "get bob":
                same(bare, wrapped, bob, "get", "/me")
            elif step == "grant alice":
                same(bare, wrapped, alice, "post", f"/grant/1/r{next(names)}")
            elif step == "invalidate alice":
                assert wrapped.cache is not None
                wrapped.cache.invalidate(1)
            else:
                same(bare, wrapped, alice, "post", f"/grant-myself/s{next(names)}")
            same(bare, wrapped, alice, "get", "/me")
    finally:
        bare.close()
        wrapped.close()

