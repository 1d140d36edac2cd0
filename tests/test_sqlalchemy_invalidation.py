"""The example app (Flask-SQLAlchemy, Flask-Login, Flask-Principal) with its cached,
SQLAlchemy-bound user: no SQL per page after the first, and every committed change
to a user or a role visible on the very next request -- without a single manual
``invalidate`` call in the app.
"""

from __future__ import annotations

import threading

import pytest
from flask import g
from flask_login import current_user
from sqlalchemy import inspect, update

from conftest import count_sql, log_in
from examples.app import Role, User, db


def _client(app, email="alice@example.com"):
    return log_in(app.test_client(), email)


def test_twenty_page_loads_after_the_first_run_no_sql_and_render_the_roles(example_app, engine):
    stats = example_app.extensions["example"]
    alice = _client(example_app)
    assert b"admin, editor" in alice.get("/").data
    loads = stats.loader_calls
    with count_sql(engine) as statements:
        for _ in range(20):
            response = alice.get("/")
            assert response.status_code == 200 and b"admin, editor" in response.data
    assert statements == []
    assert stats.loader_calls == loads


def test_pages_assets_and_the_admin_page_run_no_sql(example_app, engine):
    stats = example_app.extensions["example"]
    alice = _client(example_app)
    alice.get("/")
    loads = stats.loader_calls
    with count_sql(engine) as statements:
        for _ in range(5):
            assert alice.get("/").status_code == 200
            for asset in ("/static/app.css", "/static/app.js", "/widgets/static/widget.css"):
                assert alice.get(asset).status_code == 200
            assert alice.get("/admin").status_code == 200
    assert statements == []
    assert stats.loader_calls == loads


def test_a_role_granted_and_committed_in_one_request_shows_on_the_next(example_app):
    alice, bob = _client(example_app), _client(example_app, "bob@example.com")
    assert bob.get("/me").json["roles"] == ["editor"]
    assert bob.get("/admin").status_code == 403
    assert alice.post("/admin/users/2/roles", data={"role": "admin", "action": "grant"}).status_code == 200
    assert bob.get("/me").json["roles"] == ["admin", "editor"]
    assert bob.get("/admin").status_code == 200
    alice.post("/admin/users/2/roles", data={"role": "admin", "action": "revoke"})
    assert bob.get("/me").json["roles"] == ["editor"]
    assert bob.get("/admin").status_code == 403


def test_a_renamed_role_shows_its_new_name_on_the_next_request(example_app):
    alice, bob = _client(example_app), _client(example_app, "bob@example.com")
    assert bob.get("/me").json["roles"] == ["editor"]
    assert alice.post("/admin/roles/editor/rename", data={"name": "writer"}).status_code == 200
    assert bob.get("/me").json["roles"] == ["writer"]
    assert alice.get("/me").json["roles"] == ["admin", "writer"]


def test_a_deactivated_user_is_anonymous_next_and_refused_the_admin_page(example_app):
    alice, bob = _client(example_app), _client(example_app, "bob@example.com")
    alice.post("/admin/users/2/roles", data={"role": "admin", "action": "grant"})
    assert bob.get("/admin").status_code == 200
    assert alice.post("/admin/users/2/deactivate").status_code == 200
    assert bob.get("/me").json["anonymous"] is True
    assert bob.get("/admin").status_code == 403


def test_a_change_flushed_then_rolled_back_causes_no_reload(example_app):
    stats = example_app.extensions["example"]
    alice = _client(example_app)
    alice.get("/")
    loads = stats.loader_calls
    with example_app.app_context():
        user = db.session.get(User, 1)
        user.email = "never@example.com"
        user.roles.clear()
        db.session.get(Role, 2).name = "never"
        db.session.flush()
        db.session.rollback()
    me = alice.get("/me").json
    assert me["email"] == "alice@example.com" and me["roles"] == ["admin", "editor"]
    assert stats.loader_calls == loads


def test_a_bulk_update_is_seen_by_the_next_request(example_app):
    alice = _client(example_app)
    assert alice.get("/me").json["email"] == "alice@example.com"
    with example_app.app_context():
        db.session.execute(update(User).where(User.id == 1).values(email="alice@example.org"))
        db.session.commit()
    assert alice.get("/me").json["email"] == "alice@example.org"


def test_changing_current_user_from_the_cache_and_committing_persists(example_app):
    stats = example_app.extensions["example"]
    seen = {}

    @example_app.post("/test/change-my-email")
    def change_my_email():
        loads = stats.loader_calls
        user = current_user._get_current_object()
        seen["hit"] = stats.loader_calls == loads and g.get("_identity_cache_outcome") == "hit"
        seen["attached"] = inspect(user).session is db.session()
        user.email = "alice@new.example.com"
        db.session.commit()
        return "ok"

    alice = _client(example_app)
    alice.get("/")
    assert alice.post("/test/change-my-email").status_code == 200
    assert seen == {"hit": True, "attached": True}
    assert alice.get("/me").json["email"] == "alice@new.example.com"
    with example_app.app_context():
        db.session.expire_all()
        assert db.session.get(User, 1).email == "alice@new.example.com"


def test_eight_overlapping_requests_of_one_user_each_get_a_distinct_object(example_app):
    barrier = threading.Barrier(8)
    held: list = []
    lock = threading.Lock()

    @example_app.get("/test/hold")
    def hold():
        user = current_user._get_current_object()
        barrier.wait(timeout=10)  # all eight requests hold their user now
        with lock:
            held.append((user, inspect(user).session, [role.name for role in user.roles]))
        return "ok"

    alice = _client(example_app)
    alice.get("/")  # warm: the eight are cache hits
    cookie = alice.get_cookie("session").value
    statuses: list = []

    def request() -> None:
        client = example_app.test_client()
        client.set_cookie("session", cookie)
        statuses.append(client.get("/test/hold").status_code)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert statuses == [200] * 8
    assert len({id(user) for user, _, _ in held}) == 8
    assert len({id(session) for _, session, _ in held}) == 8
    assert all(names == ["admin", "editor"] for _, _, names in held)


@pytest.mark.parametrize("method", ["get", "head"])
def test_static_assets_never_load_the_user(example_app, engine, method):
    stats = example_app.extensions["example"]
    alice = _client(example_app)
    loads = stats.loader_calls
    with count_sql(engine) as statements:
        assert getattr(alice, method)("/static/app.css").status_code == 200
    assert statements == [] and stats.loader_calls == loads


def test_a_role_nobody_holds_yet_can_be_granted(example_app):
    alice = _client(example_app)
    response = alice.post("/admin/users/2/roles", data={"role": "viewer", "action": "grant"})
    assert response.status_code == 200
    assert response.json["roles"] == ["editor", "viewer"]
