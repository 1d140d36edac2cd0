"""Logging under ``identity_middleware``: settings when built, routes at the first request, Redis link loss."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from identity_middleware import log
from identity_middleware.config import Resolved

LOGGER = "identity_middleware"


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("WEB_CONCURRENCY", "GUNICORN_CMD_ARGS", "SERVER_SOFTWARE", "UWSGI_PROCESSES", "UWSGI_WORKERS"):
        monkeypatch.delenv(name, raising=False)


def build_example(sqlite_url, **options):
    from examples.app import create_app

    return create_app(sqlite_url, **options)


def records(caplog, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(LOGGER) and r.levelno == level]


def messages(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in records(caplog, level)]


def test_each_component_logs_its_settings_when_it_is_built_before_any_request(sqlite_url, caplog, monkeypatch):
    monkeypatch.setenv("IDENTITY_CACHE_NEGATIVE_TTL", "2.5")
    caplog.set_level(logging.INFO, logger=LOGGER)
    build_example(sqlite_url, config={"IDENTITY_CACHE_MAXSIZE": 500})  # no request made
    infos = messages(caplog, logging.INFO)
    cache_line = next(m for m in infos if m.startswith("UserCache for app "))
    for expected in (
        "IDENTITY_CACHE_TTL=60 (default)",
        "IDENTITY_CACHE_MAXSIZE=500 (app.config)",
        "IDENTITY_CACHE_NEGATIVE_TTL=2.5 (environment)",
        "IDENTITY_VERSION_STORE=local (default)",
        "version store: local",
    ):
        assert expected in cache_line
    middleware_line = next(m for m in infos if m.startswith("IdentityMiddleware for app "))
    for expected in (
        "IDENTITY_STATIC_PATHS=/favicon.ico (argument)",
        "IDENTITY_SERVE_STATIC=0 (default)",
        "IDENTITY_DEBUG_HEADERS=0 (default)",
        "static mounts are read from the URL map at the first request",
    ):
        assert expected in middleware_line
    assert not any("URL map read" in m for m in infos)  # that one waits for the routes


def test_the_first_request_logs_the_mounts_once(sqlite_url, caplog):
    app = build_example(sqlite_url)
    caplog.set_level(logging.INFO, logger=LOGGER)
    client = app.test_client()
    client.get("/static/app.css").close()
    client.get("/").close()
    lines = [m for m in messages(caplog, logging.INFO) if "URL map read" in m]
    assert len(lines) == 1
    assert "static mounts /static/ (static), /widgets/static/ (widgets.static)" in lines[0]
    assert "listed paths /favicon.ico" in lines[0]


def test_readme_example_runs_without_a_warning(sqlite_url, caplog):
    """examples/app.py lists its dynamic /favicon.ico view on purpose, as README does."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    app = build_example(sqlite_url)
    client = app.test_client()
    for path in ("/", "/favicon.ico", "/static/app.css"):
        client.get(path).close()
    assert messages(caplog, logging.WARNING) == []


def test_a_local_store_under_several_workers_warns_at_construction(sqlite_url, caplog, monkeypatch):
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    caplog.set_level(logging.INFO, logger=LOGGER)
    build_example(sqlite_url)
    assert any("version store is local to each process (WEB_CONCURRENCY=4)" in w for w in messages(caplog, logging.WARNING))


def test_unreachable_redis_warns_at_construction_even_with_only_anonymous_traffic(caplog, redis_prefix, monkeypatch):
    from flask import Flask

    from identity_middleware import UserCache

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("IDENTITY_VERSION_STORE", f"redis://:s3cret@127.0.0.1:{port}/0")
    monkeypatch.setenv("IDENTITY_VERSION_PREFIX", redis_prefix)
    caplog.set_level(logging.INFO, logger=LOGGER)
    cache = UserCache(Flask(__name__))
    try:
        warnings = messages(caplog, logging.WARNING)
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith(f"cannot reach Redis at redis://***@127.0.0.1:{port}/0 (ConnectionError")
        assert "every request loads its user from the database" in warnings[0]
        assert "s3cret" not in caplog.text
    finally:
        cache.versions.close()  # type: ignore[attr-defined]


def test_reachable_redis_gives_no_warning_and_opens_no_listener_at_construction(caplog, redis_url, redis_prefix, monkeypatch):
    from flask import Flask

    from identity_middleware import UserCache

    monkeypatch.setenv("IDENTITY_VERSION_STORE", redis_url)
    monkeypatch.setenv("IDENTITY_VERSION_PREFIX", redis_prefix)
    caplog.set_level(logging.INFO, logger=LOGGER)
    cache = UserCache(Flask(__name__))
    try:
        assert messages(caplog, logging.WARNING) == []
        assert "not yet used" in repr(cache.versions)  # fork-safe: the probe left no thread behind
        assert any("version store: RedisVersionStore" in m for m in messages(caplog, logging.INFO))
    finally:
        cache.versions.close()  # type: ignore[attr-defined]


def test_environment_static_paths_extend_the_code_list_and_the_line_says_so(sqlite_url, caplog, monkeypatch):
    monkeypatch.setenv("IDENTITY_STATIC_PATHS", "/robots.txt")
    caplog.set_level(logging.INFO, logger=LOGGER)
    app = build_example(sqlite_url)
    line = next(m for m in messages(caplog, logging.INFO) if m.startswith("IdentityMiddleware for app "))
    assert "IDENTITY_STATIC_PATHS=/favicon.ico,/robots.txt (argument + environment)" in line
    assert app.extensions["identity_middleware"].listed == ("/favicon.ico", "/robots.txt")


def test_passwords_never_reach_the_log():
    shown = log.display(Resolved("IDENTITY_VERSION_STORE", "redis://user:s3cret@redis.internal:6379/0", "environment"))
    assert "s3cret" not in shown
    assert shown == "redis://***@redis.internal:6379/0"
    assert "s3cret" not in log.display(Resolved("IDENTITY_VERSION_STORE", "rediss://:s3cret@h/1", "argument"))


def test_warning_when_the_redis_link_drops(caplog, redis_prefix):
    from identity_middleware.redis_versions import RedisVersionStore

    from redis_server import RedisServer

    caplog.set_level(logging.INFO, logger=LOGGER)
    with RedisServer() as server:
        store = RedisVersionStore(server.url, prefix=redis_prefix, heartbeat=0.2, socket_timeout=0.2)
        try:
            assert store.wait_synced(5)
            assert not records(caplog, logging.WARNING)
            server.kill()
            deadline = time.monotonic() + 5
            while not records(caplog, logging.WARNING) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            store.close()
    warnings = [r.getMessage() for r in records(caplog, logging.WARNING)]
    assert warnings, "no WARNING after Redis went away"
    assert "lost the link to Redis" in warnings[0]
    assert f"127.0.0.1:{server.port}" in warnings[0]
