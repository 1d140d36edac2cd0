"""No secret in a Redis URL is ever printed (design invariant 6).

A secret is put in every position where redis-py reads a credential -- the user
information (password, user name, both; unencoded ``/``, ``#``, ``?``, ``@`` that
make the URL malformed) and the query (``password``, ``username``,
``ssl_password``, any parameter redis-py passes on) -- and also in the fragment,
and every output that can show the URL is searched for it: ``ConfigError`` (text,
repr, ``.value``), ``Resolved`` reprs and displayed settings, the store's and the
cache's reprs, the settings line and the "cannot reach Redis" WARNING logged at
construction, the WARNING the listener logs, and ``flask identity status``.

Secrets are built from the letters Q, X, Z, J (which no template, message or
host name here contains) and separators; any run of three of those letters in an
output is a leak, so a partly masked secret is caught too.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from identity_middleware import ConfigError, UserCache
from identity_middleware.config import redacted, resolve_one
from identity_middleware.log import display

LEAK = re.compile(r"[QXZJ]{3,}")

#: Where a secret can sit; {s} is the secret, {port} a port where nothing listens.
POSITIONS = (
    "redis://:{s}@127.0.0.1:{port}/0",
    "redis://{s}@127.0.0.1:{port}/0",
    "redis://{s}:{s}@127.0.0.1:{port}/0",
    "rediss://user:{s}@127.0.0.1:{port}/0",
    "redis://user:{s}@127.0.0.1:{port}",
    "redis://127.0.0.1:{port}/0?password={s}",
    "redis://127.0.0.1:{port}/0?username={s}&password={s}",
    "redis://127.0.0.1:{port}/0?ssl_password={s}",
    "redis://127.0.0.1:{port}/0?db=0&password={s}&socket_timeout=1",
    "redis://127.0.0.1:{port}/0?{s}",
    "redis://127.0.0.1:{port}/0#{s}",
    "redis://:{s}@127.0.0.1:{port}/0?password={s}#{s}",
    "unix:///run/identity-test.sock?password={s}",
    "redis:/:{s}@127.0.0.1:{port}/0",
    "//:{s}@127.0.0.1:{port}/0",
    ":{s}@127.0.0.1:{port}",
)

_SECRET_PARTS = st.sampled_from(["QXZ", "JQX", "ZZJ", "XJQZ", "/", "#", "?", "@", ":", "%", "&", "=", "+", "!", "$", ";", "%2F", "\\"])
SECRETS = st.lists(_SECRET_PARTS, min_size=1, max_size=8).map("".join).filter(lambda s: LEAK.search(s) is not None)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


PORT = closed_port()


def assert_no_leak(*outputs: object) -> None:
    for output in outputs:
        text = output if isinstance(output, str) else repr(output)
        assert LEAK.search(text) is None, text


@contextmanager
def captured_log() -> Iterator[list[str]]:
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect(logging.DEBUG)
    logger = logging.getLogger("identity_middleware")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def every_output_at_construction(url: str) -> list[object]:
    """What configuring ``url`` prints, whether it is valid or not."""
    outputs: list[object] = [redacted(url)]
    try:
        resolved = resolve_one("IDENTITY_VERSION_STORE", url, None, environ={})
    except ConfigError as exc:
        return [*outputs, str(exc), repr(exc), exc.value, exc.args]
    outputs += [resolved, display(resolved)]
    app = Flask("redaction")
    app.config["IDENTITY_VERSION_STORE"] = url
    with captured_log() as lines:
        try:
            cache = UserCache(app)
        except ConfigError as exc:  # redis-py refused an option
            return [*outputs, *lines, str(exc), repr(exc), exc.value]
        try:
            outputs += [repr(cache), repr(cache.versions), cache.settings]
        finally:
            cache.versions.close()  # type: ignore[attr-defined]
    return [*outputs, *lines]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(position=st.sampled_from(POSITIONS), secret=SECRETS)
def test_a_secret_in_any_position_never_appears_in_what_configuration_prints(position, secret, monkeypatch_env):
    url = position.format(s=secret, port=PORT)
    assert_no_leak(*every_output_at_construction(url))


@pytest.fixture
def monkeypatch_env(monkeypatch):
    """The process environment must not override the URL under test."""
    for name in ("IDENTITY_VERSION_STORE", "IDENTITY_VERSION_PREFIX"):
        monkeypatch.delenv(name, raising=False)


NASTY = "QXZ/J#Q?X@Z:J%Q&X=ZJ"


@pytest.mark.parametrize("position", [p for p in POSITIONS if not p.startswith("unix")])
def test_the_link_warning_and_flask_identity_status_never_show_the_secret(position, monkeypatch, redis_prefix):
    """The listener's WARNING and ``status`` after trying the link, for URLs the store accepts."""
    from identity_middleware import cli

    url = position.format(s=NASTY, port=PORT)
    try:
        resolve_one("IDENTITY_VERSION_STORE", url, None, environ={})
    except ConfigError as exc:
        assert_no_leak(str(exc), repr(exc), exc.value)
        return
    monkeypatch.setenv("IDENTITY_VERSION_STORE", url)
    monkeypatch.setenv("IDENTITY_VERSION_PREFIX", redis_prefix)
    monkeypatch.setattr(cli, "STATUS_TIMEOUT", 0.2)
    app = Flask("redaction")
    with captured_log() as lines:
        try:
            cache = UserCache(app)
        except ConfigError as exc:
            assert_no_leak(*lines, str(exc), repr(exc), exc.value)
            return
        try:
            cli.register(app)
            status = app.test_cli_runner().invoke(args=["identity", "status"])
            cache.versions.stamp("1")  # the listener's first attempt has failed by now
        finally:
            cache.versions.close()  # type: ignore[attr-defined]
    assert "cannot reach Redis" in status.output or "not connected" in status.output, status.output
    assert any("cannot reach Redis" in line for line in lines), lines
    assert_no_leak(status.output, *lines)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://***@h:6379/0"),
        ("redis://user:pw@h:6379/0", "redis://***@h:6379/0"),
        ("redis://:a/b@h:6379/0", "redis://***@h:6379/0"),
        ("redis://:a#b@h:6379/0", "redis://***"),  # '#' or '?' before the '@': show nothing
        ("redis://:a?b@h:6379/0", "redis://***"),
        ("redis://h:6379/0?password=a@b", "redis://***"),
        ("redis://:a@b@h:6379/0", "redis://***@h:6379/0"),
        ("redis://h:6379/0?db=1&password=pw&socket_timeout=2", "redis://h:6379/0?db=1&password=***&socket_timeout=2"),
        ("redis://h:6379/0?hunter2", "redis://h:6379/0?***"),
        ("redis://h:6379/0#pw", "redis://h:6379/0#***"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("local", "local"),
        ("/assets/@fs/x?y#z", "/assets/@fs/x?y#z"),
    ],
)
def test_the_rule_masks_credentials_and_keeps_the_rest_readable(url, shown):
    assert redacted(url) == shown


def test_containers_are_redacted_item_by_item():
    assert redacted({"store": ("redis://:pw@h/0", 3)}) == {"store": ("redis://***@h/0", 3)}
