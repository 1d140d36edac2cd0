"""Fixtures for the real app: Flask, Flask-Login, Flask-Principal and SQLAlchemy, no mocks.

Service fixtures (PostgreSQL, Redis) skip with a one-line reason on a machine
without the service, and fail instead when ``CI=true``: in CI a skipped service
test would hide a broken feature.

``IDENTITY_TEST_POSTGRES`` (an SQLAlchemy URL of a database the tests may create
databases from) and ``IDENTITY_TEST_REDIS`` (a Redis URL) point the tests at other
servers; the reachability check looks at the host and port of those URLs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import NoReturn
from urllib.parse import urlsplit

import pytest
from sqlalchemy import event

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
POSTGRES_ADMIN_URL = os.environ.get("IDENTITY_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("IDENTITY_TEST_REDIS", "redis://127.0.0.1:6379/0")


def unavailable(reason: str) -> NoReturn:
    """Skip with a one-line reason -- or fail, in CI, where every service must be there."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: fails instead of skipping)")
    pytest.skip(reason)


def service_address(url: str, default_port: int) -> tuple[str, int]:
    """``(host, port)`` of a service URL, as the reachability check needs it."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def require_service(name: str, host: str, port: int) -> None:
    """Skip (outside CI) or fail (in CI) when ``host:port`` does not accept connections."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError as exc:
        unavailable(f"{name} not reachable at {host}:{port} ({exc})")


def wait_for(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.005) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; no fixed sleeps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@contextlib.contextmanager
def count_sql(engine) -> Iterator[list[str]]:
    """Collect every SQL statement ``engine`` executes inside the block."""
    statements: list[str] = []

    def before_cursor_execute(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", before_cursor_execute)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", before_cursor_execute)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'example.db'}"


@pytest.fixture
def example_app(sqlite_url):
    """The example app as shipped: middleware and user cache on, SQLite file."""
    from examples.app import create_app

    return create_app(sqlite_url)


@pytest.fixture
def naive_app(sqlite_url):
    """The same app without identity_middleware: what users run today."""
    from examples.app import create_app

    return create_app(sqlite_url, middleware=False, cache=False)


@pytest.fixture
def client(example_app):
    return example_app.test_client()


def log_in(client, email: str = "alice@example.com"):
    response = client.post("/login", data={"email": email})
    assert response.status_code == 302, response.data
    return client


@pytest.fixture
def logged_in(client):
    """A client with alice (admin, editor) logged in."""
    return log_in(client)


@pytest.fixture
def engine(example_app):
    return example_app.extensions["example"].engine


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    require_service("PostgreSQL", *service_address(POSTGRES_ADMIN_URL, 5432))
    import sqlalchemy as sa

    name = f"im_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def redis_url() -> str:
    """The shared Redis. Tests use a unique key prefix and never flush it."""
    require_service("Redis", *service_address(REDIS_URL, 6379))
    return REDIS_URL


@pytest.fixture
def redis_prefix() -> str:
    return f"identity-test:{uuid.uuid4().hex[:12]}:"
