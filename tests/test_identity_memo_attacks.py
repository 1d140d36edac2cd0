"""@memoize_identity under attack: differential tests, bare app vs wrapped app.

Each test builds the same app twice -- bare (Flask, Flask-Login, Flask-Principal,
SQLAlchemy, nothing of ours) and wrapped (IdentityMiddleware, a UserCache bound with
``bind_sqlalchemy``, the handler under ``@memoize_identity``) -- and sends both the
same requests. Every handler here keeps the documented promise: its effect on the
identity depends only on the cached user, the sender and the identity it is given.
Whatever the app can see must be the same in both.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
from flask import Flask, current_app, g, jsonify, request, session
from flask_login import LoginManager, current_user, login_user
from flask_principal import Identity, Need, Principal, RoleNeed, UserNeed, identity_changed, identity_loaded
from sqlalchemy import create_engine, select
from sqlalchemy.orm import scoped_session, sessionmaker
from werkzeug.local import LocalProxy

from identity_middleware import IdentityMiddleware, UserCache, memoize_identity
from identity_middleware.sqlalchemy import bind_sqlalchemy

from memo_models import Role, User, documented, seed


Handler = Callable[..., Any]


class App:
    """One app, bare or wrapped. ``before_principal(app, db)`` runs before ``Principal(app)``
    (hooks it registers run before Principal's); ``setup(app, db, principal)`` after it."""

    def __init__(
        self,
        url: str,
        *,
        wrapped: bool,
        handler: Handler,
        earlier: Handler | None = None,
        before_principal: Callable[[Flask, Any], None] | None = None,
        setup: Callable[[Flask, Any, Principal], None] | None = None,
        identity_class: type[Identity] = Identity,
        connect_any: bool = False,
        config: dict[str, Any] | None = None,
        static_paths: tuple[str, ...] = (),
    ) -> None:
        self.engine = create_engine(url)
        self.db = db = scoped_session(sessionmaker(self.engine))
        self.runs = 0
        app = self.app = Flask("attack")
        app.config.update(SECRET_KEY="memo-attacks", TESTING=True, **(config or {}))
        manager = LoginManager(app)

        def load(user_id: str) -> User | None:
            return db.get(User, int(user_id))

        self.cache: UserCache | None = None
        self.binding = None
        if wrapped:
            self.cache = cache = UserCache(app, ttl=300)
            self.binding = bind_sqlalchemy(cache, db, User, relationships=("roles",))
            manager.user_loader(cache.cached(load))
            app.wsgi_app = IdentityMiddleware(app.wsgi_app, static_paths=list(static_paths))  # type: ignore[method-assign]
        else:
            manager.user_loader(load)

        if before_principal is not None:
            before_principal(app, db)
        principal = Principal(app)
        if identity_class is not Identity:

            @principal.identity_loader
            def load_identity() -> Identity | None:
                if "identity.id" in session:
                    return identity_class(session["identity.id"], session.get("identity.auth_type"))
                return None

        if setup is not None:
            setup(app, db, principal)

        def counted(sender: Any, identity: Identity) -> Any:
            if connect_any and current_app._get_current_object() is not app:
                return None  # connected to any sender: the other app of the pair sent it
            self.runs += 1
            return handler(sender, identity)

        self.receivers: list[tuple[Any, Any]] = []
        if earlier is not None:
            self.receivers.append((earlier, app))
        self.receivers.append((memoize_identity(counted) if wrapped else counted, None if connect_any else app))
        for receiver, sender in self.receivers:
            if sender is None:
                identity_loaded.connect(receiver, weak=False)
            else:
                identity_loaded.connect(receiver, sender=sender, weak=False)

        @app.teardown_appcontext
        def remove(exc: BaseException | None) -> None:
            db.remove()

        @app.post("/login/<int:user_id>")
        def log_in(user_id: int) -> Any:
            user = db.get(User, user_id)
            login_user(user, remember=request.args.get("remember") == "1")
            identity_changed.send(app, identity=identity_class(user.id))
            return "", 204

        @app.get("/me")
        def me() -> Any:
            return jsonify(describe(g.identity))

    def close(self) -> None:
        for receiver, sender in self.receivers:
            if sender is None:
                identity_loaded.disconnect(receiver)
            else:
                identity_loaded.disconnect(receiver, sender=sender)
        if self.binding is not None:
            self.binding.remove()
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
            target = value._get_current_object()
            attributes[name] = "a proxy to this request's user" if target is user else f"a proxy to {target!r}"
        elif value is user:
            attributes[name] = "this request's user"
        elif isinstance(value, (set, frozenset)):
            attributes[name] = sorted(map(repr, value))
        else:
            attributes[name] = repr(value)
    return {
        "class": type(identity).__name__,
        "id": repr(identity.id),
        "auth_type": repr(identity.auth_type),
        "provides": sorted(map(repr, identity.provides)),
        "attributes": attributes,
    }


@pytest.fixture
def pair(tmp_path):
    """``pair(handler, **options)``: a bare and a wrapped app, closed after the test."""
    built: list[App] = []

    def make(handler: Handler, **options: Any) -> tuple[App, App]:
        apps = []
        for wrapped in (False, True):
            url = f"sqlite:///{tmp_path / f'{len(built)}.sqlite'}"
            seed(url)
            built.append(App(url, wrapped=wrapped, handler=handler, **options))
            apps.append(built[-1])
        return apps[0], apps[1]

    yield make
    for stack in built:
        stack.close()


def both(bare: App, wrapped: App, method: str, path: str, clients: tuple[Any, Any], **kwargs: Any) -> list[Any]:
    """The same request to both apps: their status codes and JSON bodies."""
    answers = [getattr(client, method)(path, **kwargs) for client in clients]
    return [(a.status_code, a.get_json(silent=True)) for a in answers]


def logged_in(bare: App, wrapped: App, user_id: int = 1, *, remember: bool = False) -> tuple[Any, Any]:
    clients = (bare.app.test_client(), wrapped.app.test_client())
    for client in clients:
        assert client.post(f"/login/{user_id}" + ("?remember=1" if remember else "")).status_code == 204
    return clients


def warm(bare: App, wrapped: App, clients: tuple[Any, Any], times: int = 3) -> None:
    """The miss that stores the user, then hits that record and replay; all the same."""
    for _ in range(times):
        answers = both(bare, wrapped, "get", "/me", clients)
        assert answers[0] == answers[1]


# -- bug: a claim outlives the identity load that made it ---------------------------------


def _role_names(sender: Any, identity: Identity) -> None:
    """Needs per role, and the role names as a tuple attribute (shareable). It stores no
    proxy on the identity: one would make the reloaded identity's state unshareable."""
    identity.provides.add(UserNeed(current_user.id))
    for role in current_user.roles:
        identity.provides.add(RoleNeed(role.name))
    identity.role_names = tuple(role.name for role in current_user.roles)


def _resend_views(app: Flask, db: Any, principal: Principal) -> None:
    @app.post("/refresh")
    def refresh() -> Any:
        """Reload this request's identity: identity_loaded again, on g.identity."""
        identity_changed.send(app, identity=g.identity)
        return jsonify(describe(g.identity))

    @app.post("/leave/<role>")
    def leave(role: str) -> Any:
        """The user leaves a role (committed), then reloads the identity they hold."""
        current_user.roles.remove(db.scalar(select(Role).where(Role.name == role)))
        db.commit()  # bind_sqlalchemy invalidates the user on this commit
        identity_changed.send(app, identity=g.identity)
        return jsonify(describe(g.identity))

    @app.post("/join/<role>")
    def join(role: str) -> Any:
        current_user.roles.append(db.scalar(select(Role).where(Role.name == role)) or Role(name=role))
        db.commit()
        identity_changed.send(app, identity=g.identity)
        return jsonify(describe(g.identity))


@pytest.mark.parametrize("change", ["/leave/admin", "/join/auditor"])
def test_identity_reloaded_on_g_identity_after_a_committed_change_sees_it(pair, change):
    """The claim left in g by the request's first identity load is trusted by a later
    ``identity_loaded`` for the same Identity object, after the user changed and the
    entry was invalidated: it replays a record made for the unchanged user (a revoked
    role stays in ``role_names``; a granted one is missing from the needs)."""
    bare, wrapped = pair(_role_names, setup=_resend_views)
    clients = logged_in(bare, wrapped)
    warm(bare, wrapped, clients)
    answers = both(bare, wrapped, "post", "/refresh", clients)  # records the effect for the reloaded state
    assert answers[0] == answers[1]
    answers = both(bare, wrapped, "post", change, clients)
    assert answers[0] == answers[1]


# -- bug: a "hit" that hands out the session's own, changed rows ---------------------------


def _leave_before_principal(app: Flask, db: Any) -> None:
    """A before_request registered before Principal(app): leaves a role on ?leave=,
    committed at the end of the request (so Principal's load sees the change, unflushed)."""

    @app.before_request
    def leave_on_request() -> None:
        name = request.args.get("leave")
        if name and "_user_id" in session:
            user = db.get(User, int(session["_user_id"]))
            user.roles = [role for role in user.roles if role.name != name]
            g.commit = True

    @app.after_request
    def commit(response: Any) -> Any:
        if g.get("commit"):
            db.commit()
        return response


def test_a_hit_that_returns_a_changed_session_row_runs_the_handler(pair):
    """``from_cache`` returns the session's own instance when the session already holds
    the user; the cache still reports a hit, so the replay applies the entry's record to
    a user this request changed (unflushed) -- the identity keeps a role the bare app's
    identity no longer has."""
    bare, wrapped = pair(documented, before_principal=_leave_before_principal)
    clients = logged_in(bare, wrapped)
    warm(bare, wrapped, clients)
    answers = both(bare, wrapped, "get", "/me?leave=admin", clients)
    assert repr(RoleNeed("admin")) not in answers[0][1]["provides"]
    assert answers[0] == answers[1]


def _rename_role_before_principal(app: Flask, db: Any) -> None:
    @app.before_request
    def rename_on_request() -> None:
        name = request.args.get("rename")
        if name:
            db.get(Role, 1).name = name  # the session now holds a changed role, unflushed


def test_a_hit_that_uses_a_changed_session_role_runs_the_handler(pair):
    """The same through a related row: the hit builds the user around the session's own
    (renamed) Role, the replay adds the old name's need."""
    bare, wrapped = pair(documented, before_principal=_rename_role_before_principal)
    clients = logged_in(bare, wrapped)
    warm(bare, wrapped, clients)
    answers = both(bare, wrapped, "get", "/me?rename=owner", clients)
    assert repr(RoleNeed("owner")) in answers[0][1]["provides"]
    assert answers[0] == answers[1]


# -- bug: in-place changes to a set attribute of the identity are not recorded ------------


class ScopedIdentity(Identity):
    """An Identity subclass with a set of its own, filled by the handler."""

    def __init__(self, id: Any, auth_type: Any = None) -> None:
        super().__init__(id, auth_type)
        self.scopes: set[str] = set()


def _fills_scopes(sender: Any, identity: Identity) -> None:
    identity.user = current_user
    for role in current_user.roles:
        identity.provides.add(RoleNeed(role.name))
        identity.scopes.add(f"{role.name}:read")


def test_a_set_attribute_filled_in_place_is_replayed(pair):
    """``_state_key`` accepts a set attribute (as a frozenset) but ``_effect`` sees only
    rebinding, so the handler's ``identity.scopes.add(...)`` is dropped from the record:
    replayed identities have empty scopes."""
    bare, wrapped = pair(_fills_scopes, identity_class=ScopedIdentity)
    clients = logged_in(bare, wrapped)
    answers = [both(bare, wrapped, "get", "/me", clients) for _ in range(4)]
    assert answers[-1][0][1]["attributes"]["scopes"] == [repr("admin:read"), repr("editor:read")]
    for bare_answer, wrapped_answer in answers:
        assert bare_answer == wrapped_answer


# -- bug: the wrapper loads the user where the handler would not ---------------------------


def _public_view(app: Flask, db: Any, principal: Principal) -> None:
    @app.get("/public")
    def public() -> Any:
        return jsonify({"id": repr(g.identity.id), "provides": sorted(map(repr, g.identity.provides))})


def test_strong_session_protection_is_not_triggered_by_the_wrapper(pair):
    """``session_protection = "strong"``, a request from another User-Agent to a view that
    never reads ``current_user``, with a handler that reads only the identity: the wrapper's
    read of ``current_user`` runs Flask-Login's protection check, which empties the session
    -- the bare app leaves it (and the login) alone."""

    def needs_from_the_identity(sender: Any, identity: Identity) -> None:
        identity.provides.add(UserNeed(identity.id))

    bare, wrapped = pair(needs_from_the_identity, setup=_public_view, config={"SESSION_PROTECTION": "strong"})
    clients = logged_in(bare, wrapped)
    answers = both(bare, wrapped, "get", "/public", clients, headers={"User-Agent": "another browser"})
    assert answers[0] == answers[1]
    sessions = []
    for client in clients:
        with client.session_transaction() as s:
            sessions.append(sorted(s))
    assert "_user_id" in sessions[0]
    assert sessions[0] == sessions[1]


# -- bug: a proxy is shared as if it were current_user -------------------------------------


def _proxy_to_this_user(sender: Any, identity: Identity) -> None:
    user = current_user._get_current_object()
    identity.owner = LocalProxy(lambda: user)  # a proxy, but bound to this request's object
    identity.provides.add(RoleNeed(user.roles[0].name))


def test_a_recorded_proxy_bound_to_a_request_object_is_not_replayed(pair):
    """``_effect`` records any ``LocalProxy`` as shareable; one that closes over the user
    object of the recording request is replayed into later requests (and threads), where
    it points at another request's (detached) ORM instance."""
    bare, wrapped = pair(_proxy_to_this_user)
    clients = logged_in(bare, wrapped)
    for _ in range(4):
        answers = both(bare, wrapped, "get", "/me", clients)
        assert answers[0] == answers[1]


# -- bug: equal but distinguishable identity states share a record -------------------------


def _tier_by_request(sender: Any, identity: Identity) -> None:
    """A receiver that is not memoized (it may read the request)."""
    identity.provides.add(Need("tier", True if request.args.get("flag") else 1))


def _labels_from_the_identity(sender: Any, identity: Identity) -> None:
    tiers = [need.value for need in identity.provides if need.method == "tier"]
    identity.label = f"{current_user.name}:{tiers!r}"


def test_needs_equal_but_of_other_types_are_not_the_same_state(pair):
    """``_state_key`` keeps the types of attributes, not of values inside needs (or
    tuples): ``Need("tier", True)`` and ``Need("tier", 1)`` make the same key, so a record
    made on one is replayed on the other (``label`` says ``[1]`` where the bare app says ``[True]``)."""
    bare, wrapped = pair(_labels_from_the_identity, earlier=_tier_by_request)
    clients = logged_in(bare, wrapped)
    for path in ("/me", "/me", "/me", "/me?flag=1"):
        answers = both(bare, wrapped, "get", path, clients)
        assert answers[0] == answers[1], path


# -- bug: an unhashable sender -------------------------------------------------------------


def test_a_handler_connected_to_any_sender_accepts_an_unhashable_sender(pair):
    """Connected with ``connect`` (any sender) and sent ``identity_loaded`` by code whose
    sender is a list: the record key holds the sender, so the wrapper raises TypeError."""

    def reload_for_a_list(app: Flask, db: Any, principal: Principal) -> None:
        @app.post("/reload-with-list")
        def reload_with_list() -> Any:
            identity_loaded.send(["batch"], identity=g.identity)
            return jsonify(describe(g.identity))

    def any_sender(sender: Any, identity: Identity) -> None:
        _role_names(sender, identity)

    bare, wrapped = pair(any_sender, setup=reload_for_a_list, connect_any=True)
    for stack in (bare, wrapped):
        stack.app.config["PROPAGATE_EXCEPTIONS"] = False
    clients = logged_in(bare, wrapped)
    warm(bare, wrapped, clients)
    answers = both(bare, wrapped, "post", "/reload-with-list", clients)
    assert answers[0] == answers[1]


class SubIdentity(Identity):
    pass


def test_a_record_made_on_one_identity_class_is_not_replayed_onto_another(pair):
    """The same id, auth type and needs, but another class: the handler may tell them apart."""

    def sometimes_sub(app: Flask, db: Any, principal: Principal) -> None:
        @principal.identity_loader
        def load_sub() -> Identity | None:
            if request.args.get("sub") and "identity.id" in session:
                return SubIdentity(session["identity.id"], session.get("identity.auth_type"))
            return None

    def by_class(sender: Any, identity: Identity) -> None:
        kind = "sub" if isinstance(identity, SubIdentity) else "base"
        identity.provides.add(RoleNeed(f"{kind}:{current_user.roles[0].name}"))

    bare, wrapped = pair(by_class, setup=sometimes_sub)
    clients = logged_in(bare, wrapped)
    warm(bare, wrapped, clients)
    for path in ("/me?sub=1", "/me", "/me?sub=1", "/me"):
        answers = both(bare, wrapped, "get", path, clients)
        assert answers[0] == answers[1], path
    assert repr(RoleNeed("base:admin")) in answers[0][1]["provides"]


# -- probes that found nothing, kept as cheap regression guards ----------------------------


def test_remember_cookie_login_replays_the_same_identity(pair):
    """Flask-Login loads the user from the remember cookie inside the wrapper's read of
    current_user (Principal's identity still in the session): replayed, and the same."""
    bare, wrapped = pair(documented)
    clients = logged_in(bare, wrapped, remember=True)
    for _ in range(4):
        for client in clients:
            with client.session_transaction() as s:
                s.pop("_user_id", None)
        answers = both(bare, wrapped, "get", "/me", clients)
        assert answers[0] == answers[1]
        assert repr(RoleNeed("admin")) in answers[0][1]["provides"]
    assert wrapped.runs < bare.runs  # it did replay


def test_identity_changed_with_a_new_identity_for_another_user_runs_the_handler(pair):
    def switch(app: Flask, db: Any, principal: Principal) -> None:
        @app.post("/switch/<int:user_id>")
        def switch_user(user_id: int) -> Any:
            user = app.login_manager._user_callback(str(user_id))  # through the cache when wrapped
            login_user(user)
            identity_changed.send(app, identity=Identity(user.id))
            return jsonify(describe(g.identity))

    bare, wrapped = pair(documented, setup=switch)
    clients = logged_in(bare, wrapped)
    bob = logged_in(bare, wrapped, 2)
    warm(bare, wrapped, clients)
    warm(bare, wrapped, bob)
    answers = both(bare, wrapped, "post", "/switch/2", clients)
    assert answers[0] == answers[1]
    assert repr(RoleNeed("admin")) not in answers[0][1]["provides"]


def test_a_deferred_identity_on_a_static_request_replays_the_same_identity(pair):
    """A marked (static) request: the identity loads when the view reads g.identity."""

    def icon(app: Flask, db: Any, principal: Principal) -> None:
        @app.get("/favicon.ico")
        def favicon() -> Any:
            return jsonify(describe(g.identity))

    bare, wrapped = pair(documented, setup=icon, static_paths=("/favicon.ico",))
    clients = logged_in(bare, wrapped)
    warm(bare, wrapped, clients)
    runs = wrapped.runs
    for _ in range(3):
        answers = both(bare, wrapped, "get", "/favicon.ico", clients)
        assert answers[0] == answers[1]
        assert repr(RoleNeed("admin")) in answers[0][1]["provides"]
    assert wrapped.runs == runs  # replayed


def test_a_request_loader_user_replays_the_same_identity(pair):
    """A token request: the user comes from login_manager.request_loader (through the
    cache when wrapped), the identity from an identity loader that reads only the header."""

    def tokens(app: Flask, db: Any, principal: Principal) -> None:
        @app.login_manager.request_loader
        def by_token(req: Any) -> Any:
            token = req.headers.get("X-Token")
            return app.login_manager._user_callback(token) if token else None

        @principal.identity_loader
        def token_identity() -> Identity | None:
            token = request.headers.get("X-Token")
            return Identity(int(token), "token") if token else None

    bare, wrapped = pair(documented, setup=tokens)
    clients = (bare.app.test_client(), wrapped.app.test_client())
    for token in ("1", "1", "2", "1", "2", "2"):
        answers = both(bare, wrapped, "get", "/me", clients, headers={"X-Token": token})
        assert answers[0] == answers[1], token
    assert wrapped.runs < bare.runs  # replayed
