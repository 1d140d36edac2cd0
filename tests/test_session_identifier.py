"""Flask-Login's session identifier, remembered per client: the same value as Flask-Login's own.

Session protection (Flask-Login's default, ``basic``) hashes the client's
``X-Forwarded-For`` (or remote address) and ``User-Agent`` with SHA-512 each time
a request loads the user. The hooks put that function behind a memo on the app's
LoginManager (login_identifier._SessionIdentifierMemo); these tests hold it to giving
exactly Flask-Login's answer, request by request, on real apps.
"""

from __future__ import annotations

import logging

import flask_login.utils
import pytest
from flask import Flask, jsonify, session
from flask_login import LoginManager, UserMixin, current_user, login_user

from identity_middleware import IdentityMiddleware, login_identifier

AGENTS = [None, "", "curl/8.5", "Mozilla/5.0 (X11; Linux x86_64) caf\xc3\xa9 | \xe9", "a|b"]
FORWARDED = [None, "", "203.0.113.9", "203.0.113.9, 10.0.0.1", " 198.51.100.2 ,x", ","]
ADDRESSES = ["127.0.0.1", "::1", None]


class User(UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id


def make_app(*, middleware: bool = True, protection: str = "basic") -> Flask:
    app = Flask(f"identifier_{middleware}_{protection}")
    app.config.update(SECRET_KEY="test", SESSION_PROTECTION=protection)
    if middleware:
        app.wsgi_app = IdentityMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    manager = LoginManager(app)
    manager.user_loader(User)

    @app.get("/identifier")
    def identifier():
        return jsonify(
            generated=manager._session_identifier_generator(),
            flask_login=flask_login.utils._create_identifier(),
        )

    @app.get("/login")
    def login():
        login_user(User("7"))
        return "ok"

    @app.get("/me")
    def me():
        return jsonify(
            authenticated=current_user.is_authenticated,
            fresh=session.get("_fresh"),
            identifier=session.get("_id"),
        )

    return app


def environ_of(agent, forwarded, address):
    environ = {"REMOTE_ADDR": address}
    if agent is not None:
        environ["HTTP_USER_AGENT"] = agent
    if forwarded is not None:
        environ["HTTP_X_FORWARDED_FOR"] = forwarded
    return environ


def memo_of(app):
    return app.login_manager._session_identifier_generator


def every_client():
    return [(a, f, r) for a in AGENTS for f in FORWARDED for r in ADDRESSES]


def test_the_memoised_identifier_is_flask_logins_for_every_client_seen_again():
    app = make_app()
    client = app.test_client()
    client.get("/identifier")
    memo = memo_of(app)
    assert isinstance(memo, login_identifier._SessionIdentifierMemo)
    answers = {}
    for _ in range(2):  # a miss, then a hit for each
        for key in every_client():
            answer = client.get("/identifier", environ_overrides=environ_of(*key)).json
            assert answer["generated"] == answer["flask_login"], key
            answers.setdefault(key, set()).add(answer["generated"])
    assert all(len(values) == 1 for values in answers.values())
    assert len(set().union(*answers.values())) > len(AGENTS) * 2  # the key's parts all count
    assert 0 < len(memo) <= len(answers)


def test_session_protection_decides_as_in_the_bare_app():
    for protection in ("basic", "strong"):
        results = []
        for middleware in (False, True):
            app = make_app(middleware=middleware, protection=protection)
            client = app.test_client()
            login_as = environ_of("Agent/1", None, "192.0.2.1")
            client.get("/login", environ_overrides=login_as)
            seen = []
            for key in [("Agent/1", None, "192.0.2.1"), ("Agent/2", None, "192.0.2.1"), ("Agent/1", "192.0.2.1", None)]:
                seen.append(client.get("/me", environ_overrides=environ_of(*key)).json)
            client.get("/login", environ_overrides=login_as)
            for _ in range(2):
                seen.append(client.get("/me", environ_overrides=login_as).json)
            results.append(seen)
        assert results[0] == results[1], protection
        assert [r["authenticated"] for r in results[1]][:2] == [True, protection == "basic"]


def test_the_memo_is_bounded_in_bytes_and_long_values_are_not_stored(monkeypatch):
    monkeypatch.setattr(login_identifier, "IDENTIFIER_MEMO_BYTES", 6000)
    app = make_app()
    client = app.test_client()
    client.get("/identifier")
    memo = memo_of(app)
    for number in range(60):
        answer = client.get("/identifier", environ_overrides=environ_of(f"Agent/{number}", None, "192.0.2.1")).json
        assert answer["generated"] == answer["flask_login"]
    assert 0 < len(memo) < 60 and memo.currsize <= 6000
    before = len(memo)
    long_agent = "x" * (login_identifier.IDENTIFIER_MEMO_MAX_CHARS + 1)
    for _ in range(2):
        answer = client.get("/identifier", environ_overrides=environ_of(long_agent, None, "192.0.2.1")).json
        assert answer["generated"] == answer["flask_login"]
    assert len(memo) == before


def test_values_that_are_not_plain_strings_go_to_flask_login():
    class Agent(str):
        def encode(self, *args, **kwargs):
            return b"rewritten"

    app = make_app()
    client = app.test_client()
    client.get("/identifier", environ_overrides=environ_of("plain", None, "192.0.2.1"))
    memo = memo_of(app)
    before = len(memo)
    for _ in range(2):
        answer = client.get("/identifier", environ_overrides=environ_of(Agent("plain"), None, "192.0.2.1")).json
        assert answer["generated"] == answer["flask_login"]
    plain = client.get("/identifier", environ_overrides=environ_of("plain", None, "192.0.2.1")).json
    assert plain["generated"] != answer["generated"]  # a hit on the equal str would have been wrong
    assert len(memo) == before


def test_a_forwarded_header_set_to_none_is_not_a_missing_one():
    # Not what a server sends, but Flask-Login reads it differently: None, not the remote address.
    app = make_app()
    client = app.test_client()
    answers = []
    for forwarded in ({}, {"HTTP_X_FORWARDED_FOR": None}, {}):
        environ = {**environ_of("Agent/1", None, "192.0.2.1"), **forwarded}
        answer = client.get("/identifier", environ_overrides=environ).json
        assert answer["generated"] == answer["flask_login"]
        answers.append(answer["generated"])
    assert answers[0] == answers[2] != answers[1]


def test_flask_logins_address_function_replaced_after_installation_is_honoured(monkeypatch):
    app = make_app()
    client = app.test_client()
    environ = environ_of("Agent/1", None, "192.0.2.1")
    first = client.get("/identifier", environ_overrides=environ).json["generated"]
    monkeypatch.setattr(flask_login.utils, "_get_remote_addr", lambda: "elsewhere")
    answer = client.get("/identifier", environ_overrides=environ).json
    assert answer["generated"] == answer["flask_login"] != first


def test_an_app_with_its_own_generator_keeps_it():
    app = make_app()

    def mine():
        return "the app's own"

    app.login_manager._session_identifier_generator = mine
    client = app.test_client()
    assert client.get("/identifier").json["generated"] == "the app's own"
    assert memo_of(app) is mine


def test_an_unexpected_flask_login_is_left_alone_with_a_warning(monkeypatch, caplog):
    def reads_another_header():
        from flask import request

        return request.headers.get("X-Real-IP", request.remote_addr)

    monkeypatch.setattr(flask_login.utils, "_get_remote_addr", reads_another_header)
    app = make_app()
    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger="identity_middleware"):
        client.get("/identifier")
    assert memo_of(app) is flask_login.utils._create_identifier
    assert any("session identifier" in r.getMessage() and "_get_remote_addr" in r.getMessage() for r in caplog.records)
    answers = {
        client.get("/identifier", headers={"X-Real-IP": ip}, environ_overrides={"REMOTE_ADDR": "192.0.2.1"}).json[
            "generated"
        ]
        for ip in ("198.51.100.1", "198.51.100.2")
    }
    assert len(answers) == 2  # a memo keyed without X-Real-IP would have answered once


@pytest.mark.parametrize("name", ["_create_identifier", "_get_remote_addr"])
def test_the_startup_check_refuses_other_code(monkeypatch, name):
    assert login_identifier.session_identifier_memo_problem() is None
    monkeypatch.setattr(flask_login.utils, name, lambda: "other")
    assert name in (login_identifier.session_identifier_memo_problem() or "")
