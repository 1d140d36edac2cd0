"""Logging under ``identity_middleware``: the startup line, startup warnings, Redis link loss."""

from __future__ import annotations

import logging
import time

import pytest

from identity_middleware import log
from identity_middleware.config import Resolved

LOGGER = "identity_middleware"


@pytest.fixture
def app(sqlite_url, monkeypatch):
    for name in ("WEB_CONCURRENCY", "GUNICORN_CMD_ARGS", "SERVER_SOFTWARE", "UWSGI_PROCESSES", "UWSGI_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IDENTITY_CACHE_NEGATIVE_TTL", "2.5")
    from examples.app import create_app

    app = create_app(sqlite_url, config={"IDENTITY_CACHE_MAXSIZE": 500})
    # Whatever the middleware logged when it was set up, these tests call startup() themselves.
    app.extensions.pop(log._LOGGED, None)
    return app


def records(caplog, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(LOGGER) and r.levelno == level]


def test_startup_logs_one_info_line_with_every_effective_setting(app, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    middleware = app.extensions["identity_middleware"]
    message = log.startup(middleware)
    infos = records(caplog, logging.INFO)
    assert [r.getMessage() for r in infos] == [message]
    assert infos[0].name == LOGGER
    for expected in (
        "IDENTITY_CACHE_TTL=60 (default)",
        "IDENTITY_CACHE_MAXSIZE=500 (app.config)",
        "IDENTITY_CACHE_NEGATIVE_TTL=2.5 (environment)",
        "IDENTITY_STATIC_PATHS=/favicon.ico (argument)",
        "IDENTITY_VERSION_STORE=local (default)",
        "IDENTITY_SERVE_STATIC=0 (default)",
        "IDENTITY_DEBUG_HEADERS=0 (default)",
        "version store: LocalVersionStore",
    ):
        assert expected in message


def test_startup_logs_once_per_app(app, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    middleware = app.extensions["identity_middleware"]
    log.startup(middleware)
    log.startup(middleware)
    assert len(records(caplog, logging.INFO)) == 1


def test_startup_warns_about_surprising_configuration(app, caplog, monkeypatch):
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    caplog.set_level(logging.INFO, logger=LOGGER)
    log.startup(app.extensions["identity_middleware"])
    warnings = [r.getMessage() for r in records(caplog, logging.WARNING)]
    assert any("listed path /favicon.ico is served by the dynamic view 'favicon'" in w for w in warnings)
    assert any("version store is local to each process (WEB_CONCURRENCY=4)" in w for w in warnings)


def test_startup_without_a_cache_says_so(sqlite_url, caplog):
    from examples.app import create_app

    app = create_app(sqlite_url, cache=False)
    app.extensions.pop(log._LOGGED, None)
    caplog.set_level(logging.INFO, logger=LOGGER)
    message = log.startup(app.extensions["identity_middleware"])
    assert "user cache: not installed" in message
    assert "IDENTITY_CACHE_TTL" not in message


def test_passwords_never_reach_the_log():
    shown = log.display(Resolved("IDENTITY_VERSION_STORE", "redis://user:s3cret@redis.internal:6379/0", "environment"))
    assert "s3cret" not in shown
    assert shown == "redis://user:***@redis.internal:6379/0"
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
