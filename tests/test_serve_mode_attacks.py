"""Serve mode attacked from outside: what the bare app refuses or answers otherwise, it must too.

Each case builds the same app twice -- bare, and wrapped with
``IdentityMiddleware(serve_static=True)`` -- and sends both the same request
through Flask's test client (serve mode answers in WSGI, so the client reaches
it). A case is only meaningful when the bare app's answer differs from a plain
static 200, which each test asserts first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from flask import Blueprint, Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from identity_middleware import IdentityMiddleware

CSS = b"body { color: teal }"


@pytest.fixture()
def root(tmp_path: Any) -> str:
    for folder in ("static", "widgets"):
        os.makedirs(tmp_path / folder)
        (tmp_path / folder / "app.css").write_bytes(CSS)
    return str(tmp_path)


def twins(root: str, customise: Callable[[Flask], None]) -> tuple[Flask, Flask]:
    """The bare app and the same app in serve mode, each after one warm-up request."""
    apps = []
    for wrapped in (False, True):
        app = Flask("attacked", root_path=root)
        app.config["SECRET_KEY"] = "serve-mode-attacks"
        customise(app)
        if wrapped:
            app.wsgi_app = IdentityMiddleware(app.wsgi_app, serve_static=True)  # type: ignore[method-assign]
        app.test_client().get("/", headers={"Host": "good.example"})  # the first request builds the index
        apps.append(app)
    return apps[0], apps[1]


def answers(app: Flask, path: str = "/static/app.css", **kwargs: Any) -> tuple[int, bytes]:
    response = app.test_client().get(path, **kwargs)
    return response.status_code, response.get_data()


def test_a_host_outside_trusted_hosts_is_refused_as_flask_refuses_it(root: str) -> None:
    def trusted(app: Flask) -> None:
        app.config["TRUSTED_HOSTS"] = ["good.example"]

    bare, served = twins(root, trusted)
    evil = {"Host": "evil.example"}
    assert answers(bare, headers=evil)[0] == 400
    assert answers(served, headers=evil) == answers(bare, headers=evil)
    # a trusted host is still answered before Flask, with the file
    assert answers(served, headers={"Host": "good.example"}) == (200, CSS)


def test_a_send_static_file_replaced_on_the_app_instance_is_not_skipped(root: str) -> None:
    def gated(app: Flask) -> None:
        def send_static_file(filename: str) -> Any:
            return Response("log in first", 401)

        app.send_static_file = send_static_file  # type: ignore[method-assign]

    bare, served = twins(root, gated)
    assert answers(bare) == (401, b"log in first")
    assert answers(served) == answers(bare)
    (verdict,) = served.wsgi_app.serve_verdicts()  # type: ignore[attr-defined]
    assert not verdict.served and "app.send_static_file is replaced by" in verdict.reason


def test_use_x_sendfile_leaves_the_body_to_the_front_server_as_flask_does(root: str) -> None:
    def x_sendfile(app: Flask) -> None:
        app.config["USE_X_SENDFILE"] = True

    bare, served = twins(root, x_sendfile)
    bare_response = bare.test_client().get("/static/app.css")
    served_response = served.test_client().get("/static/app.css")
    assert bare_response.get_data() == b"" and bare_response.headers["X-Sendfile"].endswith("app.css")
    assert served_response.get_data() == b""
    assert served_response.headers.get("X-Sendfile") == bare_response.headers["X-Sendfile"]
    (verdict,) = served.wsgi_app.serve_verdicts()  # type: ignore[attr-defined]
    assert not verdict.served and "USE_X_SENDFILE" in verdict.reason


def test_the_apps_error_handler_answers_an_unsatisfiable_range(root: str) -> None:
    def json_errors(app: Flask) -> None:
        @app.errorhandler(HTTPException)
        def as_json(error: HTTPException) -> Any:
            return jsonify(error=error.code), error.code

    bare, served = twins(root, json_errors)
    unsatisfiable = {"Range": "bytes=5000-"}
    assert answers(bare, headers=unsatisfiable) == (416, b'{"error":416}\n')
    assert answers(served, headers=unsatisfiable) == answers(bare, headers=unsatisfiable)
    assert answers(served) == (200, CSS)  # the mount is still served before Flask
    assert served.wsgi_app.serve_verdicts()[0].served  # type: ignore[attr-defined]


def test_hooks_added_straight_into_flasks_lists_before_the_first_request_block(root: str) -> None:
    def direct(app: Flask) -> None:
        folder = os.path.join(root, "widgets")
        widgets = Blueprint("widgets", "widgets", static_folder=folder, static_url_path="/static", url_prefix="/w")
        app.register_blueprint(widgets)
        app.register_blueprint(widgets, name="gadgets", url_prefix="/g")  # the same blueprint twice
        app.before_request_funcs.setdefault("gadgets", []).append(lambda: ("gadgets are private", 403))
        app.after_request_funcs.setdefault(None, []).append(_tag)

    bare, served = twins(root, direct)
    for path in ("/static/app.css", "/w/static/app.css", "/g/static/app.css"):
        bare_response = bare.test_client().get(path)
        served_response = served.test_client().get(path)
        assert (served_response.status_code, served_response.get_data(), served_response.headers.get("X-Tag")) == (
            bare_response.status_code,
            bare_response.get_data(),
            bare_response.headers.get("X-Tag"),
        ), path
    assert answers(bare, "/g/static/app.css")[0] == 403


def _tag(response: Response) -> Response:
    response.headers["X-Tag"] = "seen"
    return response
