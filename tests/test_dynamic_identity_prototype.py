"""The cached-identity prototype replays a handler only while its inputs are provably the same.

A real Flask-Login + Flask-Principal app whose loader sits behind a
``UserCache``; the handler from Principal's docs is registered through
``CachedIdentityHandler``. The same requests go to a twin app with the handler
registered as usual, so every assertion about the identity is a comparison.
"""

from __future__ import annotations

import pytest
from flask import Flask, g, jsonify
from flask_login import LoginManager, UserMixin, current_user, login_user
from flask_principal import (
    Identity,
    Permission,
    Principal,
    RoleNeed,
    UserNeed,
    identity_changed,
    identity_loaded,
)

from identity_middleware import UserCache
from identity_middleware.principal_cache import CachedIdentityHandler

ROLES: dict[str, list[str]] = {}


class User(UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id
        self.roles = list(ROLES[user_id])


def docs_handler(sender, identity):
    identity.user = current_user
    if current_user.is_authenticated:
        identity.provides.add(UserNeed(current_user.id))
        for role in current_user.roles:
            identity.provides.add(RoleNeed(role))


def make_app(*, cached: bool, handler=docs_handler, clock=None):
    app = Flask(f"identity_{cached}")
    app.config.update(SECRET_KEY="test", IDENTITY_CACHE_TTL=3600)
    manager = LoginManager(app)
    user_cache = UserCache(app, timer=clock or (lambda: 0.0))
    loads = {"n": 0}

    @manager.user_loader
    @user_cache.cached
    def load_user(user_id):
        loads["n"] += 1
        return User(user_id) if user_id in ROLES else None

    Principal(app)
    other_receiver_calls = []

    @identity_loaded.connect_via(app)
    def audit(sender, identity):  # not opted in: must run on every request
        other_receiver_calls.append(identity.id)

    identity_cache = None
    if cached:
        identity_cache = CachedIdentityHandler(app, user_cache)
        identity_cache(handler)
    else:
        identity_loaded.connect(handler, sender=app)

    @app.post("/login/<user_id>")
    def login(user_id):
        login_user(User(user_id))
        identity_changed.send(app, identity=Identity(user_id))
        return "ok"

    @app.get("/identity")
    def identity():
        return jsonify(
            id=g.identity.id,
            provides=sorted(map(repr, g.identity.provides)),
            user_is_proxy=getattr(g.identity, "user", None) is current_user,
            admin=Permission(RoleNeed("admin")).can(),
        )

    app.extensions["probe"] = (user_cache, identity_cache, other_receiver_calls)
    return app


@pytest.fixture(autouse=True)
def roles():
    ROLES.clear()
    ROLES.update({"1": ["admin", "editor"], "2": ["editor"]})


def logged_in_pair(user_id="1"):
    apps = [make_app(cached=True), make_app(cached=False)]
    clients = [app.test_client() for app in apps]
    for client in clients:
        client.post(f"/login/{user_id}")
    return apps, clients


def same_answers(clients):
    first, second = (client.get("/identity").json for client in clients)
    assert first == second
    return first


def test_a_replayed_identity_equals_the_one_the_handler_builds():
    apps, clients = logged_in_pair()
    for _ in range(3):
        answer = same_answers(clients)
    assert answer["admin"] is True and answer["user_is_proxy"] is True
    _, identity_cache, audit_calls = apps[0].extensions["probe"]
    assert identity_cache.stats["replays"] >= 2
    assert len(audit_calls) == len(apps[1].extensions["probe"][2])  # other receivers ran every time


def test_invalidating_the_user_runs_the_handler_again_with_the_new_roles():
    apps, clients = logged_in_pair()
    same_answers(clients)
    same_answers(clients)
    ROLES["1"] = ["editor"]
    for app in apps:
        app.extensions["probe"][0].invalidate("1")
    runs = apps[0].extensions["probe"][1].stats["runs"]
    answer = same_answers(clients)
    assert answer["admin"] is False
    assert apps[0].extensions["probe"][1].stats["runs"] == runs + 1


def test_invalidate_all_runs_the_handler_again():
    apps, clients = logged_in_pair()
    same_answers(clients)
    ROLES["1"] = []
    for app in apps:
        app.extensions["probe"][0].invalidate_all()
    assert same_answers(clients)["admin"] is False


def test_another_user_or_identity_is_never_answered_from_the_first():
    _, clients = logged_in_pair("1")
    assert same_answers(clients)["admin"] is True
    for client in clients:
        client.post("/login/2")
    assert same_answers(clients)["admin"] is False


def test_a_handler_that_stores_a_per_request_object_runs_every_time():
    def handler(sender, identity):
        identity.user = current_user._get_current_object()
        identity.provides.add(RoleNeed("admin"))

    app = make_app(cached=True, handler=handler)
    client = app.test_client()
    client.post("/login/1")
    for _ in range(3):
        client.get("/identity")
    stats = app.extensions["probe"][1].stats
    assert stats["replays"] == 0 and stats["uncacheable"] >= 3


def test_the_cache_ttl_expiring_runs_the_handler_again():
    now = {"t": 0.0}
    app = make_app(cached=True, clock=lambda: now["t"])
    _, identity_cache, _ = app.extensions["probe"]
    client = app.test_client()
    client.post("/login/1")
    client.get("/identity")
    assert client.get("/identity").json["admin"] is True
    runs = identity_cache.stats["runs"]
    ROLES["1"] = []  # changed outside the app: only the TTL ends the old entry
    now["t"] += 3601
    assert client.get("/identity").json["admin"] is False
    assert identity_cache.stats["runs"] == runs + 1
