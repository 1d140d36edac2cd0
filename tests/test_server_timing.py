"""The opt-in Server-Timing header names the identity decision of every response."""

from __future__ import annotations

import re

import pytest

from conftest import log_in
from identity_middleware import timing

HEADER = re.compile(r'^identity;desc="(?P<desc>[a-z]+)";dur=(?P<dur>\d+\.\d{3})$')


def decision(response) -> tuple[str, float]:
    values = [v for v in response.headers.getlist("Server-Timing") if v.startswith("identity;")]
    assert len(values) == 1, response.headers
    match = HEADER.match(values[0])
    assert match, values[0]
    return match["desc"], float(match["dur"])


@pytest.fixture
def timed_app(sqlite_url):
    from examples.app import create_app

    app = create_app(sqlite_url, config={"IDENTITY_DEBUG_HEADERS": True})
    assert timing.install(app) is True
    return app


@pytest.fixture
def timed_client(timed_app):
    return timed_app.test_client()


def test_no_header_by_default(example_app, client):
    assert timing.install(example_app) is False
    log_in(client)
    for path in ("/", "/me", "/static/app.css", "/favicon.ico"):
        assert "Server-Timing" not in client.get(path).headers, path


def test_environment_turns_it_on(example_app, client, monkeypatch):
    monkeypatch.setenv("IDENTITY_DEBUG_HEADERS", "1")
    assert timing.install(example_app) is True
    assert decision(client.get("/me"))[0] == "bypass"


def test_installing_twice_adds_one_header(timed_app, timed_client):
    assert timing.install(timed_app, enabled=True) is True
    assert len(timed_client.get("/me").headers.getlist("Server-Timing")) == 1


def test_static_requests_say_static(timed_client):
    log_in(timed_client)
    for path in ("/static/app.css", "/widgets/static/widget.css", "/favicon.ico"):
        assert decision(timed_client.get(path)) == ("static", 0.0), path


def test_shadowing_view_is_not_static(timed_client):
    log_in(timed_client)
    assert decision(timed_client.get("/static/config.js"))[0] in ("hit", "miss")


def test_anonymous_request_says_bypass(timed_client):
    assert decision(timed_client.get("/me")) == ("bypass", 0.0)


def test_first_load_is_a_miss_then_hits(timed_app, timed_client):
    log_in(timed_client)
    first, first_ms = decision(timed_client.get("/me"))
    assert first == "miss"
    assert first_ms > 0.0
    assert timed_app.extensions["example"].loader_calls == 1
    for _ in range(3):
        assert decision(timed_client.get("/me"))[0] == "hit"
    assert timed_app.extensions["example"].loader_calls == 1


def test_invalidation_turns_the_next_request_into_a_miss(timed_app, timed_client):
    log_in(timed_client)
    timed_client.get("/me")
    timed_app.extensions["identity_cache"].invalidate(1)
    assert decision(timed_client.get("/me"))[0] == "miss"


def test_unknown_user_is_a_miss_then_negative(timed_client):
    with timed_client.session_transaction() as session:
        session["_user_id"] = "999"
        session["_fresh"] = True
    first = timed_client.get("/me")
    assert first.json["anonymous"] is True
    assert decision(first)[0] == "miss"
    second = timed_client.get("/me")
    assert second.json["anonymous"] is True
    assert decision(second)[0] == "negative"


def test_error_responses_carry_the_header_too(timed_client):
    log_in(timed_client, "bob@example.com")
    response = timed_client.get("/admin")
    assert response.status_code == 403
    assert decision(response)[0] in ("hit", "miss")


def test_header_value_format():
    assert timing.header_value("hit", 0.00125) == 'identity;desc="hit";dur=1.250'
    assert timing.header_value("static") == 'identity;desc="static";dur=0.000'


def test_install_works_after_the_app_served_requests(example_app, client):
    # The middleware sets up on its first request; Flask's after_request() refuses then.
    client.get("/")
    assert timing.install(example_app, enabled=True) is True
    assert decision(client.get("/me")) == ("bypass", 0.0)


def test_responses_made_before_flask_can_carry_it_too(tmp_path):
    """Serve mode answers in the middleware, where no after_request runs."""
    import time

    from werkzeug.test import create_environ

    from identity_middleware.static import StaticFiles

    (tmp_path / "app.css").write_text("body { color: red }\n")
    files = StaticFiles({"/static/": str(tmp_path)})
    sent = []

    def start_response(status, headers, exc_info=None):
        sent.append((status, headers))

    started = time.perf_counter()
    body = files(create_environ("/static/app.css"), timing.start_response_with_header(start_response, "static", started))
    assert b"".join(body) == b"body { color: red }\n"
    (status, headers), = sent
    assert status.startswith("200")
    values = [v for k, v in headers if k == "Server-Timing"]
    assert len(values) == 1 and HEADER.match(values[0])["desc"] == "static"
