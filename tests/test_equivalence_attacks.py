"""Observational equivalence attacked from outside: odd paths, methods and app shapes.

Built on the bare-vs-wrapped harness of ``tests/test_equivalence.py``: the same
app bare and wrapped, the same client and requests, the same status, body and
headers (with only the allowed omissions of a restated session cookie). Each
customisation here is one an attacker or an unusual app would try: code that
reads the identity in ``teardown_request`` or in a static 404 page, ``HEAD``,
a permanent session, nested blueprints with ``before_app_request``, a
``strict_slashes`` rule and the ``/static`` redirect, ``SCRIPT_NAME``, percent
and unicode spellings of a static path.
"""

from __future__ import annotations

import pytest
from flask import Blueprint, Flask, g, render_template_string, request, session
from flask_login import current_user
from test_equivalence import CLIENTS, _name, assert_equivalent, build, client_for

# (path, extra headers), sent to both twins in order
ODD_PATHS = [
    ("/static/app.css", {}),
    ("/static", {}),
    ("/static/", {}),
    ("/static/app.css/", {}),
    ("/static/app.css;v=1", {}),
    ("/static/app%2Ecss", {}),
    ("/static/%2e%2e/whoami", {}),
    ("/static/caf%C3%A9.css", {}),
    ("/static/cafe%CC%81.css", {}),
    ("/static/docs", {}),
    ("/static/docs/", {}),
    ("/parent/child/static/c.css", {}),
    ("/parent/child/static/missing.css", {}),
    ("/static/missing.css", {}),
]


def observers(app: Flask) -> None:
    """Code that reads the identity where a request's identity work is skipped."""
    seen: list[str] = []
    app.extensions["seen"] = seen

    @app.teardown_request
    def audit(error: BaseException | None) -> None:
        seen.append(f"{request.path} {_name(current_user)}")

    @app.errorhandler(404)
    def not_found(error: Exception) -> tuple[str, int]:
        page = "missing for {{ current_user.get_id() or 'anonymous' }} as {{ g.identity.id }}"
        return render_template_string(page), 404

    @app.before_request
    def keep_me_logged_in() -> None:
        session.permanent = True

    @app.get("/static/docs/", strict_slashes=True)
    def docs() -> str:
        return f"docs for {_name(current_user)}"

    parent = Blueprint("parent", __name__, url_prefix="/parent")
    child = Blueprint("child", __name__, url_prefix="/child", static_folder="child_static")

    @child.before_app_request
    def everywhere() -> None:
        g.everywhere = _name(current_user)

    @parent.after_request
    def parent_header(response):  # type: ignore[no-untyped-def]
        response.headers["X-Parent"] = _name(current_user)
        return response

    @app.after_request
    def app_header(response):  # type: ignore[no-untyped-def]
        response.headers["X-Everywhere"] = g.get("everywhere", "-")
        return response

    parent.register_blueprint(child)
    app.register_blueprint(parent)


@pytest.fixture(scope="module")
def root(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("equivalence-attacks")
    (root / "static").mkdir()
    (root / "static" / "app.css").write_text("body { color: teal }")
    (root / "static" / "café.css").write_text(".nfc {}")
    (root / "static" / "docs").write_text("a file named like a page")
    (root / "child_static").mkdir()
    (root / "child_static" / "c.css").write_text(".child {}")
    (root / "widgets" / "static").mkdir(parents=True)
    return str(root)


def twins(root: str, **client_options):  # type: ignore[no-untyped-def]
    bare, wrapped = build(root, wrapped=False), build(root, wrapped=True, cache=True)
    for app in (bare, wrapped):
        observers(app)
    return bare, wrapped


@pytest.mark.parametrize("client_kind", CLIENTS)
def test_odd_paths_and_late_observers_see_what_the_bare_app_shows(root: str, client_kind: str) -> None:
    bare, wrapped = twins(root)
    bare_client, wrapped_client = client_for(bare, client_kind), client_for(wrapped, client_kind)
    bare.extensions["seen"].clear()
    wrapped.extensions["seen"].clear()
    assert_equivalent(bare_client, wrapped_client, wrapped, ODD_PATHS)
    assert wrapped.extensions["seen"] == bare.extensions["seen"]
    if client_kind == "staff":  # the comparison above means something: the user was seen
        assert "/static/app.css 1" in bare.extensions["seen"]
        assert bare_client.get("/static/missing.css").data == b"missing for 1 as 1"


def test_head_answers_as_get_does_in_both_twins(root: str) -> None:
    bare, wrapped = twins(root)
    bare_client, wrapped_client = client_for(bare, "staff"), client_for(wrapped, "staff")
    for path, _ in ODD_PATHS:
        b, w = bare_client.head(path), wrapped_client.head(path)
        assert (w.status_code, w.headers.get("X-Parent"), w.headers.get("Location")) == (
            b.status_code,
            b.headers.get("X-Parent"),
            b.headers.get("Location"),
        ), path
    assert wrapped.extensions["seen"] == bare.extensions["seen"]


def test_a_script_name_prefix_changes_nothing(root: str) -> None:
    bare, wrapped = twins(root)
    bare_client, wrapped_client = client_for(bare, "staff"), client_for(wrapped, "staff")
    for client in (bare_client, wrapped_client):
        client.environ_base["SCRIPT_NAME"] = "/mounted"
    assert_equivalent(bare_client, wrapped_client, wrapped, ODD_PATHS[:4])
    assert wrapped.extensions["seen"] == bare.extensions["seen"]
