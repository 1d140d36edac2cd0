"""A real Flask-Security-Too app: its static folder and ours skip identity.

Flask-Security-Too initialises Flask-Login (user loader and request loader),
Flask-Principal (``use_sessions=False``, its own identity loader) and an
``identity_loaded`` handler that reads ``current_user.roles``; its blueprint
serves ``/fs-static`` (``SECURITY_STATIC_FOLDER_URL``). None of it is written
for us, and wrapping ``app.wsgi_app`` must be all it takes.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os

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


# -- Flask-Security-Too's own flows with the cache installed as the README says -----------------
#
# Each flow runs twice, with and without the cache, and must answer the same. Two clients
# log in as alice (her laptop and her phone); "ends the other sessions" means the phone is
# sent away after a password change or reset on the laptop, exactly as without the cache.

from flask_security import MailUtil  # noqa: E402
from flask_security.signals import change_email_instructions_sent, reset_password_instructions_sent  # noqa: E402

PASSWORD = "correct horse 1"


class RecordingMail(MailUtil):
    """Flask-Security's mail, kept in a list instead of sent."""

    sent: list[dict] = []

    def send_mail(self, template, subject, recipient, sender, body, html, **kwargs):
        self.sent.append({"template": template, "recipient": recipient, **kwargs})


def make_flows_app(tmp_path, *, cached: bool):
    """A Flask-Security-Too app with its optional flows on; ``cached`` adds the README's lines."""
    from identity_middleware import UserCache
    from identity_middleware.sqlalchemy import bind_sqlalchemy

    db, User, Role = _models()
    app = Flask("fst_flows", root_path=str(tmp_path))
    app.config.update(
        SECRET_KEY="test",
        SECURITY_PASSWORD_SALT="test",
        SECURITY_PASSWORD_HASH="plaintext",
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'flows.db'}",
        WTF_CSRF_ENABLED=False,
        SECURITY_EMAIL_VALIDATOR_ARGS={"check_deliverability": False},
        SECURITY_CHANGEABLE=True,
        SECURITY_RECOVERABLE=True,
        SECURITY_CHANGE_EMAIL=True,
        SECURITY_USERNAME_ENABLE=True,
        SECURITY_CHANGE_USERNAME=True,
        SECURITY_TWO_FACTOR=True,
        SECURITY_TWO_FACTOR_ENABLED_METHODS=["authenticator"],
        SECURITY_TOTP_SECRETS={"1": "a totp secret for tests only"},
        SECURITY_TOTP_ISSUER="identity_middleware tests",
        SECURITY_WEBAUTHN=True,
        SECURITY_SEND_PASSWORD_CHANGE_EMAIL=False,
        SECURITY_SEND_PASSWORD_RESET_NOTICE_EMAIL=False,
    )
    app.wsgi_app = IdentityMiddleware(app.wsgi_app)
    db.init_app(app)
    datastore = SQLAlchemyUserDatastore(db, User, Role, webauthn_model=User.webauthn_model)
    Security(app, datastore, mail_util_cls=RecordingMail)
    binding = None
    if cached:  # the README's Flask-Security-Too lines
        user_cache = UserCache(app)
        user_cache.install(app.login_manager)
        binding = bind_sqlalchemy(user_cache, db.session, User, relationships=("roles",), user_id="fs_uniquifier")

    @app.get("/private")
    @auth_required()
    def private():
        return {"email": current_user.email, "username": current_user.username, "roles": [r.name for r in current_user.roles]}

    with app.app_context():
        db.create_all()
        datastore.create_role(name="admin")
        datastore.create_user(email="alice@example.com", username="alice", password=PASSWORD, roles=["admin"])
        datastore.create_user(email="root@example.com", username="root", password=PASSWORD, roles=["admin"])
        datastore.commit()
    return app, datastore, binding


@pytest.fixture(params=["cached", "uncached"])
def flows(request, tmp_path):
    app, datastore, binding = make_flows_app(tmp_path, cached=request.param == "cached")
    RecordingMail.sent = []
    yield app, datastore
    if binding is not None:
        binding.remove()
    with app.app_context():
        _models()[0].engine.dispose()


def sign_in(app, email="alice@example.com", password=PASSWORD):
    client = app.test_client()
    response = client.post("/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.json
    assert client.get("/private").status_code == 200
    assert client.get("/private").status_code == 200  # a cache hit where the cache is on
    return client


def refused(response) -> bool:
    """Flask-Security's answer to a JSON request without a (valid) user."""
    return response.status_code == 401


def test_change_password_ends_the_other_sessions_and_keeps_this_one(flows):
    app, _ = flows
    laptop, phone = sign_in(app), sign_in(app)
    response = laptop.post(
        "/change", json={"password": PASSWORD, "new_password": "a new password 2", "new_password_confirm": "a new password 2"}
    )
    assert response.status_code == 200, response.json
    assert laptop.get("/private", json={}).status_code == 200
    assert refused(phone.get("/private", json={}))
    assert refused(phone.get("/private", json={}))  # and stays refused (no stale entry)
    sign_in(app, password="a new password 2")


def test_recover_password_ends_every_session(flows):
    app, _ = flows
    laptop, phone = sign_in(app), sign_in(app)
    tokens = []
    with reset_password_instructions_sent.connected_to(lambda sender, token, **kw: tokens.append(token), app):
        assert app.test_client().post("/reset", json={"email": "alice@example.com"}).status_code == 200
    [token] = tokens
    response = app.test_client().post(f"/reset/{token}", json={"password": "a new password 3", "password_confirm": "a new password 3"})
    assert response.status_code == 200, response.json
    assert refused(laptop.get("/private", json={}))
    assert refused(phone.get("/private", json={}))
    sign_in(app, password="a new password 3")


def test_change_email_confirms_and_the_next_request_shows_it(flows):
    app, _ = flows
    laptop = sign_in(app)
    tokens = []
    with change_email_instructions_sent.connected_to(lambda sender, token, **kw: tokens.append(token), app):
        response = laptop.post("/change-email", json={"email": "alice@new.example.com"})
    assert response.status_code == 200, response.json
    [token] = tokens
    assert laptop.get(f"/change-email/{token}").status_code in (200, 302)
    assert laptop.get("/private").json["email"] == "alice@new.example.com"
    assert laptop.get("/private").json["email"] == "alice@new.example.com"


def test_change_username_shows_on_the_next_request(flows):
    app, _ = flows
    laptop = sign_in(app)
    response = laptop.post("/change-username", json={"username": "alice2", "password": PASSWORD})
    assert response.status_code == 200, response.json
    assert laptop.get("/private").json["username"] == "alice2"
    assert laptop.get("/private").json["username"] == "alice2"


def _totp(key: str) -> str:
    from passlib.totp import TOTP

    return TOTP(key=key, format="base32").generate().token


def test_two_factor_setup_then_a_two_factor_sign_in(flows):
    app, _ = flows
    laptop = sign_in(app)
    response = laptop.post("/tf-setup", json={"setup": "authenticator"})
    assert response.status_code == 200, response.json
    setup = response.json["response"]
    key = setup.get("tf_authr_b32key") or setup["tf_authr_key"]  # before 5.7 only tf_authr_key
    response = laptop.post("/tf-validate", json={"code": _totp(key)})
    assert response.status_code == 200, response.json
    assert laptop.get("/private").status_code == 200
    phone = app.test_client()
    response = phone.post("/login", json={"email": "alice@example.com", "password": PASSWORD})
    assert response.status_code == 200 and response.json["response"]["tf_required"] is True
    assert refused(phone.get("/private", json={}))  # not signed in until the code
    response = phone.post("/tf-validate", json={"code": _totp(key)})
    assert response.status_code == 200, response.json
    assert phone.get("/private").status_code == 200
    assert phone.get("/private").json["email"] == "alice@example.com"


class SoftwareKey:
    """A WebAuthn authenticator in software: a P-256 key, "none" attestation.

    What a browser and a security key send, built by hand, so that Flask-Security-Too's
    real verification (py_webauthn) runs end to end.
    """

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        self.key = ec.generate_private_key(ec.SECP256R1())
        self.credential_id = os.urandom(16)
        self.sign_count = 0

    @staticmethod
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def _client_data(self, kind: str, options: dict) -> bytes:
        return json.dumps({"type": kind, "challenge": options["challenge"], "origin": "http://localhost"}).encode()

    def register(self, options: dict) -> str:
        import cbor2

        numbers = self.key.public_key().public_numbers()
        cose = cbor2.dumps({1: 2, 3: -7, -1: 1, -2: numbers.x.to_bytes(32, "big"), -3: numbers.y.to_bytes(32, "big")})
        auth_data = (
            hashlib.sha256(options["rp"]["id"].encode()).digest()
            + bytes([0x01 | 0x04 | 0x40])  # user present, user verified, credential data follows
            + self.sign_count.to_bytes(4, "big")
            + bytes(16)  # AAGUID
            + len(self.credential_id).to_bytes(2, "big")
            + self.credential_id
            + cose
        )
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        return json.dumps(
            {
                "id": self.b64(self.credential_id),
                "rawId": self.b64(self.credential_id),
                "type": "public-key",
                "response": {
                    "clientDataJSON": self.b64(self._client_data("webauthn.create", options)),
                    "attestationObject": self.b64(attestation),
                    "transports": ["usb"],
                },
                "clientExtensionResults": {},
            }
        )

    def sign(self, options: dict, user_handle: str) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        self.sign_count += 1
        client_data = self._client_data("webauthn.get", options)
        auth_data = (
            hashlib.sha256(options["rpId"].encode()).digest() + bytes([0x01 | 0x04]) + self.sign_count.to_bytes(4, "big")
        )
        signature = self.key.sign(auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256()))
        return json.dumps(
            {
                "id": self.b64(self.credential_id),
                "rawId": self.b64(self.credential_id),
                "type": "public-key",
                "response": {
                    "clientDataJSON": self.b64(client_data),
                    "authenticatorData": self.b64(auth_data),
                    "signature": self.b64(signature),
                    "userHandle": user_handle,
                },
                "clientExtensionResults": {},
            }
        )


def test_webauthn_register_a_key_then_sign_in_with_it(flows):
    # Registering sets current_user's webauthn handle and adds a credential to its
    # (lazy) webauthn relationship, committed; signing in with the key is a new session.
    app, _ = flows
    laptop = sign_in(app)
    key = SoftwareKey()
    response = laptop.post("/wan-register", json={"name": "my key", "usage": "first"})
    assert response.status_code == 200, response.json
    options, state = response.json["response"]["credential_options"], response.json["response"]["wan_state"]
    user_handle = options["user"]["id"]
    response = laptop.post(f"/wan-register/{state}", json={"credential": key.register(options)})
    assert response.status_code == 200, response.json
    listing = laptop.get("/wan-register", json={})
    assert [c["name"] for c in listing.json["response"]["registered_credentials"]] == ["my key"]
    assert laptop.get("/private").status_code == 200

    phone = app.test_client()
    response = phone.post("/wan-signin", json={"identity": "alice@example.com"})
    assert response.status_code == 200, response.json
    options, state = response.json["response"]["credential_options"], response.json["response"]["wan_state"]
    response = phone.post(f"/wan-signin/{state}", json={"credential": key.sign(options, user_handle)})
    assert response.status_code == 200, response.json
    assert phone.get("/private").json["email"] == "alice@example.com"
    assert phone.get("/private").status_code == 200


def test_deactivation_ends_access_at_once(flows):
    app, datastore = flows
    laptop = sign_in(app)
    with app.app_context():
        datastore.deactivate_user(datastore.find_user(email="alice@example.com"))
        datastore.commit()
    assert refused(laptop.get("/private", json={}))
    assert laptop.get("/private").status_code == 302  # a browser is sent to the login page
