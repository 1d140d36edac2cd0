"""Signed-cookie sessions: written only when changed, verified once, never trusted beyond the signer.

Real Flask + Flask-Login + Flask-Principal apps, with and without
``identity_middleware.sessions.install``. Where an assertion says "as Flask
does", the same requests go to the same app without the wrapper, so the
assertion fails if the two differ. At the end, Flask's and Flask-Login's own
tests (from the sdists of the installed versions, downloaded once like
``test_flask_login_suite.py`` does) run with the wrapper on every app they
create and must end exactly as they end without it.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import unavailable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from flask import Flask, g, jsonify, request, session
from flask.sessions import SecureCookieSessionInterface, SessionInterface
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user
from flask_principal import (
    AnonymousIdentity,
    Identity,
    Permission,
    Principal,
    RoleNeed,
    identity_changed,
    identity_loaded,
)
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from markupsafe import Markup
from test_flask_login_suite import suite_dir  # noqa: F401 -- the fixture: Flask-Login's tests, downloaded once
from werkzeug.test import EnvironBuilder

from identity_middleware import IdentityMiddleware, sessions
from identity_middleware.sessions import REFRESH_FRACTION, CachedCookieSessionInterface

REPO = Path(__file__).resolve().parent.parent

ROLES = {"1": ["admin", "editor"], "2": ["editor"], "3": []}


class User(UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id
        self.roles = ROLES[user_id]


def make_app(*, wrapped: bool = True, middleware: bool = False, **config) -> Flask:
    """Login + Principal with the handler from Principal's docs, and views that touch the session."""
    app = Flask(f"sessions_{uuid.uuid4().hex[:8]}")
    app.config.update({"SECRET_KEY": "test-secret", **config})
    # Flask's default interface is one object shared by every app: tests that change its
    # salt must not change it for the others.
    app.session_interface = SecureCookieSessionInterface()
    if middleware:
        app.wsgi_app = IdentityMiddleware(app.wsgi_app)
    manager = LoginManager(app)
    manager.user_loader(lambda user_id: User(user_id) if user_id in ROLES else None)
    Principal(app)
    seen: list[dict] = []
    app.extensions["seen"] = seen

    @identity_loaded.connect_via(app)
    def on_identity_loaded(sender, identity):
        identity.user = current_user
        if current_user.is_authenticated:
            for role in current_user.roles:
                identity.provides.add(RoleNeed(role))

    @app.post("/login/<user_id>")
    def login(user_id):
        login_user(User(user_id), remember=request.args.get("remember") == "1")
        identity_changed.send(app, identity=Identity(user_id))
        return "ok"

    @app.post("/logout")
    def logout():
        logout_user()
        for key in ("identity.id", "identity.auth_type"):
            session.pop(key, None)
        identity_changed.send(app, identity=AnonymousIdentity())
        return "ok"

    @app.post("/set")
    def set_values():
        for key, value in _decode(request.get_json()).items():
            session[key] = value
        return "ok"

    @app.post("/pop/<key>")
    def pop(key):
        session.pop(key, None)
        return "ok"

    @app.post("/readd/<key>")
    def readd(key):  # same contents, another key order
        session[key] = session.pop(key)
        return "ok"

    @app.post("/nested/<key>")
    def nested(key):
        session["cart"]["items"].append(key)
        if request.args.get("flag") == "1":
            session.modified = True
        return "ok"

    @app.post("/permanent/<flag>")
    def permanent(flag):
        session.permanent = flag == "1"
        return "ok"

    @app.post("/identity/<user_id>")
    def switch_identity(user_id):
        identity_changed.send(app, identity=Identity(user_id, "switched"))
        return "ok"

    @app.get("/me")
    def me():
        return jsonify(user=None if current_user.is_anonymous else current_user.id, identity=str(g.identity.id))

    @app.get("/admin")
    @Permission(RoleNeed("admin")).require(http_exception=403)
    def admin():
        return "admin"

    @app.get("/plain")
    def plain():
        return "no session here"

    @app.get("/vary")
    def vary():
        response = app.make_response("varies")
        response.headers["vary"] = "Accept-Encoding"
        return response

    @app.after_request
    def observe(response):
        # Everything a view or hook can see of the session, with exact types.
        current = session._get_current_object()
        seen.append(
            {
                "path": request.path,
                "items": [(k, _typed(v)) for k, v in current.items()],
                "modified": current.modified,
                "permanent": current.permanent,
                "new": current.new,
                "class": type(current),
                "user": None if current_user.is_anonymous else current_user.id,
                "identity": (g.identity.id, g.identity.auth_type, sorted(map(repr, g.identity.provides))),
            }
        )
        return response

    if wrapped:
        assert sessions.install(app) is True
    return app


def _typed(value):
    """A value with its exact type at every level: 1, True and 1.0 differ, so do str and Markup."""
    if isinstance(value, dict):
        return ("dict", [(k, _typed(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_typed(v) for v in value])
    return (type(value).__name__, repr(value))


# JSON request bodies cannot carry Python types: a few tagged ones, decoded by the view.
def _decode(value):
    if isinstance(value, dict) and len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == "$tuple":
            return tuple(_decode(v) for v in inner)
        if tag == "$markup":
            return Markup(inner)
        if tag == "$bytes":
            return inner.encode()
        if tag == "$float":
            return float(inner)
        if tag == "$datetime":
            return datetime.datetime.fromtimestamp(inner, datetime.timezone.utc)
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def set_cookies(response) -> list[str]:
    return response.headers.getlist("Set-Cookie")


def session_cookie(client) -> str | None:
    cookie = client.get_cookie("session")
    return None if cookie is None else cookie.value


def interface(app) -> CachedCookieSessionInterface:
    found = sessions.find(app)
    assert found is not None
    return found


def sign(app, data, *, age: int = 0, key: str | None = None) -> str:
    """A cookie exactly as Flask would have signed ``data`` ``age`` seconds ago."""
    plain = SecureCookieSessionInterface()

    class SignedEarlier(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - age

    serializer = URLSafeTimedSerializer(
        key or app.secret_key,
        salt=plain.salt,
        serializer=plain.serializer,
        signer=SignedEarlier,
        signer_kwargs={"key_derivation": "hmac", "digest_method": hashlib.sha1},
    )
    with app.app_context():
        return serializer.dumps(data)


def open_with(app, interface, cookie: str):
    """``interface.open_session`` for a request carrying ``cookie``, without pushing a request context."""
    environ = EnvironBuilder(headers={"Cookie": f"session={cookie}"}).get_environ()
    with app.app_context():
        return interface.open_session(app, app.request_class(environ))


def signer_accepts(app, cookie: str) -> bool:
    """Flask's own verdict on ``cookie`` for ``app`` as configured now."""
    return bool(open_with(app, SecureCookieSessionInterface(), cookie))


def login_data(user_id: str = "1") -> dict:
    """What a session holds after logging in through the test client (Flask-Login's ``_id`` included)."""
    app = make_app(wrapped=False)
    client = app.test_client()
    client.post(f"/login/{user_id}")
    return dict(SecureCookieSessionInterface().get_signing_serializer(app).loads(session_cookie(client)))


#: A logged-in session as the test client's login leaves it.
LOGIN_DATA = login_data()

#: Anonymous data Flask-Login leaves alone (a session without ``_id`` gets ``_fresh = False`` once).
ANONYMOUS = {"_fresh": False}


# -- no write for an unchanged session -----------------------------------------------------


def test_an_unchanged_logged_in_session_is_not_re_signed_but_still_varies_on_cookie():
    ours, bare = make_app(), make_app(wrapped=False)
    for app in (ours, bare):
        client = app.test_client()
        client.post("/login/1")
        cookie = session_cookie(client)
        response = client.get("/admin")
        assert response.status_code == 200
        assert response.headers.get("Vary") == "Cookie"
        if app is bare:
            assert len(set_cookies(response)) == 1  # Principal's saver made Flask re-sign it
        else:
            assert set_cookies(response) == []
            assert session_cookie(client) == cookie
    assert interface(ours).stats().writes_skipped == 1


def test_vary_keeps_what_the_view_set_and_adds_cookie_as_flask_does():
    ours, bare = make_app(), make_app(wrapped=False)
    for app in (ours, bare):
        client = app.test_client()
        client.post("/login/1")
        assert client.get("/vary").headers.getlist("Vary") == ["Accept-Encoding, Cookie"]
    assert interface(ours).stats().writes_skipped == 1


def test_login_logout_and_assignments_are_written():
    app = make_app()
    client = app.test_client()
    response = client.post("/login/1")
    assert len(set_cookies(response)) == 1
    assert client.get("/me").json == {"user": "1", "identity": "1"}

    response = client.post("/logout")
    assert len(set_cookies(response)) == 1  # Principal stores the anonymous identity
    assert client.get("/me").json == {"user": None, "identity": "None"}

    for key in ("identity.id", "identity.auth_type", "_fresh"):
        response = client.post(f"/pop/{key}")
    assert "session=;" in set_cookies(response)[0]  # Flask deletes an emptied session's cookie
    assert session_cookie(client) is None

    client.post("/login/1")
    response = client.post("/set", json={"theme": "dark"})
    assert len(set_cookies(response)) == 1
    client.get("/me")
    assert app.extensions["seen"][-1]["items"][-1][0] == "theme"
    response = client.post("/logout")
    assert len(set_cookies(response)) == 1  # the theme stays, the user goes
    assert client.get("/me").json == {"user": None, "identity": "None"}


@pytest.mark.parametrize(
    "old, new",
    [
        (1, True),
        (1, 1.0),
        (0.0, {"$float": "-0.0"}),
        ("a", {"$markup": "a"}),
        ([1, 2], {"$tuple": [1, 2]}),
        ({"a": 1}, {"a": 2}),
        ({"a": [1, {"b": 1}]}, {"a": [1, {"b": True}]}),
    ],
)
def test_a_value_equal_in_python_but_not_in_the_cookie_is_written(old, new):
    app = make_app()
    client = app.test_client()
    client.post("/login/1")
    client.post("/set", json={"value": old})
    response = client.post("/set", json={"value": new})
    assert len(set_cookies(response)) == 1
    client.get("/me")
    assert app.extensions["seen"][-1]["items"][-1] == ("value", _typed(_decode(new)))


def test_an_identity_change_is_written_and_the_same_identity_again_is_not():
    app = make_app()
    client = app.test_client()
    client.post("/login/1")
    assert len(set_cookies(client.post("/identity/2"))) == 1
    assert client.get("/me").json["identity"] == "2"
    assert set_cookies(client.post("/identity/2")) == []


def test_nested_changes_are_written_when_flagged_and_dropped_as_by_flask_when_not():
    ours, bare = make_app(), make_app(wrapped=False)
    for app in (ours, bare):
        client = app.test_client()
        client.post("/login/1")
        client.post("/set", json={"cart": {"items": []}})
        assert len(set_cookies(client.post("/nested/a?flag=1"))) == 1
        client.post("/nested/b")  # not flagged: Principal's saver flags the session anyway
        client.post("/nested/c")
        client.get("/me")
        assert dict(app.extensions["seen"][-1]["items"])["cart"] == _typed({"items": ["a", "b", "c"]})


def test_a_nested_change_never_leaks_into_the_cached_decode():
    app = make_app(wrapped=True)
    app.view_functions["plain"] = lambda: (session["cart"]["items"].append("leak"), "x")[1]
    client = app.test_client()
    client.post("/set", json={**ANONYMOUS, "cart": {"items": []}})  # no login: nothing marks it modified
    cookie = session_cookie(client)
    client.get("/plain")
    client.get("/plain")
    assert session_cookie(client) == cookie
    client.get("/me")
    assert dict(app.extensions["seen"][-1]["items"])["cart"] == _typed({"items": []})
    assert interface(app).stats().hits >= 2


def test_every_request_gets_its_own_session_objects():
    app = make_app()
    cookie = sign(app, {"cart": {"items": [1]}, "pair": (1, [2])})
    first, second = (open_with(app, app.session_interface, cookie) for _ in range(2))
    assert first == second
    assert first is not second
    assert first["cart"] is not second["cart"] and first["cart"]["items"] is not second["cart"]["items"]
    assert first["pair"][1] is not second["pair"][1]
    assert interface(app).stats().hits == 1


def test_a_key_order_change_is_written_when_the_app_serializes_in_dict_order():
    app = make_app()
    app.json.sort_keys = False
    client = app.test_client()
    client.post("/login/1")
    client.post("/set", json={"a": 1, "b": 2})
    assert len(set_cookies(client.post("/readd/a"))) == 1
    client.get("/me")
    assert [key for key, _ in app.extensions["seen"][-1]["items"]][-2:] == ["b", "a"]


# -- when an unchanged cookie is still re-signed ---------------------------------------------


def test_a_permanent_session_with_refresh_each_request_is_written_every_time():
    app = make_app()
    client = app.test_client()
    client.post("/login/1")
    client.post("/permanent/1")
    for _ in range(2):
        response = client.get("/me")
        assert len(set_cookies(response)) == 1
        assert "Expires=" in set_cookies(response)[0]


def test_a_permanent_session_without_refresh_each_request_is_not_rewritten_when_unchanged():
    app = make_app(SESSION_REFRESH_EACH_REQUEST=False)
    client = app.test_client()
    client.post("/login/1")
    assert len(set_cookies(client.post("/permanent/1"))) == 1
    assert set_cookies(client.get("/me")) == []


class Clock:
    """The wall clock, held still and moved by the test.

    Signatures count whole seconds, and both this module's wrapper and
    itsdangerous read ``time.time()``: a test that sleeps to a second boundary
    and then assumes its next requests share one second fails on a loaded
    machine. Held still at the middle of a second, every request of a step
    sees the same second, and ``advance`` moves to the next one exactly.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = int(time.time()) + 0.5
        monkeypatch.setattr(time, "time", lambda: self.now)

    def advance(self, seconds: int = 1) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    return Clock(monkeypatch)


def tampered(part: str, index: int) -> str:
    """``part`` (base64) with the character at ``index`` changed in its high bit.

    Changing the *last* character of a base64 string can leave the decoded
    bytes alone: its low bits may be padding (a signature ending in "A" and
    one ending in "B" decode alike, so the signer accepts both -- 1 in 16
    signatures end in "A", which made a test fail now and then).
    """
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    flipped = alphabet[alphabet.index(part[index]) ^ 32]
    return part[:index] + flipped + part[index + 1 :]


def signed_at(app, cookie: str) -> int:
    _, signed = SecureCookieSessionInterface().get_signing_serializer(app).loads(cookie, return_timestamp=True)
    return int(signed.timestamp())


def test_a_cookie_older_than_a_fraction_of_the_lifetime_is_re_signed(clock):
    lifetime = 2 * REFRESH_FRACTION - 1  # re-signed once a second old
    app = make_app(PERMANENT_SESSION_LIFETIME=lifetime)
    client = app.test_client()
    client.post("/login/1")
    login_cookie = session_cookie(client)
    assert set_cookies(client.get("/me")) == []  # the same second: fresh enough
    clock.advance(1)
    assert len(set_cookies(client.get("/me"))) == 1
    assert signed_at(app, session_cookie(client)) > signed_at(app, login_cookie)
    assert set_cookies(client.get("/me")) == []


def test_a_cookie_signed_before_the_wrapper_existed_is_re_signed_once(clock):
    app = make_app(PERMANENT_SESSION_LIFETIME=100 * REFRESH_FRACTION)
    client = app.test_client()
    client.set_cookie("session", sign(app, LOGIN_DATA, age=5))  # by an earlier process, maybe other settings
    assert len(set_cookies(client.get("/me"))) == 1
    assert set_cookies(client.get("/me")) == []


def test_changed_cookie_settings_reach_the_browser_at_the_next_request_flask_would_write(clock):
    ours, bare = make_app(), make_app(wrapped=False)
    for app in (ours, bare):
        client = app.test_client()
        client.post("/login/1")
        app.config.update(SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_SECURE=True)
        written = set_cookies(client.get("/me"))
        assert len(written) == 1 and "SameSite=Strict" in written[0] and "Secure" in written[0]
    clock.advance(1)  # cookies signed in the second of the change are written once more
    client = ours.test_client()
    client.post("/login/1")
    assert set_cookies(client.get("/me")) == []


def test_a_cookie_near_the_end_of_its_lifetime_is_re_signed_and_stays_valid(clock):
    app = make_app(PERMANENT_SESSION_LIFETIME=100)
    client = app.test_client()
    client.set_cookie("session", sign(app, LOGIN_DATA, age=99))
    assert client.get("/me").json["user"] == "1"
    assert signer_accepts(app, session_cookie(client))
    _, signed = SecureCookieSessionInterface().get_signing_serializer(app).loads(
        session_cookie(client), return_timestamp=True
    )
    assert time.time() - signed.timestamp() < 5


def test_a_session_that_flask_would_not_write_is_not_refreshed_either(clock):
    app = make_app(PERMANENT_SESSION_LIFETIME=100)
    client = app.test_client()
    old = sign(app, {**ANONYMOUS, "theme": "dark"}, age=90)  # anonymous: nothing marks it modified
    client.set_cookie("session", old)
    assert set_cookies(client.get("/plain")) == []


# -- the decode cache never accepts what the signer rejects ------------------------------------


def test_a_tampered_cookie_is_rejected_also_after_its_original_was_cached():
    app = make_app()
    client = app.test_client()
    good = sign(app, LOGIN_DATA)
    client.set_cookie("session", good)
    assert client.get("/me").json["user"] == "1"
    payload, timestamp, signature = good.rsplit(".", 2)
    forgeries = [
        f"{payload}.{timestamp}.{tampered(signature, len(signature) // 2)}",
        f"{tampered(payload, len(payload) // 2)}.{timestamp}.{signature}",
        f"{payload}.{tampered(timestamp, 0)}.{signature}",
        good + "x",
    ]
    for forgery in forgeries:
        assert not signer_accepts(app, forgery)
        client.set_cookie("session", forgery)
        assert client.get("/me").json["user"] is None
    assert interface(app).stats().rejected == len(forgeries)


def test_a_cached_cookie_is_rejected_once_the_lifetime_shrinks_below_its_age():
    app = make_app(PERMANENT_SESSION_LIFETIME=1000)
    client = app.test_client()
    cookie = sign(app, LOGIN_DATA, age=10)
    for _ in range(2):  # the first answer re-signs it (signed before the wrapper's first save)
        client.set_cookie("session", cookie)
        assert client.get("/me").json["user"] == "1"
    assert interface(app).stats().hits >= 1
    app.permanent_session_lifetime = datetime.timedelta(seconds=5)
    assert not signer_accepts(app, cookie)
    client.set_cookie("session", cookie)
    assert client.get("/me").json["user"] is None


def test_a_cached_cookie_is_rejected_the_second_it_expires(clock):
    lifetime = 30
    app = make_app(PERMANENT_SESSION_LIFETIME=lifetime)
    client = app.test_client()
    cookie = sign(app, LOGIN_DATA, age=lifetime)  # the last second it is valid in
    client.set_cookie("session", cookie)
    assert client.get("/me").json["user"] == "1"
    assert interface(app).stats().misses == 1
    clock.advance(1)
    assert not signer_accepts(app, cookie)
    client.set_cookie("session", cookie)  # the first answer re-signed it: send the old one again
    assert client.get("/me").json["user"] is None


def test_a_cookie_signed_in_the_future_is_rejected():
    app = make_app()
    client = app.test_client()
    client.set_cookie("session", sign(app, LOGIN_DATA, age=-30))
    assert client.get("/me").json["user"] is None
    assert interface(app).stats().size == 0


def test_a_rotated_key_rejects_cached_cookies_and_a_fallback_accepts_them_until_removed():
    app = make_app(SECRET_KEY="old-key")
    client = app.test_client()
    cookie = sign(app, LOGIN_DATA, key="old-key")
    client.set_cookie("session", cookie)
    assert client.get("/me").json["user"] == "1"

    app.secret_key = "new-key"
    assert not signer_accepts(app, cookie)
    assert client.get("/me").json["user"] is None

    app.config["SECRET_KEY_FALLBACKS"] = ["old-key"]
    assert signer_accepts(app, cookie)
    assert client.get("/me").json["user"] == "1"
    assert client.get("/me").json["user"] == "1"  # now from the cache

    app.config["SECRET_KEY_FALLBACKS"] = []
    assert not signer_accepts(app, cookie)
    assert client.get("/me").json["user"] is None


def test_a_changed_salt_rejects_cached_cookies():
    app = make_app()
    client = app.test_client()
    client.set_cookie("session", sign(app, LOGIN_DATA))
    assert client.get("/me").json["user"] == "1"
    app.session_interface.salt = "another-salt"  # through both wrappers, onto Flask's interface
    assert interface(app).__wrapped__.salt == "another-salt"
    assert client.get("/me").json["user"] is None


def test_a_cookie_of_another_app_is_rejected():
    app, other = make_app(), make_app(SECRET_KEY="another-app")
    client = app.test_client()
    client.set_cookie("session", sign(other, LOGIN_DATA))
    assert client.get("/me").json["user"] is None


# -- finding the session cookie in the Cookie header ------------------------------------------------

#: Pieces of Cookie headers, as browsers, proxies and attackers send them.
_OTHER_COOKIES = ["theme=dark", 'quoted="a b"', "empty=", "csrf=abc; Path=/", "sessionx=1", "Session=upper", "=novalue", "junk"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_session_found_in_any_cookie_header_is_the_one_flask_finds(data):
    """Differential: the same raw Cookie headers, each sent twice, to the app with and without the wrapper."""
    ours, bare = make_app(), make_app(wrapped=False)
    cookies = [sign(ours, LOGIN_DATA), sign(ours, login_data("2")), sign(ours, LOGIN_DATA) + "x", '"' + sign(ours, LOGIN_DATA) + '"']
    piece = st.one_of(st.sampled_from(_OTHER_COOKIES), st.sampled_from(cookies).map(lambda c: f"session={c}"))
    for _ in range(data.draw(st.integers(1, 4))):
        separator = data.draw(st.sampled_from(["; ", ";", ", "]))
        header = separator.join(data.draw(st.lists(piece, max_size=4)))
        for _ in range(2):  # the second answer comes from the header memo
            for app in (ours, bare):
                response = app.test_client(use_cookies=False).get("/me", headers={"Cookie": header})
                assert response.status_code == 200
            assert app_view(ours) == app_view(bare), header


def app_view(app) -> tuple:
    """What the last request's views and hooks saw of the session and the user."""
    seen = dict(app.extensions["seen"][-1])
    seen.pop("class")  # the session class is the same; the objects differ
    return tuple(sorted(seen.items(), key=lambda item: item[0]))


def test_a_request_class_that_reads_cookies_its_own_way_is_asked_every_time():
    from werkzeug.utils import cached_property

    class HeaderSession(Flask.request_class):  # type: ignore[name-defined,misc]
        @cached_property
        def cookies(self):  # the session travels in another header; Cookie is ignored
            return {"session": self.headers.get("X-Session", "")}

    app = make_app()
    app.request_class = HeaderSession
    one, two = sign(app, LOGIN_DATA), sign(app, login_data("2"))
    client = app.test_client(use_cookies=False)
    same_cookie_header = {"Cookie": f"session={one}"}
    assert client.get("/me", headers={**same_cookie_header, "X-Session": two}).json["user"] == "2"
    assert client.get("/me", headers={**same_cookie_header, "X-Session": one}).json["user"] == "1"
    assert client.get("/me", headers=same_cookie_header).json["user"] is None


def test_cached_headers_share_the_byte_budget_when_every_request_sends_another_header():
    app = make_app()
    cookie = sign(app, LOGIN_DATA)
    wrapper = CachedCookieSessionInterface(SecureCookieSessionInterface(), max_bytes=64 * 1024)
    app.session_interface = wrapper
    client = app.test_client(use_cookies=False)
    for n in range(500):
        assert client.get("/me", headers={"Cookie": f"tracker={n:0200}; session={cookie}"}).json["user"] == "1"
        assert wrapper.stats().bytes <= 64 * 1024
    stats = wrapper.stats()
    assert stats.misses == 1 and stats.hits == 499  # verified once, whatever surrounds it
    assert 2 < stats.size < 500  # headers cached, and evicted


# -- bounded memory ------------------------------------------------------------------------------


def test_the_decode_cache_stays_within_its_byte_budget_and_charges_more_than_it_uses():
    app = Flask("bounded")
    app.config["SECRET_KEY"] = "test-secret"
    app.session_interface = SecureCookieSessionInterface()
    budget = 256 * 1024
    assert sessions.install(app, max_bytes=budget)
    wrapper = interface(app)
    cookies = [sign(app, {"_user_id": str(i), "blob": "x" * (i % 700), "n": [i, {"k": i}]}) for i in range(1500)]

    def open_all(batch):
        for cookie in batch:
            assert open_with(app, app.session_interface, cookie)["_user_id"]

    open_all(cookies[:10])  # imports and first-use allocations outside the measurement
    wrapper.clear()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        open_all(cookies)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    stats = wrapper.stats()
    assert stats.bytes <= budget
    assert 0 < stats.size < 1500  # full, and evicting
    assert used <= stats.bytes  # the charge over-estimates what the entries really hold


def test_a_cookie_that_decodes_to_much_more_than_the_budget_is_not_cached():
    app = make_app()
    wrapper = CachedCookieSessionInterface(SecureCookieSessionInterface(), max_bytes=64 * 1024)
    app.session_interface = wrapper
    cookie = sign(app, {"blob": "x" * 500_000})  # compresses to a small cookie
    assert len(cookie) < 4096
    client = app.test_client()
    client.set_cookie("session", cookie)
    client.get("/plain")
    assert wrapper.stats().size == 0 and wrapper.stats().bytes == 0


@pytest.mark.filterwarnings("ignore:The 'session' cookie is too large")  # the point of the test
def test_a_cookie_longer_than_browsers_keep_works_but_is_not_cached(clock):  # signed in the second of the first save
    app = make_app()
    cookie = sign(app, {**LOGIN_DATA, "noise": os.urandom(3000).hex()})
    assert len(cookie) > sessions.MAX_COOKIE_CHARS
    client = app.test_client()
    client.set_cookie("session", cookie)
    assert client.get("/me").json["user"] == "1"
    assert client.get("/me").json["user"] == "1"
    assert interface(app).stats().size == 0
    assert interface(app).stats().writes_skipped == 2  # the write is still skipped


def test_custom_serializer_tags_are_never_cached_and_still_work():
    from flask.json.tag import JSONTag

    class Box:
        def __init__(self, value):
            self.value = value

        def __eq__(self, other):
            return isinstance(other, Box) and other.value == self.value

    class TagBox(JSONTag):
        key = " box"

        def check(self, value):
            return isinstance(value, Box)

        def to_json(self, value):
            return self.serializer.tag(value.value)

        def to_python(self, value):
            return Box(value)

    class BoxInterface(SecureCookieSessionInterface):
        from flask.json.tag import TaggedJSONSerializer

        serializer = TaggedJSONSerializer()

    BoxInterface.serializer.register(TagBox)
    app = make_app(wrapped=False)
    app.session_interface = BoxInterface()
    assert sessions.install(app)
    with app.test_request_context():
        cookie = BoxInterface().get_signing_serializer(app).dumps({**ANONYMOUS, "box": Box([1])})
    client = app.test_client()
    client.set_cookie("session", cookie)
    app.view_functions["plain"] = lambda: (session["box"].value.append(2), str(session["box"].value))[1]
    assert client.get("/plain").text == "[1, 2]"
    assert client.get("/plain").text == "[1, 2]"
    assert interface(app).stats().size == 0


# -- installation --------------------------------------------------------------------------------


def test_install_is_idempotent_and_composes_with_the_static_aware_wrapper():
    app = make_app(wrapped=False, middleware=True)
    original = app.session_interface
    assert sessions.install(app) and sessions.install(app)
    mine = app.session_interface
    assert isinstance(mine, CachedCookieSessionInterface) and mine.__wrapped__ is original
    client = app.test_client()
    client.post("/login/1")  # the middleware's first request wraps ours
    assert app.session_interface is not mine and sessions.find(app) is mine
    assert sessions.install(app)
    assert sessions.find(app) is mine and app.session_interface.__wrapped__ is mine
    assert set_cookies(client.get("/me")) == []
    assert mine.stats().writes_skipped == 1
    # Every attribute of Flask's interface is reachable, and settable, through both wrappers.
    for name in ("salt", "serializer", "session_class", "null_session_class", "pickle_based", "key_derivation"):
        assert getattr(app.session_interface, name) is getattr(original, name)
    app.session_interface.salt = "through-both"
    assert original.salt == "through-both"


def test_a_subclass_that_only_changes_settings_is_wrapped():
    class Salted(SecureCookieSessionInterface):
        salt = "salted"

        def get_cookie_name(self, app):
            return "my_session"

    app = make_app(wrapped=False)
    app.session_interface = Salted()
    assert sessions.install(app)
    client = app.test_client()
    client.post("/login/1")
    assert client.get_cookie("my_session") is not None
    assert client.get("/me").json["user"] == "1"
    assert interface(app).stats().writes_skipped == 1


@pytest.mark.parametrize("override", ["open_session", "save_session", "get_signing_serializer", "should_set_cookie"])
def test_a_subclass_that_overrides_what_we_mirror_is_left_alone(override):
    base = SecureCookieSessionInterface
    custom = type("Custom", (base,), {override: lambda self, *args: getattr(base, override)(self, *args)})()
    app = make_app(wrapped=False)
    app.session_interface = custom
    assert sessions.install(app) is False
    assert app.session_interface is custom
    assert sessions.unsupported(custom) == f"Custom overrides {override}"


def test_an_interface_with_another_serializer_is_left_alone_also_when_set_after_install():
    class StampingSerializer:
        """Not deterministic in its input: equal sessions make different cookies."""

        def dumps(self, value):
            return json.dumps({**value, "stamp": uuid.uuid4().hex})

        def loads(self, text):
            return json.loads(text)

    custom = SecureCookieSessionInterface()
    custom.serializer = StampingSerializer()
    app = make_app(wrapped=False)
    app.session_interface = custom
    assert sessions.install(app) is False
    assert "StampingSerializer" in sessions.unsupported(custom)

    app = make_app()
    client = app.test_client()
    client.post("/login/1")
    app.session_interface.serializer = StampingSerializer()  # lands on Flask's interface
    client.post("/login/1")
    first = session_cookie(client)
    response = client.get("/me")
    assert len(set_cookies(response)) == 1 and session_cookie(client) != first  # Flask's behaviour
    assert interface(app).stats().writes_skipped == 0


def test_another_kind_of_interface_is_left_alone():
    class ServerSide(SessionInterface):
        def open_session(self, app, request):
            return None

    app = make_app(wrapped=False)
    app.session_interface = ServerSide()
    assert sessions.install(app) is False
    assert isinstance(app.session_interface, ServerSide)


def test_an_app_without_secret_key_gets_flasks_null_session():
    app = make_app(wrapped=False)
    app.config["SECRET_KEY"] = None
    assert sessions.install(app)
    with app.test_request_context(headers={"Cookie": "session=whatever"}):
        assert app.session_interface.open_session(app, request) is None


def test_session_transaction_of_the_test_client_still_works():
    app = make_app()
    client = app.test_client()
    client.post("/login/1")
    with client.session_transaction() as sess:
        sess["theme"] = "light"
    client.get("/me")
    assert ("theme", _typed("light")) in app.extensions["seen"][-1]["items"]


def test_concurrent_requests_with_one_cookie_each_get_their_own_session():
    app = make_app()
    cookie = sign(app, {**LOGIN_DATA, "cart": {"items": []}})
    app.view_functions["plain"] = lambda: json.dumps(session["cart"]["items"].append(1) or session["cart"]["items"])
    errors: list[str] = []

    def worker():
        client = app.test_client()
        client.set_cookie("session", cookie)
        for _ in range(50):
            body = client.get("/plain").text
            if body != "[1]":
                errors.append(body)
            client.set_cookie("session", cookie)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# -- what the app can observe: the same with and without the wrapper -----------------------------

SCRIPT = [
    ("GET", "/me", None),
    ("POST", "/login/1", None),
    ("GET", "/me", None),
    ("GET", "/admin", None),
    ("GET", "/vary", None),
    ("POST", "/set", {"n": 1, "s": "a", "l": [1, 2], "d": {"x": {"y": [1]}}}),
    ("GET", "/me", None),
    ("POST", "/set", {"n": True}),
    ("POST", "/set", {"n": {"$float": "1.0"}}),
    ("POST", "/set", {"n": {"$float": "-0.0"}}),
    ("POST", "/set", {"n": {"$float": "0.0"}}),
    ("POST", "/set", {"s": {"$markup": "a"}}),
    ("POST", "/set", {"l": {"$tuple": [1, 2]}}),
    ("POST", "/set", {"b": {"$bytes": "raw"}, "t": {"$datetime": 1700000000}}),
    ("POST", "/readd/n", None),
    ("POST", "/set", {"cart": {"items": []}}),
    ("POST", "/nested/a?flag=1", None),
    ("POST", "/nested/b", None),
    ("GET", "/me", None),
    ("POST", "/identity/2", None),
    ("GET", "/admin", None),
    ("POST", "/identity/1", None),
    ("POST", "/permanent/1", None),
    ("GET", "/me", None),
    ("POST", "/permanent/0", None),
    ("GET", "/plain", None),
    ("POST", "/pop/s", None),
    ("POST", "/login/2?remember=1", None),
    ("GET", "/admin", None),
    ("POST", "/logout", None),
    ("GET", "/me", None),
    ("GET", "/plain", None),
]


@pytest.mark.parametrize("sort_keys", [True, False])
@pytest.mark.parametrize("refresh_each_request", [True, False])
def test_the_app_observes_the_same_with_and_without_the_wrapper(sort_keys, refresh_each_request):
    config = {"SESSION_REFRESH_EACH_REQUEST": refresh_each_request}
    ours, bare = make_app(middleware=True, **config), make_app(wrapped=False, middleware=True, **config)
    clients = {}
    for app in (ours, bare):
        app.json.sort_keys = sort_keys
        clients[app] = app.test_client()
    for method, path, body in SCRIPT:
        answers = {}
        for app, client in clients.items():
            response = client.open(path, method=method, json=body)
            headers = [(k, v) for k, v in response.headers if k != "Set-Cookie"]
            answers[app] = (response.status_code, response.data, headers, app.extensions["seen"][-1])
        assert answers[ours] == answers[bare], (method, path)
    assert interface(ours).stats().writes_skipped >= 4  # the unchanged logged-in requests of the script


# -- Flask's own session tests, with the wrapper on every app ------------------------------------

FLASK_SUITE_FILES = ("test_basic.py", "test_session_interface.py", "test_testing.py", "test_reqctx.py")

#: Loaded into the run of Flask's suite: every Flask app gets ``sessions.install`` right after
#: construction; what it wrapped is written to SESSIONS_SUITE_REPORT.
_FLASK_SUITE_PLUGIN = '''
import functools, json, os
import _pytest.monkeypatch
import flask
from identity_middleware import sessions

if not hasattr(_pytest.monkeypatch, "notset"):  # Flask 3.1's conftest predates pytest 9
    _pytest.monkeypatch.notset = _pytest.monkeypatch.NOTSET

_report = {"apps_wrapped": 0, "writes_skipped": 0, "hits": 0}
_wrappers = []

if os.environ.get("SESSIONS_SUITE_WRAP") == "1":
    _init = flask.Flask.__init__

    @functools.wraps(_init)
    def __init__(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        if sessions.install(self):
            _report["apps_wrapped"] += 1
            _wrappers.append(sessions.find(self))

    flask.Flask.__init__ = __init__


def pytest_sessionfinish(session, exitstatus):
    for wrapper in _wrappers:
        stats = wrapper.stats()
        _report["writes_skipped"] += stats.writes_skipped
        _report["hits"] += stats.hits
    with open(os.environ["SESSIONS_SUITE_REPORT"], "w") as fh:
        json.dump(_report, fh)
'''


@pytest.fixture(scope="module")
def flask_suite_dir() -> Path:
    """Flask's ``tests/`` for the installed version, downloaded once (as Flask-Login's suite is)."""
    from test_flask_login_suite import (  # one download helper for both
        _cache_root,
        _extract_tests,
    )

    flask_version = importlib.metadata.version("flask")
    final = _cache_root() / f"flask-{flask_version}"
    if (final / "tests" / "test_basic.py").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"flask=={flask_version}", "--dest", tmp, "--quiet"],
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if download.returncode != 0 or not sdists:
            unavailable(f"cannot download the Flask {flask_version} sdist: {download.returncode}")
        staged = Path(tmp) / "staged"
        _extract_tests(sdists[0], staged)
        (staged / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
        try:
            staged.rename(final)
        except OSError:
            if not (final / "tests" / "test_basic.py").is_file():
                raise
    return final


def _run_flask_suite(
    suite: Path, tmp_path: Path, *, wrap: bool, files: tuple[str, ...] = FLASK_SUITE_FILES
) -> tuple[dict, set[str], int]:
    """Run ``files`` of a downloaded suite, with or without the wrapper: report, failed tests, passed count."""
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir(exist_ok=True)
    (plugin_dir / "sessions_suite_plugin.py").write_text(_FLASK_SUITE_PLUGIN, encoding="utf-8")
    report_path, junit = tmp_path / f"report-{wrap}.json", tmp_path / f"junit-{wrap}.xml"
    env = dict(os.environ, SESSIONS_SUITE_WRAP="1" if wrap else "0", SESSIONS_SUITE_REPORT=str(report_path))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugin_dir), str(REPO), env.get("PYTHONPATH")]))
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "sessions_suite_plugin", "-p", "no:cacheprovider",
         "-p", "no:randomly", "-c", str(suite / "pytest.ini"), "--rootdir", str(suite), f"--junitxml={junit}",
         *(str(suite / "tests" / name) for name in files)],
        cwd=suite, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    failed, passed = set(), 0
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.add(name)
        elif case.find("skipped") is None:
            passed += 1
    return json.loads(report_path.read_text()), failed, passed


def test_flasks_own_session_tests_pass_alike_with_the_wrapper_on_every_app(flask_suite_dir, tmp_path):
    _, failed_bare, passed_bare = _run_flask_suite(flask_suite_dir, tmp_path, wrap=False)
    report, failed_wrapped, passed_wrapped = _run_flask_suite(flask_suite_dir, tmp_path, wrap=True)
    assert passed_bare > 150
    # Whatever fails without the wrapper here (this environment's pytest, say) fails alike with it.
    assert failed_wrapped == failed_bare
    assert passed_wrapped == passed_bare
    assert report["apps_wrapped"] > 150, report  # the plugin was in the path, not an inert run
    assert report["hits"] > 0, report


def test_flask_logins_own_suite_passes_alike_with_the_wrapper_on_every_app(suite_dir, tmp_path):  # noqa: F811
    files = ("test_login.py",)
    _, failed_bare, passed_bare = _run_flask_suite(suite_dir, tmp_path, wrap=False, files=files)
    report, failed_wrapped, passed_wrapped = _run_flask_suite(suite_dir, tmp_path, wrap=True, files=files)
    assert passed_bare > 50
    assert (failed_wrapped, passed_wrapped) == (failed_bare, passed_bare)
    assert report["apps_wrapped"] > 50, report
